"""The FLUX.1 DiT as a pure function of a parameter tree in the diffusers key layout.

Latents (B, 16, H, W) are cut into 2×2 patches, embedded, and run with the text tokens through the
double-stream blocks (separate weights per stream, joint attention over ``[text; image]``), then
through the single-stream blocks over the concatenated sequence. Every block is modulated
(adaLN-zero) by the conditioning vector built from σ·1000, the pooled CLIP embedding and, for
guidance-distilled models (dev), the guidance scale·1000. Rotary positions are (0, row, col) for
image tokens and zeros for text tokens, rotating interleaved pairs.

Example:
    >>> import torch, dsf
    >>> cfg = FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                  num_single_blocks=1, context_dim=8, pooled_dim=8)
    >>> params = init_dit(cfg, dsf.random.key(0))
    >>> dit = FluxDiT(cfg)
    >>> latents = torch.randn(1, 16, 4, 6)
    >>> dit(params, latents, torch.tensor([0.5]), text_embeds=torch.randn(1, 3, 8),
    ...     pooled_embeds=torch.randn(1, 8), guidance=torch.tensor([3.5])).shape
    torch.Size([1, 16, 4, 6])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import normal
from dsf.model_parts.input_checks import check_conditioning_shapes, fits, shape_of
from dsf.random import Key, split
from dsf.models.flux.config import TIMESTEP_FEATURES, FluxConfig

NORM_EPS = 1e-6


def _linear_shapes(name: str, out_dim: int, in_dim: int) -> dict[str, tuple]:
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def _embedder_shapes(name: str, in_dim: int, hidden: int) -> dict[str, tuple]:
    return {**_linear_shapes(f"{name}.linear_1", hidden, in_dim), **_linear_shapes(f"{name}.linear_2", hidden, hidden)}


def _double_block_shapes(prefix: str, config: FluxConfig) -> dict[str, tuple]:
    h, mlp, d = config.hidden_size, config.mlp_hidden_size, config.head_dim
    shapes = {}
    for name in ("norm1.linear", "norm1_context.linear"):
        shapes |= _linear_shapes(f"{prefix}{name}", 6 * h, h)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        shapes |= _linear_shapes(f"{prefix}attn.{name}", h, h)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        shapes[f"{prefix}attn.{name}.weight"] = (d,)
    for name in ("ff", "ff_context"):
        shapes |= _linear_shapes(f"{prefix}{name}.net.0.proj", mlp, h) | _linear_shapes(f"{prefix}{name}.net.2", h, mlp)
    return shapes


def _single_block_shapes(prefix: str, config: FluxConfig) -> dict[str, tuple]:
    h, mlp, d = config.hidden_size, config.mlp_hidden_size, config.head_dim
    shapes = _linear_shapes(f"{prefix}norm.linear", 3 * h, h)
    for name in ("to_q", "to_k", "to_v"):
        shapes |= _linear_shapes(f"{prefix}attn.{name}", h, h)
    shapes[f"{prefix}attn.norm_q.weight"] = (d,)
    shapes[f"{prefix}attn.norm_k.weight"] = (d,)
    return shapes | _linear_shapes(f"{prefix}proj_mlp", mlp, h) | _linear_shapes(f"{prefix}proj_out", h, h + mlp)


def param_shapes(config: FluxConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers layout.

    >>> param_shapes(FluxConfig())["transformer_blocks.0.attn.norm_added_q.weight"]
    (128,)
    """
    h = config.hidden_size
    shapes = _embedder_shapes("time_text_embed.timestep_embedder", TIMESTEP_FEATURES, h)
    if config.guidance_embeds:
        shapes |= _embedder_shapes("time_text_embed.guidance_embedder", TIMESTEP_FEATURES, h)
    shapes |= _embedder_shapes("time_text_embed.text_embedder", config.pooled_dim, h)
    shapes |= _linear_shapes("context_embedder", h, config.context_dim) | _linear_shapes("x_embedder", h, config.in_channels)
    for i in range(config.num_double_blocks):
        shapes |= _double_block_shapes(f"transformer_blocks.{i}.", config)
    for i in range(config.num_single_blocks):
        shapes |= _single_block_shapes(f"single_transformer_blocks.{i}.", config)
    return shapes | _linear_shapes("norm_out.linear", 2 * h, h) | _linear_shapes("proj_out", config.out_channels, h)


