"""Gradients over parameter trees: `grad` and `value_and_grad` with a leaf filter `where`.

Built on ``torch.autograd.grad`` (``torch.func.grad`` breaks under non-reentrant checkpointing and
saved-tensor hooks). The returned gradient tree has the structure of ``params`` with ``None`` at
the leaves that ``where`` did not select.

Example:
    >>> import torch, dsf
    >>> params = {"w": torch.tensor([2.0]), "frozen": torch.tensor([3.0])}
    >>> loss, grads = dsf.value_and_grad(lambda p, x: (p["w"] * p["frozen"] * x).sum(), where="w")(params, 1.0)
    >>> loss.item(), grads["w"].item(), grads["frozen"]
    (6.0, 3.0, None)
"""

from __future__ import annotations

import functools
from typing import Callable

import optree
import torch

from dsf.tree import NAMESPACE, Where, as_predicate


def _join(path: tuple) -> str:
    return "/".join(str(entry) for entry in path)


def value_and_grad(f: Callable, where: Where = None, has_aux: bool = False) -> Callable:
    """``f'(params, ...) -> (value, grads)`` (``((value, aux), grads)`` with ``has_aux``).

    ``value`` is the detached scalar ``f`` returns; ``grads`` holds d value / d leaf for the
    floating-point tensor leaves selected by ``where`` (a regex on "/"-joined paths, a list of
    them, or a ``(path, leaf) -> bool`` callable); a selected leaf that ``f`` does not use gets zeros.
    """
    keep = as_predicate(where)

    @functools.wraps(f)
    def wrapped(params, *args, **kwargs):
        paths, leaves, treedef = optree.tree_flatten_with_path(params, namespace=NAMESPACE)
        selected = [i for i, (p, x) in enumerate(zip(paths, leaves)) if isinstance(x, torch.Tensor) and keep(_join(p), x)]
        if not selected:
            examples = ", ".join(_join(p) for p in paths[:5])
            raise ValueError(f"where={where!r} selects no tensor in params; paths look like: {examples}")
        leaves = list(leaves)
        for i in selected:
            if not leaves[i].is_floating_point() or leaves[i].dtype.itemsize == 1:
                raise ValueError(f"cannot differentiate {_join(paths[i])!r} of dtype {leaves[i].dtype}; exclude it from where=")
            leaves[i] = leaves[i].detach().requires_grad_(True)
        out = f(optree.tree_unflatten(treedef, leaves), *args, **kwargs)
        value = out[0] if has_aux else out
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"value_and_grad needs f to return a scalar tensor, got {type(value).__name__} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        inputs = [leaves[i] for i in selected]
        grads = torch.autograd.grad(value, inputs, allow_unused=True) if value.requires_grad else (None,) * len(inputs)
        grad_leaves: list = [None] * len(leaves)
        for i, g in zip(selected, grads):
            grad_leaves[i] = torch.zeros_like(leaves[i]) if g is None else g
        grad_tree = optree.tree_unflatten(treedef, grad_leaves)
        value = value.detach()
        return ((value, out[1]) if has_aux else value), grad_tree

    return wrapped


def grad(f: Callable, where: Where = None, has_aux: bool = False) -> Callable:
    """``f'(params, ...) -> grads`` (``(grads, aux)`` with ``has_aux``); see :func:`value_and_grad`.

    >>> grad(lambda p: (p["w"] ** 2).sum())({"w": torch.tensor([3.0])})["w"]
    tensor([6.])
    """
    vg = value_and_grad(f, where=where, has_aux=has_aux)

    @functools.wraps(f)
    def wrapped(params, *args, **kwargs):
        out, grads = vg(params, *args, **kwargs)
        return (grads, out[1]) if has_aux else grads

    return wrapped
