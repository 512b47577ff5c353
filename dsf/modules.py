"""Third-party ``nn.Module``s (transformers text encoders) as pure functions over their param trees.

``pure_module(module)`` returns ``(apply, params)``: ``params`` is the module's parameters and
buffers as a nested tree (keys mirror its ``state_dict``), and ``apply(params, *args, **kwargs)``
runs the module with exactly those tensors through ``torch.func.functional_call``. The module
object only supplies the code; every tensor comes from ``params``, so transforms and gradients
treat a text encoder like any dsf model.

Example:
    >>> import torch
    >>> from dsf.modules import pure_module
    >>> apply, params = pure_module(torch.nn.Linear(2, 3))
    >>> sorted(params)
    ['bias', 'weight']
    >>> apply({"weight": torch.zeros(3, 2), "bias": torch.ones(3)}, torch.ones(1, 2)).tolist()
    [[1.0, 1.0, 1.0]]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call

from dsf.tree import flatten_dict, unflatten_dict
from dsf.weight import dense_tree


def module_params(module: torch.nn.Module) -> dict:
    """The parameters and buffers of ``module`` as a detached nested tree."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return unflatten_dict({name: t.detach() for name, t in tensors.items()})


def pure_module(module: torch.nn.Module) -> tuple[Callable, dict]:
    """``(apply, params)`` for a module; ``apply(params, *args, **kwargs)`` calls it with ``params``."""
    module.eval()

    def apply(params, *args, **kwargs):
        flat = flatten_dict(dense_tree(params))
        return functional_call(module, flat, args, kwargs, strict=True)

    return apply, module_params(module)