def dit_params_meta(config: FluxConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> round(dsf.tree.num_params(dit_params_meta(FluxConfig())) / 1e9, 2)
    11.9
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_dit(config: FluxConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: weights N(0, 0.02²), zero biases, unit q/k norm scales.

    >>> params = init_dit(FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                              num_single_blocks=0, context_dim=8, pooled_dim=8), dsf.random.key(0))
    >>> params["transformer_blocks"][0]["attn"]["norm_q"]["weight"].tolist() == [1.0] * 16
    True
    """
    shapes = param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if len(shape) == 2:
            flat[name] = normal(name_key, shape, std=0.02, dtype=dtype)
        elif name.endswith(".weight"):  # the only 1-D weights are q/k norm scales
            flat[name] = torch.ones(shape, dtype=dtype)
        else:
            flat[name] = torch.zeros(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


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


def position_ids(text_len: int, grid_height: int, grid_width: int, device=None) -> torch.Tensor:
    """RoPE positions (text_len + grid_height·grid_width, 3): zeros for text, (0, row, col) for image tokens.

    >>> position_ids(1, 2, 2).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, device=device), torch.arange(grid_width, device=device), indexing="ij"
    )
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    text = torch.zeros(text_len, 3, dtype=image.dtype, device=device)
    return torch.cat([text, image]).float()


def _mlp_embed(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.silu(ops.linear(x, **p["linear_1"])), **p["linear_2"])


def _sinusoid(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    features = ops.timestep_embedding(values.to(dtype) * 1000, TIMESTEP_FEATURES, flip_sin_to_cos=True, downscale_freq_shift=0)
    return features.to(dtype)


def _conditioning(p: dict, timestep, pooled_embeds, guidance, dtype) -> torch.Tensor:
    vec = _mlp_embed(p["timestep_embedder"], _sinusoid(timestep, dtype))
    if guidance is not None:
        vec = vec + _mlp_embed(p["guidance_embedder"], _sinusoid(guidance, dtype))
    return vec + _mlp_embed(p["text_embedder"], pooled_embeds.to(dtype))


def _modulation(p: dict, vec: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    return ops.linear(F.silu(vec), **p).chunk(parts, dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, eps=NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


def _feed_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.gelu(ops.linear(x, **p["net"]["0"]["proj"]), approximate="tanh"), **p["net"]["2"])


def _heads(attn: dict, x: torch.Tensor, names: tuple[str, str, str, str, str], heads: int):
    """Projected q, k, v (B, S, H, D) of one stream, q and k RMS-normed per head.

    Heads stay a view of the projection (no transpose) until attention, so the norms and the
    rotation run on contiguous memory."""
    q_proj, k_proj, v_proj, q_norm, k_norm = names
    q, k, v = (
        rearrange(ops.linear(x, **attn[name]), "b s (h d) -> b s h d", h=heads)  # (B, S, H, D)
        for name in (q_proj, k_proj, v_proj)
    )
    return ops.rms_norm(q, attn[q_norm]["weight"], NORM_EPS), ops.rms_norm(k, attn[k_norm]["weight"], NORM_EPS), v


def _attend(q, k, v, rope) -> torch.Tensor:
    """Joint attention over (B, S, H, D) heads with the rotation ``rope`` = (cos, sin), each (S, D)."""
    cos, sin = (angles[:, None] for angles in rope)  # (S, 1, D): broadcast over heads
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))  # (B, H, S, D)
    return rearrange(ops.attention(q, k, v, layout="b h s d"), "b h s d -> b s (h d)")  # (B, S, H·D)


IMAGE_STREAM = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def _stream_residuals(out_proj: dict, ff: dict, x, attn_out, gate, mlp_shift, mlp_scale, mlp_gate):
    """One stream of a double block after attention: gated output projection, then the gated MLP."""
    x = x + gate[:, None] * ops.linear(attn_out, **out_proj)
    return x + mlp_gate[:, None] * _feed_forward(ff, _modulate(x, mlp_shift, mlp_scale))


def _double_block(p: dict, carry, vec, rope, *, heads: int):
    img, txt = carry
    img_mod = _modulation(p["norm1"]["linear"], vec, 6)  # (shift, scale, gate) of attention, then of the MLP
    txt_mod = _modulation(p["norm1_context"]["linear"], vec, 6)
    img_q, img_k, img_v = _heads(p["attn"], _modulate(img, *img_mod[:2]), IMAGE_STREAM, heads)
    txt_q, txt_k, txt_v = _heads(p["attn"], _modulate(txt, *txt_mod[:2]), TEXT_STREAM, heads)
    joint = _attend(torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1), rope)
    txt_attn, img_attn = joint[:, : txt.shape[1]], joint[:, txt.shape[1] :]
    img = _stream_residuals(p["attn"]["to_out"][0], p["ff"], img, img_attn, *img_mod[2:])
    txt = _stream_residuals(p["attn"]["to_add_out"], p["ff_context"], txt, txt_attn, *txt_mod[2:])
    return img, txt


def _single_block(p: dict, x, vec, rope, *, heads: int):
    shift, scale, gate = _modulation(p["norm"]["linear"], vec, 3)
    normed = _modulate(x, shift, scale)
    attn = _attend(*_heads(p["attn"], normed, IMAGE_STREAM, heads), rope)
    mlp = F.gelu(ops.linear(normed, **p["proj_mlp"]), approximate="tanh")
    return x + gate[:, None] * ops.linear(torch.cat([attn, mlp], dim=-1), **p["proj_out"])


