"""The Z-Image DiT (S3-DiT, single stream) as a pure function of a parameter tree in the diffusers key layout.

Latents (B, 16, H, W) are cut into 2×2 patches and embedded; caption states are RMS-normed and
embedded. Each sequence is padded per sample to a multiple of 32 with a learned pad token
(``x_pad_token``, ``cap_pad_token``; the model attends to them). Image tokens run through the
modulated ``noise_refiner`` blocks, caption tokens through the unmodulated ``context_refiner``
blocks, then ``[image; caption]`` through the modulated ``layers``. Blocks have sandwich RMS norms
around attention and the SwiGLU MLP and are modulated by the embedded ``(1 − σ)·t_scale`` (a scale
``1 + s`` and a ``tanh`` gate each, no shift). Rotary positions: caption token j at (1 + j, 0, 0),
image token at (padded caption length + 1, row, col), image padding at (0, 0, 0).

The network predicts x0 − noise; :func:`apply` returns its negation, the velocity of the FLUX.1
convention ``x_next = x + (σ_next − σ)·v``.

Example:
    >>> import torch, dsf
    >>> cfg = ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=8,
    ...                    axes_dims=(4, 6, 6))
    >>> params = init_dit(cfg, dsf.random.key(0))
    >>> ZImageDiT(cfg)(params, torch.randn(2, 16, 4, 6), torch.tensor([0.5, 1.0]), text_embeds=torch.randn(2, 3, 8),
    ...                text_mask=torch.tensor([[True, True, True], [True, False, False]])).shape
    torch.Size([2, 16, 4, 6])
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
from dsf.weight import dense
from dsf.models.z_image.config import PATCH, SEQ_MULTIPLE, TIMESTEP_FEATURES, TIMESTEP_MID, ZImageConfig

PATCH_KEY = f"{PATCH}-1"  # diffusers' name of the 2×2, one-frame patch embedder and final layer
QK_NORM_EPS = 1e-5  # diffusers' Attention fixes the q/k RMS-norm eps
FINAL_NORM_EPS = 1e-6


def _linear_shapes(name: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, tuple]:
    return {f"{name}.weight": (out_dim, in_dim), **({f"{name}.bias": (out_dim,)} if bias else {})}


def _block_shapes(prefix: str, config: ZImageConfig, modulated: bool) -> dict[str, tuple]:
    h, mlp = config.hidden_size, config.mlp_hidden_size
    shapes = {}
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        shapes |= _linear_shapes(f"{prefix}attention.{name}", h, h, bias=False)
    shapes |= {f"{prefix}attention.norm_q.weight": (config.head_dim,), f"{prefix}attention.norm_k.weight": (config.head_dim,)}
    shapes |= _linear_shapes(f"{prefix}feed_forward.w1", mlp, h, bias=False) | _linear_shapes(f"{prefix}feed_forward.w3", mlp, h, bias=False)
    shapes |= _linear_shapes(f"{prefix}feed_forward.w2", h, mlp, bias=False)
    shapes |= {f"{prefix}{norm}.weight": (h,) for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")}
    return shapes | (_linear_shapes(f"{prefix}adaLN_modulation.0", 4 * h, config.adaln_dim) if modulated else {})


def param_shapes(config: ZImageConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers layout.

    >>> param_shapes(ZImageConfig())["layers.0.feed_forward.w1.weight"]
    (10240, 3840)
    """
    h = config.hidden_size
    shapes = _linear_shapes(f"all_x_embedder.{PATCH_KEY}", h, config.patch_channels)
    shapes |= _linear_shapes(f"all_final_layer.{PATCH_KEY}.linear", config.patch_channels, h)
    shapes |= _linear_shapes(f"all_final_layer.{PATCH_KEY}.adaLN_modulation.1", h, config.adaln_dim)
    for i in range(config.num_refiner_layers):
        shapes |= _block_shapes(f"noise_refiner.{i}.", config, modulated=True)
    for i in range(config.num_refiner_layers):
        shapes |= _block_shapes(f"context_refiner.{i}.", config, modulated=False)
    shapes |= _linear_shapes("t_embedder.mlp.0", TIMESTEP_MID, TIMESTEP_FEATURES)
    shapes |= _linear_shapes("t_embedder.mlp.2", config.adaln_dim, TIMESTEP_MID)
    shapes |= {"cap_embedder.0.weight": (config.cap_feat_dim,)} | _linear_shapes("cap_embedder.1", h, config.cap_feat_dim)
    shapes |= {"x_pad_token": (1, h), "cap_pad_token": (1, h)}
    for i in range(config.num_layers):
        shapes |= _block_shapes(f"layers.{i}.", config, modulated=True)
    return shapes


