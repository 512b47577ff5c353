"""The FLUX.2 DiT as a pure function of a parameter tree in the diffusers key layout.

Latents (B, 128, h, w) — the VAE's 32 channels cut into 2×2 patches and normalized, one token per
position — are embedded with the text tokens and run through the double-stream blocks (separate
weights per stream, joint attention over ``[text; image]``), then the single-stream blocks over the
concatenated sequence, whose one fused projection gives q, k, v and the SwiGLU MLP input. No layer
has a bias. Unlike FLUX.1 the modulation is not per block: one vector from σ·1000 (and, for dev, the
embedded guidance·1000) is projected once into the (shift, scale, gate) sets of the double blocks'
image stream, of their text stream and of the single blocks, which every block of its kind shares.
Rotary positions have four axes (t, h, w, l): image tokens (0, row, col, 0), text tokens
(0, 0, 0, index), reference image k (10 + 10k, row, col, 0); pairs rotate interleaved.

Example:
    >>> import torch, dsf
    >>> cfg = Flux2Config(num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1,
    ...                   num_single_blocks=1, context_dim=24, guidance_embeds=False)
    >>> dit, params = Flux2DiT(cfg), init_dit(cfg, dsf.random.key(0))
    >>> dit(params, torch.randn(1, 128, 2, 3), torch.tensor([0.5]), text_embeds=torch.randn(1, 5, 24),
    ...     reference_latents=[torch.randn(1, 128, 2, 2)]).shape
    torch.Size([1, 128, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import normal
from dsf.model_parts.input_checks import check_conditioning_shapes, fits, shape_of
from dsf.random import Key, split
from dsf.models.flux2.config import Flux2Config

REFERENCE_TIME_STEP = 10  # reference image k sits at t = 10 + 10·k


def _weight(name: str, out_dim: int, in_dim: int) -> dict[str, tuple]:
    return {f"{name}.weight": (out_dim, in_dim)}


def _double_block_shapes(prefix: str, config: Flux2Config) -> dict[str, tuple]:
    h, mlp, d = config.hidden_size, config.mlp_hidden_size, config.head_dim
    shapes = {}
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        shapes |= _weight(f"{prefix}attn.{name}", h, h)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        shapes[f"{prefix}attn.{name}.weight"] = (d,)
    for name in ("ff", "ff_context"):
        shapes |= _weight(f"{prefix}{name}.linear_in", 2 * mlp, h) | _weight(f"{prefix}{name}.linear_out", h, mlp)
    return shapes


def _single_block_shapes(prefix: str, config: Flux2Config) -> dict[str, tuple]:
    h, mlp, d = config.hidden_size, config.mlp_hidden_size, config.head_dim
    shapes = _weight(f"{prefix}attn.to_qkv_mlp_proj", 3 * h + 2 * mlp, h) | _weight(f"{prefix}attn.to_out", h, h + mlp)
    return shapes | {f"{prefix}attn.norm_q.weight": (d,), f"{prefix}attn.norm_k.weight": (d,)}


def param_shapes(config: Flux2Config) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers layout.

    >>> param_shapes(Flux2Config())["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"]
    (55296, 6144)
    """
    h = config.hidden_size
    embedders = ("timestep_embedder", "guidance_embedder") if config.guidance_embeds else ("timestep_embedder",)
    shapes = {}
    for name in embedders:
        shapes |= _weight(f"time_guidance_embed.{name}.linear_1", h, config.timestep_channels)
        shapes |= _weight(f"time_guidance_embed.{name}.linear_2", h, h)
    shapes |= _weight("double_stream_modulation_img.linear", 6 * h, h) | _weight("double_stream_modulation_txt.linear", 6 * h, h)
    shapes |= _weight("single_stream_modulation.linear", 3 * h, h)
    shapes |= _weight("x_embedder", h, config.in_channels) | _weight("context_embedder", h, config.context_dim)
    for i in range(config.num_double_blocks):
        shapes |= _double_block_shapes(f"transformer_blocks.{i}.", config)
    for i in range(config.num_single_blocks):
        shapes |= _single_block_shapes(f"single_transformer_blocks.{i}.", config)
    return shapes | _weight("norm_out.linear", 2 * h, h) | _weight("proj_out", config.out_channels, h)


