"""Explicit random keys: every draw of noise, timesteps or initial weights takes a key.

A key is a 64-bit integer wrapped in a frozen record. ``split`` and ``fold_in`` derive new keys with
the SplitMix64 mixer, so the same seed gives the same numbers on every run; draws go through a CPU
``torch.Generator`` (then move to the target device), so results are bit-for-bit reproducible on CPU
and independent of the device the caller computes on.

Example:
    >>> import dsf
    >>> k = dsf.random.key(0)
    >>> noise_key, step_key = dsf.random.split(k)
    >>> x = dsf.random.normal(noise_key, (2, 4))
    >>> bool((x == dsf.random.normal(noise_key, (2, 4))).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64 finalizer: a bijective scramble of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class Key:
    """A random key; derive new keys with :func:`split` or :func:`fold_in`, never reuse one for two draws."""

    value: int

    def __post_init__(self):
        if not isinstance(self.value, int) or not 0 <= self.value <= _MASK64:
            raise ValueError(f"a random key holds a 64-bit unsigned integer, got {self.value!r}")


def key(seed: int) -> Key:
    """The key of an integer seed.

    >>> key(7) == key(7)
    True
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return Key(_mix64(seed & _MASK64))


def fold_in(k: Key, data: int) -> Key:
    """A key derived from ``k`` and an integer (a step number, a sample index).

    >>> fold_in(key(0), 3) != fold_in(key(0), 4)
    True
    """
    return Key(_mix64((_mix64(k.value) + (data & _MASK64)) & _MASK64))


def split(k: Key, num: int = 2) -> tuple[Key, ...]:
    """``num`` independent keys derived from ``k``.

    >>> a, b, c = split(key(0), 3)
    >>> len({a, b, c})
    3
    """
    return tuple(Key(_mix64(k.value + _mix64(i + 1))) for i in range(num))


def generator(k: Key) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``k`` (for APIs that want one)."""
    return torch.Generator(device="cpu").manual_seed(k.value & ((1 << 63) - 1))


def normal(k: Key, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal samples drawn in float32 on the CPU, then moved and cast.

    >>> normal(key(0), (3,)).shape
    torch.Size([3])
    """
    sample = torch.randn(tuple(shape), generator=generator(k), dtype=torch.float32)
    return sample.to(device=device, dtype=dtype)


def uniform(k: Key, shape: Sequence[int], low: float = 0.0, high: float = 1.0, device=None, dtype=torch.float32):
    """Uniform samples in ``[low, high)`` drawn in float32 on the CPU, then moved and cast.

    >>> bool(((u := uniform(key(0), (100,))) >= 0).all() and (u < 1).all())
    True
    """
    sample = torch.rand(tuple(shape), generator=generator(k), dtype=torch.float32)
    return (low + (high - low) * sample).to(device=device, dtype=dtype)


def randint(k: Key, low: int, high: int, shape: Sequence[int] = (), device=None) -> torch.Tensor:
    """Integers uniform in ``[low, high)``.

    >>> int(randint(key(0), 5, 6))
    5
    """
    return torch.randint(low, high, tuple(shape), generator=generator(k)).to(device)


def permutation(k: Key, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)``.

    >>> sorted(permutation(key(1), 4).tolist())
    [0, 1, 2, 3]
    """
    return torch.randperm(n, generator=generator(k))