def dit_params_meta(config: ZImageConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> round(dsf.tree.num_params(dit_params_meta(ZImageConfig())) / 1e9, 3)
    6.155
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_dit(config: ZImageConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: weights and pad tokens N(0, 0.02²), zero biases, unit norm scales.

    >>> params = init_dit(ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=0, cap_feat_dim=8,
    ...                                axes_dims=(4, 6, 6)), dsf.random.key(0))
    >>> params["layers"][0]["attention"]["norm_q"]["weight"].tolist() == [1.0] * 16
    True
    """
    shapes = param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if len(shape) == 2:
            flat[name] = normal(name_key, shape, std=0.02, dtype=dtype)
        elif name.endswith(".weight"):  # the 1-D weights are norm scales
            flat[name] = torch.ones(shape, dtype=dtype)
        else:
            flat[name] = torch.zeros(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) -> image tokens (B, H/2·W/2, 4·C), row-major over the patch grid, each patch
    ordered (row in patch, column in patch, channel) as diffusers' Z-Image orders it.

    >>> patchify(torch.zeros(1, 16, 4, 6)).shape
    torch.Size([1, 6, 64])
    """
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=PATCH, pw=PATCH)  # (B, H/2·W/2, 4·C)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image tokens (B, H/2·W/2, 4·C) -> latents (B, C, H, W); the inverse of :func:`patchify`.

    >>> x = torch.randn(1, 16, 4, 6)
    >>> bool((unpatchify(patchify(x), 4, 6) == x).all())
    True
    """
    return rearrange(tokens, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=height // PATCH, ph=PATCH, pw=PATCH)  # (B, C, H, W)


def padded_length(length: torch.Tensor | int):
    """``length`` rounded up to a multiple of 32, the sequence lengths the model runs.

    >>> padded_length(1), padded_length(32), padded_length(torch.tensor([33, 64])).tolist()
    (32, 32, [64, 64])
    """
    return (length + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE


def caption_positions(length: int, device=None) -> torch.Tensor:
    """RoPE positions (length, 3) of caption tokens: (1 + j, 0, 0).

    >>> caption_positions(2).tolist()
    [[1, 0, 0], [2, 0, 0]]
    """
    index = torch.arange(1, length + 1, device=device)
    return torch.stack([index, torch.zeros_like(index), torch.zeros_like(index)], dim=-1)


def image_positions(caption_lengths: torch.Tensor, grid_height: int, grid_width: int, padded: int) -> torch.Tensor:
    """RoPE positions (B, padded, 3) of image tokens: (padded caption length + 1, row, col), then (0, 0, 0) for the
    pad tokens up to ``padded``; ``caption_lengths`` (B,) are the padded caption lengths.

    >>> image_positions(torch.tensor([32]), 1, 2, 3).tolist()
    [[[33, 0, 0], [33, 0, 1], [0, 0, 0]]]
    """
    rows, cols = torch.meshgrid(torch.arange(grid_height, device=caption_lengths.device),
                                torch.arange(grid_width, device=caption_lengths.device), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(1, -1, 3)  # (1, N, 3)
    grid = grid + F.pad(caption_lengths[:, None, None] + 1, (0, 2))  # (B, N, 3): the caption offset on axis 0
    return F.pad(grid, (0, 0, 0, padded - grid.shape[1]))


def _with_pad_token(tokens: torch.Tensor, valid: torch.Tensor, pad_token) -> torch.Tensor:
    """``tokens`` (B, S, D) with the rows where ``valid`` (B, S) is False replaced by ``pad_token`` (1, D)."""
    return torch.where(valid[..., None], tokens, dense(pad_token).to(tokens.dtype))


def _key_mask(lengths: torch.Tensor, size: int) -> torch.Tensor | None:
    """Attention mask (B, 1, 1, size), True on the first ``lengths`` keys; ``None`` when every sample uses all."""
    if bool((lengths == size).all()):
        return None
    return (torch.arange(size, device=lengths.device) < lengths[:, None])[:, None, None, :]


def _attention(p: dict, x: torch.Tensor, rope, mask, heads: int) -> torch.Tensor:
    q, k, v = (rearrange(ops.linear(x, p[name]["weight"]), "b s (h d) -> b s h d", h=heads)  # (B, S, H, D)
               for name in ("to_q", "to_k", "to_v"))
    q, k = ops.rms_norm(q, p["norm_q"]["weight"], QK_NORM_EPS), ops.rms_norm(k, p["norm_k"]["weight"], QK_NORM_EPS)
    cos, sin = (angles[:, :, None] for angles in rope)  # (B or 1, S, 1, D): broadcast over heads
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))  # (B, H, S, D)
    out = rearrange(ops.attention(q, k, v, mask=mask, layout="b h s d"), "b h s d -> b s (h d)")  # (B, S, H·D)
    return ops.linear(out, p["to_out"][0]["weight"])


def _feed_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(F.silu(ops.linear(x, p["w1"]["weight"])) * ops.linear(x, p["w3"]["weight"]), p["w2"]["weight"])


def _times(value: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return value if factor is None else value * factor


def _block(p: dict, x: torch.Tensor, adaln: torch.Tensor | None, rope, mask, *, heads: int, eps: float) -> torch.Tensor:
    """One transformer block; ``adaln`` (B, adaln_dim) modulates it, ``None`` for the unmodulated context refiner."""

    def norm(name: str, value: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(value, p[name]["weight"], eps)

    scale_attn = gate_attn = scale_mlp = gate_mlp = None
    if adaln is not None:
        scale_attn, gate_attn, scale_mlp, gate_mlp = ops.linear(adaln, **p["adaLN_modulation"][0])[:, None].chunk(4, dim=-1)
        scale_attn, scale_mlp, gate_attn, gate_mlp = 1 + scale_attn, 1 + scale_mlp, gate_attn.tanh(), gate_mlp.tanh()
    attended = _attention(p["attention"], _times(norm("attention_norm1", x), scale_attn), rope, mask, heads)
    x = x + _times(norm("attention_norm2", attended), gate_attn)
    return x + _times(norm("ffn_norm2", _feed_forward(p["feed_forward"], _times(norm("ffn_norm1", x), scale_mlp))), gate_mlp)


def _timestep_embedding(p: dict, timestep: torch.Tensor, config: ZImageConfig, dtype: torch.dtype) -> torch.Tensor:
    """The modulation input (B, adaln_dim) of flow-matching times σ: the network is fed (1 − σ)·t_scale."""
    t = (1 - timestep.float()) * config.t_scale
    features = ops.timestep_embedding(t, TIMESTEP_FEATURES, flip_sin_to_cos=True, downscale_freq_shift=0).to(dtype)
    return ops.linear(F.silu(ops.linear(features, **p["mlp"]["0"])), **p["mlp"]["2"])


def _final_layer(p: dict, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
    scale = 1 + ops.linear(F.silu(adaln), **p["adaLN_modulation"]["1"])
    return ops.linear(ops.layer_norm(x, eps=FINAL_NORM_EPS) * scale[:, None], **p["linear"])


def caption_lengths(text_embeds: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Valid caption tokens per sample (B,), from a mask that is True on the valid tokens, which come first.

    >>> caption_lengths(torch.zeros(2, 3, 4), torch.tensor([[True, True, False], [True, True, True]])).tolist()
    [2, 3]
    """
    batch, length = text_embeds.shape[:2]
    if text_mask is None:
        return torch.full((batch,), length, device=text_embeds.device)
    lengths = text_mask.sum(dim=1)
    if not bool((text_mask.bool() == (torch.arange(length, device=text_mask.device) < lengths[:, None])).all()):
        raise ValueError("text_mask must be True on the valid tokens and the valid tokens must come first "
                         "(zero padding at the end, as tokenizers pad on the right)")
    if bool((lengths == 0).any()):
        raise ValueError("a sample's text_mask has no valid token; encode at least the chat template of an empty prompt")
    return lengths


