"""The Qwen-Image DiT as a pure function of a parameter tree in the diffusers key layout.

Latents (B, 16, H, W) are cut into 2×2 patches and embedded; the text states are RMS-normed and
embedded; both streams run through the dual-stream MMDiT blocks (separate weights per stream,
joint attention over ``[text; image]`` with padded text tokens masked out), each stream modulated
(adaLN-zero, 6 vectors) by the timestep embedding of σ·1000. Rotary positions are 3-axis
(frame, row, column): image rows and columns centred on the grid (``scale_rope``), text positions
``p, p, p`` from ``max(h/2, w/2)`` on. Edit models append the latents of reference images to the
image tokens (frame index 1, 2, ...); Edit-2511 (``zero_cond_t``) modulates those at t = 0.

Example:
    >>> import torch, dsf
    >>> cfg = QwenImageConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1, context_dim=8)
    >>> params = init_dit(cfg, dsf.random.key(0))
    >>> dit = QwenImageDiT(cfg)
    >>> dit(params, torch.randn(1, 16, 4, 6), torch.tensor([0.5]), text_embeds=torch.randn(1, 3, 8)).shape
    torch.Size([1, 16, 4, 6])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import transformer_params
from dsf.model_parts.input_checks import check_conditioning_shapes, fits, shape_of
from dsf.random import Key
from dsf.models.qwen_image.config import ROPE_THETA, TIMESTEP_FEATURES, QwenImageConfig

NORM_EPS = 1e-6
_BLOCK_LINEARS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")


def _linear_shapes(name: str, out_dim: int, in_dim: int) -> dict[str, tuple]:
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def _block_shapes(prefix: str, config: QwenImageConfig) -> dict[str, tuple]:
    h, mlp, d = config.hidden_size, config.mlp_hidden_size, config.head_dim
    shapes = _linear_shapes(f"{prefix}img_mod.1", 6 * h, h) | _linear_shapes(f"{prefix}txt_mod.1", 6 * h, h)
    for name in _BLOCK_LINEARS:
        shapes |= _linear_shapes(f"{prefix}attn.{name}", h, h)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        shapes[f"{prefix}attn.{name}.weight"] = (d,)
    for name in ("img_mlp", "txt_mlp"):
        shapes |= _linear_shapes(f"{prefix}{name}.net.0.proj", mlp, h) | _linear_shapes(f"{prefix}{name}.net.2", h, mlp)
    return shapes


def param_shapes(config: QwenImageConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers layout.

    >>> param_shapes(QwenImageConfig())["txt_norm.weight"], param_shapes(QwenImageConfig())["proj_out.weight"]
    ((3584,), (64, 3072))
    """
    h = config.hidden_size
    shapes = _linear_shapes("img_in", h, config.in_channels) | {"txt_norm.weight": (config.context_dim,)}
    shapes |= _linear_shapes("txt_in", h, config.context_dim)
    shapes |= _linear_shapes("time_text_embed.timestep_embedder.linear_1", h, TIMESTEP_FEATURES)
    shapes |= _linear_shapes("time_text_embed.timestep_embedder.linear_2", h, h)
    for i in range(config.num_layers):
        shapes |= _block_shapes(f"transformer_blocks.{i}.", config)
    return shapes | _linear_shapes("norm_out.linear", 2 * h, h) | _linear_shapes("proj_out", 4 * config.out_channels, h)