def dit_params_meta(config: Flux2Config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> from dsf.models.flux2.config import KLEIN_4B, KLEIN_9B
    >>> [round(dsf.tree.num_params(dit_params_meta(cfg)) / 1e9, 2) for cfg in (Flux2Config(), KLEIN_4B, KLEIN_9B)]
    [32.22, 3.88, 9.08]
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_dit(config: Flux2Config, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: weights N(0, 0.02²), unit q/k norm scales.

    >>> params = init_dit(Flux2Config(num_heads=1, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1,
    ...                               num_single_blocks=0, context_dim=8), dsf.random.key(0))
    >>> params["transformer_blocks"][0]["attn"]["norm_q"]["weight"].tolist() == [1.0] * 16
    True
    """
    shapes = param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        flat[name] = normal(name_key, shape, std=0.02, dtype=dtype) if len(shape) == 2 else torch.ones(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


def _grid_ids(time: int, height: int, width: int, device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(rows, time), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(-1, 4)  # (h·w, 4), row-major


def position_ids(text_len: int, grid: tuple[int, int], reference_grids: Sequence[tuple[int, int]] = (), device=None):
    """RoPE positions (text_len + h·w + Σ h_k·w_k, 4) of ``[text; image; references]`` tokens.

    Text token i is (0, 0, 0, i), image token (0, row, col, 0), reference image k's (10 + 10k, row, col, 0).

    >>> position_ids(2, (1, 2), [(1, 1)]).tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [10.0, 0.0, 0.0, 0.0]]
    """
    text = torch.zeros(text_len, 4, dtype=torch.long, device=device)
    text[:, 3] = torch.arange(text_len, device=device)
    images = [_grid_ids(0, *grid, device)]
    images += [_grid_ids(REFERENCE_TIME_STEP * (k + 1), *ref, device) for k, ref in enumerate(reference_grids)]
    return torch.cat([text, *images]).float()


def _tokens(latents: torch.Tensor) -> torch.Tensor:
    return rearrange(latents, "b c h w -> b (h w) c")  # (B, h·w, C)


def _embed(p: dict, values: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    features = ops.timestep_embedding(values.to(dtype) * 1000, channels, flip_sin_to_cos=True, downscale_freq_shift=0)
    return ops.linear(F.silu(ops.linear(features.to(dtype), p["linear_1"]["weight"])), p["linear_2"]["weight"])


def _conditioning(p: dict, timestep, guidance, channels: int, dtype) -> torch.Tensor:
    vec = _embed(p["timestep_embedder"], timestep, channels, dtype)
    return vec if guidance is None else vec + _embed(p["guidance_embedder"], guidance, channels, dtype)


def _modulation(p: dict, vec: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """``parts`` tensors (B, 1, hidden) of the shared modulation ``p`` (shift, scale, gate, ...) for a sequence."""
    return tuple(part[:, None] for part in ops.linear(F.silu(vec), p["linear"]["weight"]).chunk(parts, dim=-1))


def _modulate(x: torch.Tensor, shift, scale, eps: float) -> torch.Tensor:
    return ops.layer_norm(x, eps=eps) * (1 + scale) + shift


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def _qk_normed(attn: dict, q, k, v, names: tuple[str, str], heads: int, eps: float):
    """q, k, v (B, S, H, D) from their (B, S, H·D) projections, q and k RMS-normed per head."""
    q, k, v = (rearrange(t, "b s (h d) -> b s h d", h=heads) for t in (q, k, v))  # (B, S, H, D)
    return ops.rms_norm(q, attn[names[0]]["weight"], eps), ops.rms_norm(k, attn[names[1]]["weight"], eps), v


def _attention(q, k, v, rope) -> torch.Tensor:
    """Attention over (B, S, H, D) heads rotated by ``rope`` = (cos, sin), each (S, D); returns (B, S, H·D)."""
    cos, sin = (angles[:, None] for angles in rope)  # (S, 1, D): broadcast over heads
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))  # (B, H, S, D)
    return rearrange(ops.attention(q, k, v, layout="b h s d"), "b h s d -> b s (h d)")  # (B, S, H·D)


def _stream_heads(attn: dict, x, projections: tuple[str, str, str], norms: tuple[str, str], heads: int, eps: float):
    q, k, v = (ops.linear(x, attn[name]["weight"]) for name in projections)
    return _qk_normed(attn, q, k, v, norms, heads, eps)


def _residual_mlp(ff: dict, x, mod, eps: float) -> torch.Tensor:
    shift, scale, gate = mod
    hidden = _swiglu(ops.linear(_modulate(x, shift, scale, eps), ff["linear_in"]["weight"]))
    return x + gate * ops.linear(hidden, ff["linear_out"]["weight"])


def _double_block(p: dict, carry, img_mod, txt_mod, rope, *, heads: int, eps: float):
    img, txt = carry
    attn = p["attn"]
    img_q, img_k, img_v = _stream_heads(attn, _modulate(img, *img_mod[:2], eps), ("to_q", "to_k", "to_v"),
                                        ("norm_q", "norm_k"), heads, eps)
    txt_q, txt_k, txt_v = _stream_heads(attn, _modulate(txt, *txt_mod[:2], eps), ("add_q_proj", "add_k_proj", "add_v_proj"),
                                        ("norm_added_q", "norm_added_k"), heads, eps)
    joint = _attention(torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1), rope)
    txt_attn, img_attn = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]
    img = img + img_mod[2] * ops.linear(img_attn, attn["to_out"][0]["weight"])
    txt = txt + txt_mod[2] * ops.linear(txt_attn, attn["to_add_out"]["weight"])
    return _residual_mlp(p["ff"], img, img_mod[3:], eps), _residual_mlp(p["ff_context"], txt, txt_mod[3:], eps)


def _single_block(p: dict, x, mod, rope, *, heads: int, eps: float):
    shift, scale, gate = mod
    attn = p["attn"]
    fused = ops.linear(_modulate(x, shift, scale, eps), attn["to_qkv_mlp_proj"]["weight"])
    width = heads * attn["norm_q"]["weight"].shape[0]
    q, k, v, mlp_in = fused.split([width, width, width, fused.shape[-1] - 3 * width], dim=-1)
    out = torch.cat([_attention(*_qk_normed(attn, q, k, v, ("norm_q", "norm_k"), heads, eps), rope), _swiglu(mlp_in)], -1)
    return x + gate * ops.linear(out, attn["to_out"]["weight"])


def check_inputs(config: Flux2Config, latents, timestep, text_embeds, guidance, reference_latents) -> None:
    """Raise a ValueError naming the offending input and the fix when inputs do not fit ``config``.

    >>> from dsf.models.flux2.config import KLEIN_4B
    >>> check_inputs(KLEIN_4B, torch.zeros(1, 128, 4, 4), torch.zeros(1), torch.zeros(1, 3, 7680), torch.ones(1), [])
    Traceback (most recent call last):
    ...
    ValueError: this FLUX.2 model has no guidance embedder (klein): pass guidance=None (use classifier-free guidance over two calls to guide it)
    """
    for name, tensor in [("latents", latents)] + [(f"reference_latents[{k}]", r) for k, r in enumerate(reference_latents)]:
        if not fits(tensor, (None, config.in_channels, None, None)):
            raise ValueError(
                f"{name} have shape {shape_of(tensor)}; this FLUX.2 model takes the pipeline's latents "
                f"(B, {config.in_channels}, H/16, W/16): 32 VAE channels × 2×2 patch, normalized (flux2 VAE encode)"
            )
    batch = latents.shape[0]
    if config.guidance_embeds and guidance is None:
        raise ValueError(
            f"this FLUX.2 model is guidance-distilled (dev): pass guidance=torch.full(({batch},), 4.0), the embedded guidance scale"
        )
    if not config.guidance_embeds and guidance is not None:
        raise ValueError(
            "this FLUX.2 model has no guidance embedder (klein): pass guidance=None "
            "(use classifier-free guidance over two calls to guide it)"
        )
    expected = {
        "timestep": (timestep, (batch,), "one flow-matching σ in [0, 1] per sample"),
        "text_embeds": (text_embeds, (batch, None, config.context_dim), "stacked text-encoder layers"),
        "guidance": (guidance, (batch,), "one embedded guidance scale per sample"),
    }
    expected |= {f"reference_latents[{k}]": (r, (batch, config.in_channels, None, None), "one reference latent per sample")
                 for k, r in enumerate(reference_latents)}
    check_conditioning_shapes(latents, expected)


def apply(params: dict, latents, timestep, text_embeds, guidance=None, *, reference_latents: Sequence = (),
          config: Flux2Config) -> torch.Tensor:
    """The velocity (B, 128, h, w) predicted for ``latents`` at flow-matching times ``timestep`` (B,).

    ``latents`` are the pipeline's normalized patchified latents, ``text_embeds`` (B, L, context_dim) the
    stacked text-encoder layers (no mask: padding tokens are attended, as in the reference), ``guidance``
    (B,) the raw embedded guidance scale (dev) or ``None`` (klein), ``reference_latents`` a list of
    (B, 128, h_k, w_k) latents of reference images (editing), attended as extra tokens. Computes in
    ``latents.dtype``.

    >>> cfg = Flux2Config(num_heads=1, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1,
    ...                   num_single_blocks=1, context_dim=8)
    >>> apply(init_dit(cfg, dsf.random.key(0)), torch.randn(2, 128, 2, 2), torch.rand(2), torch.randn(2, 3, 8),
    ...       torch.full((2,), 4.0), config=cfg).shape
    torch.Size([2, 128, 2, 2])
    """
    reference_latents = list(reference_latents)
    check_inputs(config, latents, timestep, text_embeds, guidance, reference_latents)
    dtype, (height, width) = latents.dtype, latents.shape[-2:]
    image = torch.cat([_tokens(x.to(dtype)) for x in [latents, *reference_latents]], dim=1)
    img = ops.linear(image, params["x_embedder"]["weight"])
    txt = ops.linear(text_embeds.to(dtype), params["context_embedder"]["weight"])
    vec = _conditioning(params["time_guidance_embed"], timestep, guidance, config.timestep_channels, dtype)
    img_mod = _modulation(params["double_stream_modulation_img"], vec, 6)
    txt_mod = _modulation(params["double_stream_modulation_txt"], vec, 6)
    single_mod = _modulation(params["single_stream_modulation"], vec, 3)
    positions = position_ids(txt.shape[1], (height, width), [tuple(r.shape[-2:]) for r in reference_latents], latents.device)
    rope = ops.rope_frequencies(positions, config.axes_dims_rope, config.rope_theta)
    options = {"heads": config.num_heads, "eps": config.eps}
    double_blocks, single_blocks = params.get("transformer_blocks", []), params.get("single_transformer_blocks", [])
    img, txt = dsf.run_blocks(_double_block, double_blocks, (img, txt), img_mod, txt_mod, rope, **options)
    joint = dsf.run_blocks(_single_block, single_blocks, torch.cat([txt, img], dim=1), single_mod, rope, **options)
    out = joint[:, txt.shape[1] : txt.shape[1] + height * width]
    scale, shift = _modulation(params["norm_out"], vec, 2)
    out = ops.linear(_modulate(out, shift, scale, config.eps), params["proj_out"]["weight"])
    return rearrange(out, "b (h w) c -> b c h w", h=height)  # (B, C, h, w)


@dataclass(frozen=True)
class Flux2DiT:
    """A FLUX.2 DiT: its config and :func:`apply` as a call, ``dit(params, latents, timestep, text_embeds=...)``.

    >>> Flux2DiT(Flux2Config()).config.num_single_blocks
    48
    """

    config: Flux2Config

    def __call__(self, params: dict, latents, timestep, text_embeds, guidance=None, *, reference_latents: Sequence = ()):
        return apply(params, latents, timestep, text_embeds, guidance, reference_latents=reference_latents, config=self.config)
