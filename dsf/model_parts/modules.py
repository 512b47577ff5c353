"""Third-party ``nn.Module``s (transformers text encoders) as pure functions over their param trees.

``pure_module(module)`` returns ``(apply, params)``: ``params`` is the module's parameters and
buffers as a nested tree (keys mirror its ``state_dict``), and ``apply(params, *args, **kwargs)``
runs the module with exactly those tensors through ``torch.func.functional_call``. The module
object only supplies the code; every tensor comes from ``params``, so transforms and gradients
treat a text encoder like any dsf model.

A module built with :func:`meta_module` allocates nothing. Checkpoints name a tower's tensors
``{tower}.*`` (``text_model.*``, ``vision_model.*``) while a transformers 5 module is the tower
itself: :func:`state_shapes` and :func:`module_names` translate between the two namings.

Example:
    >>> import torch
    >>> from dsf.model_parts.modules import pure_module
    >>> apply, params = pure_module(torch.nn.Linear(2, 3))
    >>> sorted(params)
    ['bias', 'weight']
    >>> apply({"weight": torch.zeros(3, 2), "bias": torch.ones(3)}, torch.ones(1, 2)).tolist()
    [[1.0, 1.0, 1.0]]
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import torch
from torch.func import functional_call

from dsf.tree import flatten_dict, unflatten_dict
from dsf.weight import dense_tree


def module_params(module: torch.nn.Module) -> dict:
    """The parameters and buffers of ``module`` as a detached nested tree."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return unflatten_dict({name: t.detach() for name, t in tensors.items()})


def call_module(module: torch.nn.Module, params, *args, **kwargs):
    """``module(*args, **kwargs)`` computed with ``params`` (a tree or flat dict of exactly its state), densified.

    A part of a module (one layer of a transformers encoder) runs on its own subtree this way.

    >>> call_module(torch.nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, torch.ones(1, 2)).tolist()
    [[2.0]]
    """
    return functional_call(module, flatten_dict(dense_tree(params)), args, kwargs, strict=True)


def pure_module(module: torch.nn.Module) -> tuple[Callable, dict]:
    """``(apply, params)`` for a module; ``apply(params, *args, **kwargs)`` calls it with ``params``."""
    module.eval()

    def apply(params, *args, **kwargs):
        return call_module(module, params, *args, **kwargs)

    return apply, module_params(module)


def meta_module(module_class: Callable[..., torch.nn.Module], config: Any) -> torch.nn.Module:
    """``module_class(config)`` built on the meta device: the code of the module, with no tensor allocated.

    >>> meta_module(torch.nn.LayerNorm, 4).weight.device
    device(type='meta')
    """
    with torch.device("meta"):
        return module_class(config)


def tower_prefix(module: torch.nn.Module, tower: str) -> str:
    """``tower + "."`` when ``module`` holds the tower as that attribute (transformers 4), ``""`` when it is the tower (5).

    >>> holder = torch.nn.Module()
    >>> holder.text_model = torch.nn.Linear(1, 1)
    >>> tower_prefix(holder, "text_model"), tower_prefix(holder.text_model, "text_model")
    ('text_model.', '')
    """
    return tower + "." if tower and hasattr(module, tower) else ""


def state_shapes(module: torch.nn.Module, tower: str = "", skip: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """Key → shape of ``module``'s state dict, named ``{tower}.*`` as checkpoints are; names in ``skip`` are left out.

    ``skip`` holds names within the tower. Without ``tower`` the keys are the module's own.

    >>> state_shapes(torch.nn.Linear(2, 3), "head")
    {'head.weight': (3, 2), 'head.bias': (3,)}
    >>> state_shapes(torch.nn.Linear(2, 3), skip={"bias"})
    {'weight': (3, 2)}
    """
    prefix = tower_prefix(module, tower)
    named = tower + "." if tower else ""
    return {
        named + key[len(prefix) :]: tuple(tensor.shape)
        for key, tensor in module.state_dict().items()
        if key[len(prefix) :] not in skip
    }


def module_names(tensors: Mapping[str, Any], module: torch.nn.Module, tower: str) -> dict[str, Any]:
    """Tensors named ``{tower}.*`` as checkpoints are, renamed to ``module``'s own state-dict names.

    >>> module_names({"head.weight": 0}, torch.nn.Linear(2, 3), "head")
    {'weight': 0}
    """
    prefix = tower_prefix(module, tower)
    return {prefix + key.removeprefix(tower + "."): tensor for key, tensor in tensors.items()}
