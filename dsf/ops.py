"""Stateless neural-network operations over plain tensors and weight records.

Every op takes its weights as arguments; a weight may be a tensor, a :class:`dsf.Weight` record
(materialized here), or an adapted form such as a factored LoRA weight that defines
``linear(x, bias)``. Shape comments give the einops view of each rearrangement.

Example:
    >>> import torch
    >>> from dsf import ops
    >>> x = torch.randn(2, 5, 8)
    >>> ops.linear(x, torch.randn(4, 8)).shape
    torch.Size([2, 5, 4])
    >>> q = k = v = torch.randn(2, 5, 8)
    >>> ops.attention(q, k, v, heads=2).shape
    torch.Size([2, 5, 8])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from dsf.weight import dense, materialize


def linear(x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    """``x @ weight.T + bias``; ``weight`` (out, in) may be a record or a form with its own ``linear``.

    >>> linear(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3)).tolist()
    [[2.0, 2.0, 2.0]]
    """
    weight, bias = materialize(weight), materialize(bias)
    if hasattr(weight, "linear"):
        return weight.linear(x, bias)
    if weight.dtype != x.dtype and weight.element_size() == 1:
        raise TypeError(
            f"a linear weight {tuple(weight.shape)} is stored as {weight.dtype} (a checkpoint published in fp8) and "
            f"the input is {x.dtype}: wrap the model with dsf.transforms.fp8() to compute with it (e.g. "
            "fp8(compute_dtype=torch.bfloat16)), or cast the weights to the input's dtype"
        )
    return F.linear(x, weight, bias)


def conv2d(x, weight, bias=None, stride=1, padding=0) -> torch.Tensor:
    """2-D convolution over (B, C, H, W).

    >>> conv2d(torch.ones(1, 1, 4, 4), torch.ones(2, 1, 3, 3), padding=1).shape
    torch.Size([1, 2, 4, 4])
    """
    return F.conv2d(x, dense(weight), dense(bias), stride=stride, padding=padding)


def conv3d(x, weight, bias=None, stride=1, padding=0) -> torch.Tensor:
    """3-D convolution over (B, C, T, H, W).

    >>> conv3d(torch.ones(1, 1, 2, 4, 4), torch.ones(2, 1, 1, 3, 3), padding=(0, 1, 1)).shape
    torch.Size([1, 2, 2, 4, 4])
    """
    return F.conv3d(x, dense(weight), dense(bias), stride=stride, padding=padding)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """Layer norm over the last dimension, with optional affine weight and bias.

    >>> layer_norm(torch.tensor([[1.0, 3.0]])).round().tolist()
    [[-1.0, 1.0]]
    """
    return F.layer_norm(x, x.shape[-1:], dense(weight), dense(bias), eps)


def rms_norm(x, weight=None, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square norm over the last dimension (torch's fused kernel; statistics in float32).

    >>> rms_norm(torch.tensor([[3.0, 4.0]]), eps=0.0).mul(25 ** 0.5 / 2 ** 0.5).round().tolist()
    [[3.0, 4.0]]
    """
    weight = dense(weight)
    return F.rms_norm(x, x.shape[-1:], None if weight is None else weight.to(x.dtype), eps)


def group_norm(x, groups: int, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """Group norm over (B, C, ...) with ``groups`` channel groups.

    >>> group_norm(torch.randn(2, 4, 3, 3), groups=2).shape
    torch.Size([2, 4, 3, 3])
    """
    return F.group_norm(x, groups, dense(weight), dense(bias), eps)


def embedding(ids: torch.Tensor, table) -> torch.Tensor:
    """Rows of ``table`` (vocab, dim) at integer ``ids``.

    >>> embedding(torch.tensor([1]), torch.eye(3)).tolist()
    [[0.0, 1.0, 0.0]]
    """
    return F.embedding(ids, dense(table))


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): frequencies ``exp(-ln(max_period) i / (dim/2 - shift))``.

    ``[sin, cos]`` halves, or ``[cos, sin]`` with ``flip_sin_to_cos`` (the conventions of diffusers'
    ``get_timestep_embedding``); an odd ``dim`` is zero-padded.

    >>> timestep_embedding(torch.tensor([0.0]), 4, flip_sin_to_cos=True).tolist()
    [[1.0, 1.0, 0.0, 0.0]]
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - downscale_freq_shift)
    angles = scale * (t.float()[:, None] * torch.exp(exponent)[None, :])
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def attention(q, k, v, heads: int | None = None, mask=None, layout: str = "b s (h d)") -> torch.Tensor:
    """Scaled dot-product attention through ``F.scaled_dot_product_attention``.

    ``layout="b s (h d)"``: q, k, v are (B, S, H·D) and ``heads`` is required; the result has the
    same layout. ``layout="b h s d"``: already split into heads, result (B, H, S, D).
    ``mask``: boolean (True = attend) or additive, broadcastable to (B, H, S_q, S_k).

    >>> attention(*torch.randn(3, 1, 4, 2, 8), layout="b h s d").shape
    torch.Size([1, 4, 2, 8])
    """
    if layout == "b h s d":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if layout != "b s (h d)":
        raise ValueError(f"attention layout must be 'b s (h d)' or 'b h s d', got {layout!r}")
    if heads is None:
        raise ValueError("attention with layout 'b s (h d)' needs heads=")
    q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=heads) for t in (q, k, v))  # (B, H, S, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h s d -> b s (h d)")  # (B, S, H·D)


def rope_frequencies(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0, interleaved: bool = True):
    """Multi-axis rotary angles: positions (..., S, n_axes) -> (cos, sin), each (..., S, sum(axes_dims)).

    Axis ``i`` uses ``axes_dims[i]/2`` frequencies ``theta^(-2j/axes_dims[i])``; axes are
    concatenated. Each angle covers the two channels it rotates: adjacent pairs when
    ``interleaved`` (FLUX, Wan), the two halves otherwise (the "rotate_half" convention).

    >>> cos, sin = rope_frequencies(torch.zeros(5, 3), (4, 2, 2))
    >>> cos.shape, bool((cos == 1).all())
    (torch.Size([5, 8]), True)
    """
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axes_dims has {len(axes_dims)}: {tuple(axes_dims)}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"every RoPE axis dimension must be even, got {tuple(axes_dims)}")
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[..., axis : axis + 1].double() * freqs)
    angle = torch.cat(angles, dim=-1)
    angle = angle.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angle, angle], dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dimension of x (..., S, D) by :func:`rope_frequencies` angles (S, D), in float32.

    ``interleaved=True`` rotates pairs (x0, x1), (x2, x3), ... (FLUX, Wan); ``False`` rotates the
    two halves (x_i, x_{i+D/2}); use the same flag as for the frequencies.

    >>> x = torch.tensor([[1.0, 0.0]])
    >>> apply_rope(x, torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])).tolist()
    [[0.0, 1.0]]
    """
    x32 = x.float()
    if interleaved:  # each pair (x0, x1) as the complex x0 + i·x1, times cos + i·sin: one product, 3× faster on CPU
        pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)).contiguous())  # (..., D/2)
        turns = torch.complex(cos[..., ::2].float(), sin[..., ::2].float())  # (S, D/2)
        return torch.view_as_real(pairs * turns).flatten(-2).to(x.dtype)
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
