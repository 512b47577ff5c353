"""The digits DiT: a single-stream diffusion transformer over [image tokens; text tokens].

Patchified pixels and projected text states attend jointly in each block; the flow-matching time σ
modulates every block through adaptive layer norm with zero-initialized gates (adaLN-zero), so a
freshly initialized model is the zero velocity field.

Example:
    >>> import torch, dsf
    >>> from dsf.models.digits import DigitsConfig, init_dit, dit_apply
    >>> cfg = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8)
    >>> params = init_dit(cfg, dsf.random.key(0))
    >>> x = torch.randn(2, 3, 16, 16)
    >>> dit_apply(params, x, torch.rand(2), torch.randn(2, 6, 8), config=cfg).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import normal, xavier_uniform
from dsf.models.digits.config import DigitsConfig
from dsf.random import Key, split


def _linear_params(key: Key, out_dim: int, in_dim: int) -> dict:
    return {"weight": xavier_uniform(key, (out_dim, in_dim)), "bias": torch.zeros(out_dim)}


def _zero_linear_params(out_dim: int, in_dim: int) -> dict:
    return {"weight": torch.zeros(out_dim, in_dim), "bias": torch.zeros(out_dim)}


def _block_params(key: Key, cfg: DigitsConfig) -> dict:
    k_qkv, k_out, k_up, k_down = split(key, 4)
    return {
        "modulation": _zero_linear_params(6 * cfg.dim, cfg.dim),
        "qkv": _linear_params(k_qkv, 3 * cfg.dim, cfg.dim),
        "out": _linear_params(k_out, cfg.dim, cfg.dim),
        "mlp_up": _linear_params(k_up, cfg.mlp_ratio * cfg.dim, cfg.dim),
        "mlp_down": _linear_params(k_down, cfg.dim, cfg.mlp_ratio * cfg.dim),
    }


def init_dit(cfg: DigitsConfig, key: Key) -> dict:
    """Fresh parameters of the digits DiT drawn from ``key``."""
    k_patch, k_pos, k_text, k_t1, k_t2, k_blocks = split(key, 6)
    patch_dim = cfg.channels * cfg.patch**2
    return {
        "patch_embed": _linear_params(k_patch, cfg.dim, patch_dim),
        "pos_embed": normal(k_pos, (cfg.tokens, cfg.dim), std=0.02),
        "text_embed": _linear_params(k_text, cfg.dim, cfg.text_dim),
        "time_embed": {
            "linear_1": _linear_params(k_t1, cfg.dim, cfg.timestep_dim),
            "linear_2": _linear_params(k_t2, cfg.dim, cfg.dim),
        },
        "blocks": [_block_params(k, cfg) for k in split(k_blocks, cfg.depth)],
        "final_modulation": _zero_linear_params(2 * cfg.dim, cfg.dim),
        "proj_out": _zero_linear_params(patch_dim, cfg.dim),
    }


def _modulate(x, shift, scale):
    return ops.layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def _block(p: dict, h: torch.Tensor, cond: torch.Tensor, heads: int) -> torch.Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = ops.linear(F.silu(cond), **p["modulation"]).chunk(6, dim=-1)
    q, k, v = ops.linear(_modulate(h, shift1, scale1), **p["qkv"]).chunk(3, dim=-1)
    h = h + gate1[:, None] * ops.linear(ops.attention(q, k, v, heads=heads), **p["out"])
    hidden = F.gelu(ops.linear(_modulate(h, shift2, scale2), **p["mlp_up"]), approximate="tanh")
    return h + gate2[:, None] * ops.linear(hidden, **p["mlp_down"])


def dit_apply(params: dict, x: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor, *, config: DigitsConfig):
    """Velocity (B, C, H, W) for images ``x`` at flow-matching times ``sigma`` (B,) given text states (B, L, text_dim)."""
    cfg = config
    if x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"digits images are (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}")
    if sigma.shape != (x.shape[0],) or text_embeds.shape[0] != x.shape[0]:
        raise ValueError(
            f"batch sizes differ: images {x.shape[0]}, sigma {tuple(sigma.shape)}, text {text_embeds.shape[0]}; pass one σ and one prompt per image"
        )
    side = cfg.image_size // cfg.patch
    patches = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=cfg.patch, q=cfg.patch)  # (B, N, C·P·P)
    img = ops.linear(patches, **params["patch_embed"]) + dsf.materialize(params["pos_embed"])
    txt = ops.linear(text_embeds.to(img.dtype), **params["text_embed"])
    t_freq = ops.timestep_embedding(sigma * 1000, cfg.timestep_dim, flip_sin_to_cos=True, downscale_freq_shift=0).to(img.dtype)
    cond = ops.linear(F.silu(ops.linear(t_freq, **params["time_embed"]["linear_1"])), **params["time_embed"]["linear_2"])
    h = torch.cat([img, txt], dim=1)
    h = dsf.run_blocks(_block, params["blocks"], h, cond, cfg.heads)
    shift, scale = ops.linear(F.silu(cond), **params["final_modulation"]).chunk(2, dim=-1)
    out = ops.linear(_modulate(h[:, : cfg.tokens], shift, scale), **params["proj_out"])
    return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=side, p=cfg.patch, q=cfg.patch)  # (B, C, H, W)
