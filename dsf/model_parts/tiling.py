"""Tiled application of an image map: overlapping square tiles, outputs blended with linear ramps.

A VAE encodes or decodes a large image tile by tile to bound memory: :func:`tiled_apply` cuts the
tiles, maps each and blends the outputs over the overlaps; :func:`check_tiling` says what is wrong
with a tile size or overlap.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch


def tile_starts(length: int, tile_size: int, tile_overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` with steps of ``tile_size − tile_overlap``; the last tile ends flush.

    >>> tile_starts(64, 32, 16), tile_starts(40, 32, 8), tile_starts(20, 32, 8)
    ([0, 16, 32], [0, 8], [0])
    """
    if length <= tile_size:
        return [0]
    return list(range(0, length - tile_size, tile_size - tile_overlap)) + [length - tile_size]


def _ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """Blend weights along one side of a tile: rising over the first ``fade_in`` entries, falling over the last ``fade_out``."""
    position = torch.arange(length, dtype=torch.float32)
    rising = ((position + 1) / (fade_in + 1)).clamp(max=1)
    falling = ((length - position) / (fade_out + 1)).clamp(max=1)
    return torch.minimum(rising, falling)


def _axis_weights(starts: list[int], index: int, tile: int, out_tile: int) -> torch.Tensor:
    """One side's ramp of tile ``index``, fading over its actual overlaps with the neighbours (output units)."""
    fade_in = starts[index - 1] + tile - starts[index] if index > 0 else 0
    fade_out = starts[index] + tile - starts[index + 1] if index + 1 < len(starts) else 0
    return _ramp(out_tile, fade_in * out_tile // tile, fade_out * out_tile // tile)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_size: int, tile_overlap: int):
    """``fn`` over overlapping square tiles of x (B, C, H, W), outputs blended with linear ramps over the overlaps.

    ``fn`` maps a (B, C, t, t) tile to (B, C', t·s, t·s) for a fixed scale s (the VAE's 1/8 or 8); the
    result is (B, C', H·s, W·s). Sides shorter than ``tile_size`` are one tile.

    >>> x = torch.randn(1, 2, 10, 7)
    >>> torch.allclose(tiled_apply(lambda t: 3 * t, x, tile_size=4, tile_overlap=2), 3 * x)
    True
    """
    height, width = x.shape[-2:]
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    rows, cols = tile_starts(height, tile_size, tile_overlap), tile_starts(width, tile_size, tile_overlap)
    total = weight = None
    for (i, top), (j, left) in itertools.product(enumerate(rows), enumerate(cols)):
        out = fn(x[..., top : top + tile_h, left : left + tile_w])
        out_h, out_w = out.shape[-2:]
        if total is None:
            total = out.new_zeros(*out.shape[:-2], height * out_h // tile_h, width * out_w // tile_w)
            weight = out.new_zeros(total.shape[-2:])
        ramp = torch.outer(_axis_weights(rows, i, tile_h, out_h), _axis_weights(cols, j, tile_w, out_w)).to(out)
        out_top, out_left = top * out_h // tile_h, left * out_w // tile_w
        region = (slice(out_top, out_top + out_h), slice(out_left, out_left + out_w))
        total[(..., *region)] += out * ramp
        weight[region] += ramp
    return total / weight


def check_tiling(tile_size: int, tile_overlap: int, multiple_of: int, unit: str) -> None:
    """Raise a ValueError naming the bad tile size or overlap and the fix.

    >>> check_tiling(100, 16, multiple_of=8, unit="pixels")
    Traceback (most recent call last):
    ...
    ValueError: tile_size 100 pixels is not a multiple of 8 (the VAE's downsampling factor): use e.g. 96 or 104
    """
    if not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap {tile_overlap} must be in [0, tile_size) = [0, {tile_size}) {unit}")
    for name, value in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
        if value % multiple_of:
            below = value - value % multiple_of
            raise ValueError(
                f"{name} {value} {unit} is not a multiple of {multiple_of} (the VAE's downsampling factor): "
                f"use e.g. {below} or {below + multiple_of}"
            )
