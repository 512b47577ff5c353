"""Checks of a model's inputs, for errors that name the offending input and the fix: tensor shapes, the scalars a
user passes (finite numbers only: a NaN guidance scale would give black images without a word), and prompts.

A shape to fit is a tuple of sizes, ``None`` where any size goes (a sequence length, a batch).

Example:
    >>> import torch
    >>> fits(torch.zeros(2, 7, 8), (2, None, 8)), fits(torch.zeros(2, 8), (2, None, 8)), shape_pattern((2, None, 8))
    (True, False, '(2, L, 8)')
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch


def shape_of(value) -> tuple:
    """The shape of a tensor as a tuple; ``()`` for anything without one.

    >>> shape_of(torch.zeros(2, 3)), shape_of(None)
    ((2, 3), ())
    """
    return tuple(getattr(value, "shape", ()))


def shape_pattern(shape: tuple) -> str:
    """A shape to fit as messages show it: ``L`` where any size goes.

    >>> shape_pattern((1, None, 4096))
    '(1, L, 4096)'
    """
    return str(tuple("L" if n is None else n for n in shape)).replace("'", "")


def fits(value, shape: tuple) -> bool:
    """Whether ``value`` is a tensor of ``shape``'s rank whose sizes match it (``None`` matches any size).

    >>> fits(torch.zeros(1, 5, 8), (1, None, 8)), fits(torch.zeros(1, 5, 8), (2, None, 8)), fits([1.0], (1,))
    (True, False, False)
    """
    if not isinstance(value, torch.Tensor) or value.ndim != len(shape):
        return False
    return all(n is None or n == m for n, m in zip(shape, value.shape))


def check_conditioning_shapes(latents: torch.Tensor, expected: Mapping[str, tuple[Any, tuple, str]]) -> None:
    """Raise a ValueError for the first input that conditions ``latents`` (``expected``: ``{name: (value, shape, meaning)}``)
    that is given but does not fit its shape.

    >>> latents = torch.zeros(2, 4, 8, 8)
    >>> check_conditioning_shapes(latents, {"text_embeds": (torch.zeros(1, 7, 16), (2, None, 16), "T5 states")})
    Traceback (most recent call last):
    ...
    ValueError: text_embeds has shape (1, 7, 16) but latents of shape (2, 4, 8, 8) need a tensor text_embeds of shape (2, L, 16) (T5 states): match the batch size and widths
    """
    for name, (value, shape, meaning) in expected.items():
        if value is not None and not fits(value, shape):
            raise ValueError(
                f"{name} has shape {shape_of(value)} but latents of shape {tuple(latents.shape)} need a tensor {name} of "
                f"shape {shape_pattern(shape)} ({meaning}): match the batch size and widths"
            )


def check_finite(**scalars) -> None:
    """Raise a ValueError naming the first of ``scalars`` that is not a finite number (NaN, infinite, or no number).

    >>> check_finite(cfg_scale=3.0, steps=4)
    >>> check_finite(cfg_scale=float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: cfg_scale must be a finite number, got nan
    """
    for name, value in scalars.items():
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """``(prompts, negative prompts)`` as lists of strings: a string stands for a list of one, a string negative prompt
    for one per prompt; anything else than strings, no prompt at all, or lists of other lengths are errors.

    >>> prompt_lists("a cat", "")
    (['a cat'], [''])
    >>> prompt_lists(["a cat", None], "")
    Traceback (most recent call last):
    ...
    ValueError: prompt 1 is None; prompts are strings (use "" for no prompt)
    """
    prompts = _strings(prompt, "prompt")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else _strings(negative_prompt, "negative_prompt")
    if not prompts:
        raise ValueError("got no prompt; pass a string or a non-empty list of strings")
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; pass one per prompt or a string")
    return prompts, negatives


def _strings(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence):
        raise ValueError(f"{name} is {value!r}; pass a string or a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f'{name} {index} is {item!r}; prompts are strings (use "" for no prompt)')
    return list(value)