def check_inputs(config: ZImageConfig, latents, timestep, text_embeds, text_mask) -> None:
    """Raise a ValueError naming the offending input and the fix when inputs do not fit ``config``.

    >>> check_inputs(ZImageConfig(), torch.zeros(1, 16, 3, 4), torch.zeros(1), torch.zeros(1, 2, 2560), None)
    Traceback (most recent call last):
    ...
    ValueError: latents height 3 and width 4 must both be even (Z-Image cuts 2×2 patches): use an image size divisible by 16
    """
    if not fits(latents, (None, config.in_channels, None, None)):
        raise ValueError(f"latents have shape {shape_of(latents)}; this Z-Image model takes VAE latents "
                         f"(B, {config.in_channels}, H, W)")
    batch, _, height, width = latents.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"latents height {height} and width {width} must both be even (Z-Image cuts 2×2 patches): "
                         "use an image size divisible by 16")
    if height // PATCH > config.axes_lens[1] or width // PATCH > config.axes_lens[2]:
        raise ValueError(f"latents {height}×{width} give a {height // PATCH}×{width // PATCH} patch grid, beyond the "
                         f"RoPE table of {config.axes_lens[1]}×{config.axes_lens[2]} (axes_lens): use a smaller image")
    check_conditioning_shapes(latents, {
        "timestep": (timestep, (batch,), "one flow-matching σ in [0, 1] per sample"),
        "text_embeds": (text_embeds, (batch, None, config.cap_feat_dim), "text-encoder states, zero-padded"),
    })
    check_conditioning_shapes(latents, {"text_mask": (text_mask, (batch, text_embeds.shape[1]), "True on valid tokens")})
    if padded_length(text_embeds.shape[1]) + 1 > config.axes_lens[0]:
        raise ValueError(f"text_embeds hold {text_embeds.shape[1]} tokens; with padding and the image offset the caption "
                         f"axis needs positions up to {padded_length(text_embeds.shape[1]) + 1}, beyond axes_lens[0] "
                         f"{config.axes_lens[0]}: pass at most {config.axes_lens[0] - SEQ_MULTIPLE} tokens")