def _final_layer(p: dict, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    scale, shift = _modulation(p["norm_out"]["linear"], vec, 2)
    return ops.linear(_modulate(img, shift, scale), **p["proj_out"])


def check_inputs(config: FluxConfig, latents, timestep, text_embeds, pooled_embeds, guidance) -> None:
    """Raise a ValueError naming the offending input and the fix when inputs do not fit ``config``.

    >>> latents, text, pooled = torch.zeros(1, 16, 3, 4), torch.zeros(1, 2, 4096), torch.zeros(1, 768)
    >>> check_inputs(FluxConfig(), latents, torch.zeros(1), text, pooled, guidance=torch.ones(1))
    Traceback (most recent call last):
    ...
    ValueError: latents height 3 and width 4 must both be even (FLUX cuts 2×2 patches): use an image size divisible by 16
    """
    if not fits(latents, (None, config.latent_channels, None, None)):
        raise ValueError(
            f"latents have shape {shape_of(latents)}; this FLUX model takes VAE latents "
            f"(B, {config.latent_channels}, H, W) (in_channels {config.in_channels} = "
            f"{config.latent_channels} channels × 2×2 patch)"
        )
    batch, _, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"latents height {height} and width {width} must both be even (FLUX cuts 2×2 patches): "
            "use an image size divisible by 16"
        )
    if config.guidance_embeds and guidance is None:
        raise ValueError(
            f"this FLUX model is guidance-distilled (dev): pass guidance=torch.full(({batch},), 3.5), "
            "the distilled guidance scale"
        )
    if not config.guidance_embeds and guidance is not None:
        raise ValueError(
            "this FLUX model has no guidance embedder (schnell-like): pass guidance=None "
            "(use classifier-free guidance over two calls if you want guidance)"
        )
    expected = {
        "timestep": (timestep, (batch,), "one flow-matching σ in [0, 1] per sample"),
        "text_embeds": (text_embeds, (batch, None, config.context_dim), "T5 states"),
        "pooled_embeds": (pooled_embeds, (batch, config.pooled_dim), "pooled CLIP embeddings"),
        "guidance": (guidance, (batch,), "one distilled guidance scale per sample"),
    }
    check_conditioning_shapes(latents, expected)


def apply(params: dict, latents, timestep, text_embeds, pooled_embeds, guidance=None, *, config: FluxConfig) -> torch.Tensor:
    """The velocity (B, C, H, W) predicted for ``latents`` at flow-matching times ``timestep`` (B,).

    ``text_embeds`` (B, L, context_dim), ``pooled_embeds`` (B, pooled_dim), ``guidance`` (B,) for
    guidance-distilled models, else ``None``. Computes in ``latents.dtype``.

    >>> cfg = FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                  num_single_blocks=1, context_dim=8, pooled_dim=8, guidance_embeds=False)
    >>> apply(init_dit(cfg, dsf.random.key(0)), torch.randn(2, 16, 2, 2), torch.rand(2), torch.randn(2, 3, 8),
    ...       torch.randn(2, 8), config=cfg).shape
    torch.Size([2, 16, 2, 2])
    """
    check_inputs(config, latents, timestep, text_embeds, pooled_embeds, guidance)
    dtype, (height, width) = latents.dtype, latents.shape[-2:]
    img = ops.linear(patchify(latents), **params["x_embedder"])
    txt = ops.linear(text_embeds.to(dtype), **params["context_embedder"])
    vec = _conditioning(params["time_text_embed"], timestep, pooled_embeds, guidance, dtype)
    positions = position_ids(txt.shape[1], height // 2, width // 2, device=latents.device)
    rope = ops.rope_frequencies(positions, config.axes_dims_rope, config.rope_theta)
    double_blocks, single_blocks = params.get("transformer_blocks", []), params.get("single_transformer_blocks", [])
    img, txt = dsf.run_blocks(_double_block, double_blocks, (img, txt), vec, rope, heads=config.num_heads)
    joint = dsf.run_blocks(_single_block, single_blocks, torch.cat([txt, img], dim=1), vec, rope, heads=config.num_heads)
    img = _final_layer(params, joint[:, txt.shape[1] :], vec)
    return unpatchify(img, height, width)


@dataclass(frozen=True)
class FluxDiT:
    """A FLUX.1 DiT: its config and :func:`apply` as a call, ``dit(params, latents, timestep, ...)``.

    >>> FluxDiT(FluxConfig()).config.num_single_blocks
    38
    """

    config: FluxConfig

    def __call__(self, params: dict, latents, timestep, text_embeds, pooled_embeds, guidance=None) -> torch.Tensor:
        return apply(params, latents, timestep, text_embeds, pooled_embeds, guidance, config=self.config)
