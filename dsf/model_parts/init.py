"""Parameter initializers that take an explicit random key (for models trained from scratch).

Example:
    >>> import dsf
    >>> from dsf.model_parts.init import xavier_uniform
    >>> xavier_uniform(dsf.random.key(0), (4, 8)).shape
    torch.Size([4, 8])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dsf.random import Key, normal as _normal, split, uniform


def xavier_uniform(key: Key, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Glorot-uniform weights for a linear (out, in) or conv (out, in, *kernel) shape.

    >>> float(xavier_uniform(__import__("dsf").random.key(0), (2, 2)).abs().max()) <= (6 / 4) ** 0.5
    True
    """
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_out, fan_in = shape[0] * receptive, shape[1] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(key, shape, -bound, bound, dtype=dtype)


def normal(key: Key, shape: Sequence[int], std: float = 0.02, dtype=torch.float32) -> torch.Tensor:
    """Normal weights with standard deviation ``std``.

    >>> normal(__import__("dsf").random.key(0), (3,), std=0.0).tolist()
    [0.0, 0.0, 0.0]
    """
    return _normal(key, shape, dtype=dtype) * std


def transformer_params(shapes: dict[str, Sequence[int]], key: Key, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Fresh flat parameters of a transformer's ``{key: shape}``: matrices N(0, 0.02²), the other ``.weight``
    entries (norm scales) ones, the rest (biases) zeros; one key per entry, split from ``key``.

    >>> flat = transformer_params({"lin.weight": (2, 3), "lin.bias": (2,), "norm.weight": (3,)}, __import__("dsf").random.key(0))
    >>> flat["lin.bias"].tolist(), flat["norm.weight"].tolist(), tuple(flat["lin.weight"].shape)
    ([0.0, 0.0], [1.0, 1.0, 1.0], (2, 3))
    """
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if len(shape) == 2:
            flat[name] = normal(name_key, shape, std=0.02, dtype=dtype)
        else:
            flat[name] = (torch.ones if name.endswith(".weight") else torch.zeros)(shape, dtype=dtype)
    return flat