def apply(params: dict, latents, timestep, text_embeds, text_mask=None, *, config: ZImageConfig) -> torch.Tensor:
    """The velocity (B, C, H, W) predicted for ``latents`` at flow-matching times ``timestep`` (B,) in [0, 1].

    ``text_embeds`` (B, L, cap_feat_dim) zero-padded text-encoder states, ``text_mask`` (B, L) True on the valid
    tokens (which come first), or ``None`` when all are valid. Each sample's padding is dropped and its caption
    re-padded to a multiple of 32 with the learned pad token, as diffusers does. Computes in ``latents.dtype``.

    >>> cfg = ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=8,
    ...                    axes_dims=(4, 6, 6))
    >>> apply(init_dit(cfg, dsf.random.key(0)), torch.randn(1, 16, 2, 2), torch.rand(1), torch.randn(1, 3, 8),
    ...       config=cfg).shape
    torch.Size([1, 16, 2, 2])
    """
    check_inputs(config, latents, timestep, text_embeds, text_mask)
    dtype, device, (height, width) = latents.dtype, latents.device, latents.shape[-2:]
    cap_lengths = caption_lengths(text_embeds, text_mask)
    cap_padded = padded_length(cap_lengths)  # (B,)
    cap_size = int(cap_padded.max())
    adaln = _timestep_embedding(params["t_embedder"], timestep, config, dtype)
    block_options = dict(heads=config.num_heads, eps=config.norm_eps)

    image = ops.linear(patchify(latents), **params["all_x_embedder"][PATCH_KEY])  # (B, N, D)
    image_len = image.shape[1]
    image_size = padded_length(image_len)
    image = _with_pad_token(F.pad(image, (0, 0, 0, image_size - image_len)),
                            (torch.arange(image_size, device=device) < image_len).expand(image.shape[0], -1),
                            params["x_pad_token"])
    image_rope = ops.rope_frequencies(image_positions(cap_padded, height // PATCH, width // PATCH, image_size),
                                      config.axes_dims, config.rope_theta)
    image = dsf.run_blocks(_block, params.get("noise_refiner", []), image, adaln, image_rope, None, **block_options)

    cap_norm, cap_linear = params["cap_embedder"]
    caption = ops.linear(ops.rms_norm(text_embeds.to(dtype), cap_norm["weight"], config.norm_eps), **cap_linear)
    caption = F.pad(caption, (0, 0, 0, max(cap_size - caption.shape[1], 0)))[:, :cap_size]  # (B, cap_size, D)
    index = torch.arange(cap_size, device=device)
    caption = _with_pad_token(caption, index < cap_lengths[:, None], params["cap_pad_token"])
    caption = torch.where((index < cap_padded[:, None])[..., None], caption, 0)
    cap_rope = tuple(angles[None] for angles in ops.rope_frequencies(caption_positions(cap_size, device), config.axes_dims,
                                                                     config.rope_theta))
    caption = dsf.run_blocks(_block, params.get("context_refiner", []), caption, None, cap_rope,
                             _key_mask(cap_padded, cap_size), **block_options)

    joint = torch.cat([image, caption], dim=1)  # (B, image_size + cap_size, D): per sample [image; caption], then padding
    joint_rope = tuple(torch.cat([a, b.expand(a.shape[0], -1, -1)], dim=1) for a, b in zip(image_rope, cap_rope))
    joint = dsf.run_blocks(_block, params.get("layers", []), joint, adaln, joint_rope,
                           _key_mask(image_size + cap_padded, joint.shape[1]), **block_options)
    out = _final_layer(params["all_final_layer"][PATCH_KEY], joint[:, :image_len], adaln)
    return -unpatchify(out, height, width)


@dataclass(frozen=True)
class ZImageDiT:
    """A Z-Image DiT: its config and :func:`apply` as a call, ``dit(params, latents, timestep, text_embeds, text_mask)``.

    >>> ZImageDiT(ZImageConfig()).config.num_layers
    30
    """

    config: ZImageConfig

    def __call__(self, params: dict, latents, timestep, text_embeds, text_mask=None) -> torch.Tensor:
        return apply(params, latents, timestep, text_embeds, text_mask, config=self.config)