def dit_params_meta(config: QwenImageConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> round(dsf.tree.num_params(dit_params_meta(QwenImageConfig())) / 1e9, 2)
    20.43
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_dit(config: QwenImageConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: weights N(0, 0.02²), zero biases, unit norm scales.

    >>> params = init_dit(QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1,
    ...                                   context_dim=8), dsf.random.key(0))
    >>> params["txt_norm"]["weight"].tolist() == [1.0] * 8
    True
    """
    return dsf.tree.unflatten_dict(transformer_params(param_shapes(config), key, dtype))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) -> image tokens (B, H/2·W/2, C·4), row-major over the 2×2 patch grid.

    >>> patchify(torch.zeros(1, 16, 4, 6)).shape
    torch.Size([1, 6, 64])
    """
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # (B, H/2·W/2, C·4)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image tokens (B, H/2·W/2, C·4) -> latents (B, C, H, W); the inverse of :func:`patchify`.

    >>> x = torch.randn(1, 16, 4, 6)
    >>> bool((unpatchify(patchify(x), 4, 6) == x).all())
    True
    """
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)  # (B, C, H, W)


def _centred(size: int, device) -> torch.Tensor:
    """Positions of ``size`` rows (or columns) centred on the grid: ``-(size - size//2) … size//2 - 1``."""
    return torch.arange(size, device=device) - (size - size // 2)


def position_ids(text_len: int, grids: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """RoPE positions (text_len + Σ h·w, 3) of ``[text; image 0; image 1; …]`` for patch grids ``grids`` [(h, w), …].

    Image ``i`` has frame index ``i`` and centred rows and columns; text token ``j`` has ``s + j`` on all three
    axes, ``s = max(h//2, w//2)`` over the grids.

    >>> position_ids(1, [(2, 3)]).tolist()
    [[1.0, 1.0, 1.0], [0.0, -1.0, -2.0], [0.0, -1.0, -1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    """
    images = []
    for frame, (height, width) in enumerate(grids):
        rows, cols = torch.meshgrid(_centred(height, device), _centred(width, device), indexing="ij")
        images.append(torch.stack([torch.full_like(rows, frame), rows, cols], dim=-1).reshape(-1, 3))
    start = max(max(height // 2, width // 2) for height, width in grids)
    text = (start + torch.arange(text_len, device=device))[:, None].expand(text_len, 3)
    return torch.cat([text, *images]).float()


def _mlp_embed(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.silu(ops.linear(x, **p["linear_1"])), **p["linear_2"])


def _time_embedding(p: dict, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    features = ops.timestep_embedding(timestep.to(dtype), TIMESTEP_FEATURES, flip_sin_to_cos=True, downscale_freq_shift=0,
                                      scale=1000)
    return _mlp_embed(p["timestep_embedder"], features.to(dtype))


def _modulation(p: dict, vec: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """``parts`` modulation vectors, each (B, 1, D) to broadcast over the tokens."""
    return tuple(m[:, None] for m in ops.linear(F.silu(vec), **p).chunk(parts, dim=-1))


def _image_modulation(p: dict, vec: torch.Tensor, vec_zero: torch.Tensor | None, target_len: int, length: int):
    """The image stream's 6 modulation vectors; with ``vec_zero`` (zero_cond_t) those of the tokens after the first
    ``target_len`` (the reference images) come from the t = 0 embedding, each then (B, length, D)."""
    mods = _modulation(p, vec, 6)
    if vec_zero is None:
        return mods
    zero = _modulation(p, vec_zero, 6)
    shape = (-1, target_len, -1), (-1, length - target_len, -1)
    return tuple(torch.cat([m.expand(*shape[0]), z.expand(*shape[1])], dim=1) for m, z in zip(mods, zero))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, eps=NORM_EPS) * (1 + scale) + shift


def _feed_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.gelu(ops.linear(x, **p["net"]["0"]["proj"]), approximate="tanh"), **p["net"]["2"])


def _heads(attn: dict, x: torch.Tensor, names: tuple[str, str, str, str, str], heads: int):
    """Projected q, k, v (B, S, H, D) of one stream, q and k RMS-normed per head."""
    q_proj, k_proj, v_proj, q_norm, k_norm = names
    q, k, v = (
        rearrange(ops.linear(x, **attn[name]), "b s (h d) -> b s h d", h=heads)  # (B, S, H, D)
        for name in (q_proj, k_proj, v_proj)
    )
    return ops.rms_norm(q, attn[q_norm]["weight"], NORM_EPS), ops.rms_norm(k, attn[k_norm]["weight"], NORM_EPS), v


def _attend(q, k, v, rope, mask) -> torch.Tensor:
    """Joint attention over (B, S, H, D) heads with the rotation ``rope`` = (cos, sin), each (S, D), and the key mask."""
    cos, sin = (angles[:, None] for angles in rope)  # (S, 1, D): broadcast over heads
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))  # (B, H, S, D)
    return rearrange(ops.attention(q, k, v, mask=mask, layout="b h s d"), "b h s d -> b s (h d)")  # (B, S, H·D)


IMAGE_STREAM = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def _stream_residuals(out_proj: dict, mlp: dict, x, attn_out, gate, mlp_shift, mlp_scale, mlp_gate):
    """One stream of a block after attention: gated output projection, then the gated MLP."""
    x = x + gate * ops.linear(attn_out, **out_proj)
    return x + mlp_gate * _feed_forward(mlp, _modulate(x, mlp_shift, mlp_scale))


def _block(p: dict, carry, vec, vec_zero, rope, mask, *, heads: int, target_len: int):
    img, txt = carry
    img_mod = _image_modulation(p["img_mod"]["1"], vec, vec_zero, target_len, img.shape[1])  # attention, then MLP
    txt_mod = _modulation(p["txt_mod"]["1"], vec, 6)
    img_q, img_k, img_v = _heads(p["attn"], _modulate(img, *img_mod[:2]), IMAGE_STREAM, heads)
    txt_q, txt_k, txt_v = _heads(p["attn"], _modulate(txt, *txt_mod[:2]), TEXT_STREAM, heads)
    joint = _attend(torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1), rope, mask)
    txt_attn, img_attn = joint[:, : txt.shape[1]].contiguous(), joint[:, txt.shape[1] :].contiguous()  # addmm, not bmm
    img = _stream_residuals(p["attn"]["to_out"][0], p["img_mlp"], img, img_attn, *img_mod[2:])
    txt = _stream_residuals(p["attn"]["to_add_out"], p["txt_mlp"], txt, txt_attn, *txt_mod[2:])
    return img, txt


def _final_layer(p: dict, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    scale, shift = _modulation(p["norm_out"]["linear"], vec, 2)
    return ops.linear(_modulate(img, shift, scale), **p["proj_out"])


def _joint_mask(text_mask: torch.Tensor | None, image_len: int) -> torch.Tensor | None:
    """The key mask (B, 1, 1, L + S) of ``[text; image]``: the text mask, then every image token."""
    if text_mask is None:
        return None
    image = torch.ones(text_mask.shape[0], image_len, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image], dim=1)[:, None, None]


def check_inputs(config: QwenImageConfig, latents, timestep, text_embeds, text_mask, reference_latents) -> None:
    """Raise a ValueError naming the offending input and the fix when inputs do not fit ``config``.

    >>> check_inputs(QwenImageConfig(), torch.zeros(1, 16, 3, 4), torch.zeros(1), torch.zeros(1, 2, 3584), None, ())
    Traceback (most recent call last):
    ...
    ValueError: latents height 3 and width 4 must both be even (Qwen-Image cuts 2×2 patches): use an image size divisible by 16
    """
    for name, value in [("latents", latents), *((f"reference_latents[{i}]", r) for i, r in enumerate(reference_latents))]:
        if not fits(value, (latents.shape[0] if name != "latents" else None, config.latent_channels, None, None)):
            raise ValueError(
                f"{name} have shape {shape_of(value)}; this Qwen-Image model takes VAE latents "
                f"(B, {config.latent_channels}, H, W) (in_channels {config.in_channels} = "
                f"{config.latent_channels} channels × 2×2 patch), the same B for all"
            )
        if value.shape[-2] % 2 or value.shape[-1] % 2:
            raise ValueError(
                f"{name} height {value.shape[-2]} and width {value.shape[-1]} must both be even (Qwen-Image cuts 2×2 "
                "patches): use an image size divisible by 16"
            )
    batch = latents.shape[0]
    expected = {
        "timestep": (timestep, (batch,), "one flow-matching σ in [0, 1] per sample"),
        "text_embeds": (text_embeds, (batch, None, config.context_dim), "Qwen2.5-VL states, zero-padded"),
        "text_mask": (text_mask, (batch, text_embeds.shape[1] if text_embeds is not None else None), "True on valid tokens"),
    }
    check_conditioning_shapes(latents, expected)


def apply(params: dict, latents, timestep, text_embeds, text_mask=None, reference_latents=(), *, config: QwenImageConfig):
    """The velocity (B, C, H, W) predicted for ``latents`` at flow-matching times ``timestep`` (B,).

    ``text_embeds`` (B, L, context_dim) zero-padded, ``text_mask`` (B, L) bool, True on valid tokens (``None``: all
    valid); ``reference_latents``: the Edit models' condition images, a sequence of (B, C, h, w) latents whose
    tokens follow the image's. Computes in ``latents.dtype``.

    >>> cfg = QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1, context_dim=8)
    >>> apply(init_dit(cfg, dsf.random.key(0)), torch.randn(2, 16, 2, 2), torch.rand(2), torch.randn(2, 3, 8),
    ...       torch.tensor([[True, True, False], [True, True, True]]), config=cfg).shape
    torch.Size([2, 16, 2, 2])
    """
    reference_latents = tuple(reference_latents)
    check_inputs(config, latents, timestep, text_embeds, text_mask, reference_latents)
    dtype, (height, width) = latents.dtype, latents.shape[-2:]
    images = (latents, *(r.to(dtype) for r in reference_latents))
    img = ops.linear(torch.cat([patchify(x) for x in images], dim=1), **params["img_in"])
    txt = ops.linear(ops.rms_norm(text_embeds.to(dtype), params["txt_norm"]["weight"], NORM_EPS), **params["txt_in"])
    vec = _time_embedding(params["time_text_embed"], timestep, dtype)
    vec_zero = _time_embedding(params["time_text_embed"], timestep * 0, dtype) if config.zero_cond_t else None
    grids = [(x.shape[-2] // 2, x.shape[-1] // 2) for x in images]
    rope = ops.rope_frequencies(position_ids(txt.shape[1], grids, device=latents.device), config.axes_dims_rope, ROPE_THETA)
    mask = _joint_mask(text_mask, img.shape[1])
    target_len = grids[0][0] * grids[0][1]
    img, txt = dsf.run_blocks(_block, params.get("transformer_blocks", []), (img, txt), vec, vec_zero, rope, mask,
                              heads=config.num_heads, target_len=target_len)
    return unpatchify(_final_layer(params, img[:, :target_len], vec), height, width)


@dataclass(frozen=True)
class QwenImageDiT:
    """A Qwen-Image DiT: its config and :func:`apply` as a call, ``dit(params, latents, timestep, ...)``.

    >>> QwenImageDiT(QwenImageConfig()).config.num_layers
    60
    """

    config: QwenImageConfig

    def __call__(self, params: dict, latents, timestep, text_embeds, text_mask=None, reference_latents=()) -> torch.Tensor:
        return apply(params, latents, timestep, text_embeds, text_mask, reference_latents, config=self.config)
