"""The Wan 2.1 and 2.2 causal video VAEs as pure functions of a diffusers-layout (``AutoencoderKLWan``) param tree.

A shared model part: Wan and Qwen-Image use this network; keys and loading are in :mod:`dsf.model_parts.wan_vae_keys`.

Every temporal convolution is causal: it sees the current frame and the two before it. A video
(B, 3, T, H, W) with T = 1 + 4k is therefore encoded chunk by chunk, the first frame alone and
then 4 frames at a time, each chunk giving one latent frame; latents are decoded one latent frame
at a time (4 video frames each, 1 for the first). Between chunks only a *cache* travels: for each
temporal convolution the last frames of its input it still needs (two, or one for the strided
temporal downsampler). Memory therefore does not grow with the video's length beyond the input
and the output themselves.

A cache is a nested dict that mirrors the param tree (``{"conv_in": frames, "down_blocks": [...],
...}``); it is empty before the first chunk, which is how the first-frame rules are told apart:
the temporal downsampler lets the first frame through alone and the temporal upsampler does not
double the first latent frame.

Wan 2.2 (``is_residual=True``) adds 2×2 pixel patches and parameter-free shortcuts around each
level (:mod:`dsf.model_parts.wan_vae22`). Latents are normalized per channel, ``(μ − mean)/std``.

Example:
    >>> import torch, dsf
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1, 1), num_res_blocks=1, temperal_downsample=(True, True),
    ...                    latents_mean=(0.0, 0.0), latents_std=(1.0, 1.0))
    >>> vae, vparams = WanVAE(cfg), init_vae(cfg, dsf.random.key(0))
    >>> latents = vae.encode(vparams, torch.zeros(1, 3, 9, 8, 8))
    >>> latents.shape, vae.decode(vparams, latents).shape
    (torch.Size([1, 2, 3, 2, 2]), torch.Size([1, 3, 9, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import xavier_uniform
from dsf.model_parts.wan_vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, avg_down, dup_up, patchify, unpatchify
from dsf.model_parts.posterior import posterior_latents
from dsf.random import Key, split
from dsf.model_parts.tiling import check_tiling, tiled_apply
from dsf.weight import dense

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
CHUNK_FRAMES = 4  # video frames per encoder chunk after the first frame
ENCODE_TILE, ENCODE_OVERLAP = 256, 64  # pixels (diffusers' tile 256, stride 192)
DECODE_TILE, DECODE_OVERLAP = 32, 8  # latent pixels


@dataclass(frozen=True)
class WanVAEConfig:
    """Sizes of the video VAE, named as diffusers' ``AutoencoderKLWan`` config; the defaults are Wan 2.1's.

    ``in_channels``/``out_channels`` count the encoder's input and decoder's output channels after
    patching (12 for Wan 2.2's 2×2 patches of RGB).

    >>> WAN21_VAE_CONFIG.spatial_factor, WAN22_VAE_CONFIG.spatial_factor, WAN22_VAE_CONFIG.temporal_factor
    (8, 16, 4)
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: diffusers' spelling
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.dim_mult)
        if not levels:
            raise ValueError("dim_mult is empty: give the width multiplier of each level, e.g. (1, 2, 4, 4)")
        if len(self.temperal_downsample) != levels - 1:
            raise ValueError(
                f"temperal_downsample {self.temperal_downsample} needs one flag per downsampling level, "
                f"len(dim_mult) - 1 = {levels - 1} (Wan: (False, True, True) for dim_mult (1, 2, 4, 4))"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values but z_dim is {self.z_dim}: give one per latent "
                    f"channel (when loading, pass config={{'latents_mean': [...], 'latents_std': [...]}})"
                )
        if 0 in self.latents_std:
            raise ValueError(f"latents_std {self.latents_std} has a zero: latents would be infinite")
        patch_area = (self.patch_size or 1) ** 2
        if self.in_channels % patch_area or self.out_channels % patch_area:
            raise ValueError(
                f"in_channels {self.in_channels} and out_channels {self.out_channels} must be multiples of "
                f"patch_size² = {patch_area} (they count channels after patching: 12 for 2×2 patches of RGB)"
            )

    @property
    def spatial_factor(self) -> int:
        """Video pixels per latent pixel along each side."""
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def video_channels(self) -> int:
        """Channels of the videos encoded (before patching)."""
        return self.in_channels // (self.patch_size or 1) ** 2


WAN21_VAE_CONFIG = WanVAEConfig()
WAN22_VAE_CONFIG = WanVAEConfig(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)


def _conv_shapes(name: str, out_ch: int, in_ch: int, kernel: tuple[int, ...]) -> dict[str, tuple]:
    return {f"{name}.weight": (out_ch, in_ch, *kernel), f"{name}.bias": (out_ch,)}


def _gamma_shape(name: str, width: int, images: bool = False) -> dict[str, tuple]:
    return {f"{name}.gamma": (width, 1, 1) if images else (width, 1, 1, 1)}


def _residual_shapes(prefix: str, in_ch: int, out_ch: int) -> dict[str, tuple]:
    shapes = _gamma_shape(f"{prefix}norm1", in_ch) | _conv_shapes(f"{prefix}conv1", out_ch, in_ch, (3, 3, 3))
    shapes |= _gamma_shape(f"{prefix}norm2", out_ch) | _conv_shapes(f"{prefix}conv2", out_ch, out_ch, (3, 3, 3))
    if in_ch != out_ch:
        shapes |= _conv_shapes(f"{prefix}conv_shortcut", out_ch, in_ch, (1, 1, 1))
    return shapes


def _mid_block_shapes(prefix: str, width: int) -> dict[str, tuple]:
    shapes = _residual_shapes(f"{prefix}resnets.0.", width, width) | _residual_shapes(f"{prefix}resnets.1.", width, width)
    shapes |= _gamma_shape(f"{prefix}attentions.0.norm", width, images=True)
    shapes |= _conv_shapes(f"{prefix}attentions.0.to_qkv", 3 * width, width, (1, 1))
    return shapes | _conv_shapes(f"{prefix}attentions.0.proj", width, width, (1, 1))


def _downsampler_shapes(prefix: str, width: int, temporal: bool) -> dict[str, tuple]:
    shapes = _conv_shapes(f"{prefix}resample.1", width, width, (3, 3))
    return shapes | (_conv_shapes(f"{prefix}time_conv", width, width, (3, 1, 1)) if temporal else {})


def _upsampler_shapes(prefix: str, width: int, out_ch: int, temporal: bool) -> dict[str, tuple]:
    shapes = _conv_shapes(f"{prefix}resample.1", out_ch, width, (3, 3))
    return shapes | (_conv_shapes(f"{prefix}time_conv", 2 * width, width, (3, 1, 1)) if temporal else {})


def _encoder_shapes(config: WanVAEConfig) -> dict[str, tuple]:
    widths, last = [config.base_dim * m for m in (1, *config.dim_mult)], len(config.dim_mult) - 1
    shapes = _conv_shapes("encoder.conv_in", widths[0], config.in_channels, (3, 3, 3))
    flat_index = 0  # Wan 2.1 keeps every level's blocks in one list
    for level, (in_ch, out_ch) in enumerate(pairwise(widths)):
        for j in range(config.num_res_blocks):
            prefix = f"encoder.down_blocks.{level}.resnets.{j}." if config.is_residual else f"encoder.down_blocks.{flat_index}."
            shapes |= _residual_shapes(prefix, in_ch if j == 0 else out_ch, out_ch)
            flat_index += 1
        if level < last:
            prefix = f"encoder.down_blocks.{level}.downsampler." if config.is_residual else f"encoder.down_blocks.{flat_index}."
            shapes |= _downsampler_shapes(prefix, out_ch, config.temperal_downsample[level])
            flat_index += 1
    shapes |= _mid_block_shapes("encoder.mid_block.", widths[-1]) | _gamma_shape("encoder.norm_out", widths[-1])
    return shapes | _conv_shapes("encoder.conv_out", 2 * config.z_dim, widths[-1], (3, 3, 3))


def _decoder_shapes(config: WanVAEConfig) -> dict[str, tuple]:
    base, mult, last = config.decoder_base_dim or config.base_dim, config.dim_mult, len(config.dim_mult) - 1
    widths = [base * m for m in (mult[-1], *mult[::-1])]
    temporal_up = config.temperal_downsample[::-1]
    shapes = _conv_shapes("decoder.conv_in", widths[0], config.z_dim, (3, 3, 3)) | _mid_block_shapes("decoder.mid_block.", widths[0])
    for level, (in_ch, out_ch) in enumerate(pairwise(widths)):
        if level > 0 and not config.is_residual:  # Wan 2.1's upsamplers halve the width
            in_ch //= 2
        for j in range(config.num_res_blocks + 1):
            shapes |= _residual_shapes(f"decoder.up_blocks.{level}.resnets.{j}.", in_ch if j == 0 else out_ch, out_ch)
        if level < last:
            prefix, resampled = ("upsampler.", out_ch) if config.is_residual else ("upsamplers.0.", out_ch // 2)
            shapes |= _upsampler_shapes(f"decoder.up_blocks.{level}.{prefix}", out_ch, resampled, temporal_up[level])
    shapes |= _gamma_shape("decoder.norm_out", widths[-1])
    return shapes | _conv_shapes("decoder.conv_out", config.out_channels, widths[-1], (3, 3, 3))


def vae_param_shapes(config: WanVAEConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers ``AutoencoderKLWan`` layout.

    >>> shapes = vae_param_shapes(WAN21_VAE_CONFIG)
    >>> shapes["encoder.down_blocks.5.time_conv.weight"], shapes["decoder.up_blocks.1.upsamplers.0.resample.1.weight"]
    ((192, 192, 3, 1, 1), (192, 384, 3, 3))
    """
    shapes = _encoder_shapes(config) | _decoder_shapes(config)
    shapes |= _conv_shapes("quant_conv", 2 * config.z_dim, 2 * config.z_dim, (1, 1, 1))
    return shapes | _conv_shapes("post_quant_conv", config.z_dim, config.z_dim, (1, 1, 1))


def vae_params_meta(config: WanVAEConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> round(dsf.tree.num_params(vae_params_meta(WAN21_VAE_CONFIG)) / 1e6, 1)
    126.9
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in vae_param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_vae(config: WanVAEConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: Glorot-uniform convolution weights, zero biases, unit RMS-norm scales.

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1,), temperal_downsample=(), latents_mean=(0, 0), latents_std=(1, 1))
    >>> init_vae(cfg, dsf.random.key(0))["decoder"]["mid_block"]["attentions"][0]["to_qkv"]["weight"].shape
    torch.Size([12, 4, 1, 1])
    """
    shapes = vae_param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if name.endswith(".gamma"):
            flat[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith(".weight"):
            flat[name] = xavier_uniform(name_key, shape, dtype=dtype)
        else:
            flat[name] = torch.zeros(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


def _rms_norm(x: torch.Tensor, gamma) -> torch.Tensor:
    """Wan's RMS norm over the channels (dim 1): ``x/‖x‖·√C·γ``, the norm taken in float32."""
    normed = F.normalize(x.float(), dim=1).to(x.dtype)
    return normed * x.shape[1] ** 0.5 * dense(gamma)


def _norm_silu(p: dict, x: torch.Tensor) -> torch.Tensor:
    return F.silu(_rms_norm(x, p["gamma"]))


def _pointwise_conv(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.conv3d(x, p["weight"], p["bias"])


def _causal_conv(p: dict, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-D convolution causal in time: ``(out, context)``, fed the frames before x (zeros before the first chunk).

    The returned context is a copy of the last kernel−1 input frames, for the next chunk.
    """
    kernel_t, kernel_h = p["weight"].shape[2:4]
    if context is None:
        context = x.new_zeros(*x.shape[:2], kernel_t - 1, *x.shape[3:])
    frames = torch.cat([context, x], dim=2)
    out = ops.conv3d(frames, p["weight"], p["bias"], padding=(0, kernel_h // 2, kernel_h // 2))
    return out, frames[:, :, frames.shape[2] - (kernel_t - 1) :].clone()


def _residual_block(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    shortcut = _pointwise_conv(p["conv_shortcut"], x) if "conv_shortcut" in p else x
    h, conv1 = _causal_conv(p["conv1"], _norm_silu(p["norm1"], x), cache.get("conv1"))
    h, conv2 = _causal_conv(p["conv2"], _norm_silu(p["norm2"], h), cache.get("conv2"))
    return shortcut + h, {"conv1": conv1, "conv2": conv2}


def _self_attention(p: dict, x: torch.Tensor) -> torch.Tensor:
    """One-head self-attention over the H·W positions of each frame."""
    frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
    qkv = ops.conv2d(_rms_norm(frames, p["norm"]["gamma"]), p["to_qkv"]["weight"], p["to_qkv"]["bias"])
    q, k, v = rearrange(qkv, "n (three c) h w -> three n (h w) c", three=3)  # each (B·T, H·W, C)
    attended = rearrange(ops.attention(q, k, v, heads=1), "n (h w) c -> n c h w", h=x.shape[-2])  # (B·T, C, H, W)
    out = ops.conv2d(attended, p["proj"]["weight"], p["proj"]["bias"])
    return x + rearrange(out, "(b t) c h w -> b c t h w", b=x.shape[0])  # (B, C, T, H, W)


def _mid_block(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    caches = cache.get("resnets", ({}, {}))
    x, first = _residual_block(p["resnets"][0], x, caches[0])
    x = _self_attention(p["attentions"][0], x)
    x, second = _residual_block(p["resnets"][1], x, caches[1])
    return x, {"resnets": [first, second]}


def _per_frame_conv2d(p: dict, x: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
    out = ops.conv2d(frames, p["weight"], p["bias"], stride=stride, padding=padding)
    return rearrange(out, "(b t) c h w -> b c t h w", b=x.shape[0])  # (B, C', T, H', W')


def _downsample(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """Halve H and W (pad right/bottom, stride-2 conv); with a ``time_conv``, then halve time.

    In time the first frame passes alone; later frames go through a stride-2 kernel-3 conv over
    (last frame of the previous chunk, this chunk), so 4 frames become 2.
    """
    x = _per_frame_conv2d(p["resample"]["1"], F.pad(x, (0, 1, 0, 1)), stride=2)
    if "time_conv" not in p:
        return x, {}
    last_frame = x[:, :, -1:].clone()
    if "time_conv" in cache:
        time_conv = p["time_conv"]
        x = ops.conv3d(torch.cat([cache["time_conv"], x], dim=2), time_conv["weight"], time_conv["bias"], stride=(2, 1, 1))
    return x, {"time_conv": last_frame}


def _upsample(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """With a ``time_conv``, double time first; then double H and W (nearest, conv).

    The first latent frame is not doubled (it becomes the video's first frame); the frames after it
    go through a causal conv to two frames' channels each, as if zeros came before them.
    """
    new_cache = {}
    if "time_conv" in p:
        if "time_conv" in cache:
            pairs, new_cache["time_conv"] = _causal_conv(p["time_conv"], x, cache["time_conv"])
            x = rearrange(pairs, "b (two c) t h w -> b c (t two) h w", two=2)  # (B, C, 2T, H, W)
        else:
            new_cache["time_conv"] = x.new_zeros(*x.shape[:2], p["time_conv"]["weight"].shape[2] - 1, *x.shape[3:])
    frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
    upsampled = F.interpolate(frames.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)
    out = ops.conv2d(upsampled, p["resample"]["1"]["weight"], p["resample"]["1"]["bias"], padding=1)
    return rearrange(out, "(b t) c h w -> b c t h w", b=x.shape[0]), new_cache  # (B, C', T, 2H, 2W)


def _resnets(blocks: list, x: torch.Tensor, caches: list | None) -> tuple[torch.Tensor, list]:
    caches = caches or [{}] * len(blocks)
    out = []
    for block, cache in zip(blocks, caches):
        x, cache = _residual_block(block, x, cache)
        out.append(cache)
    return x, out


def _residual_down_level(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """A Wan 2.2 encoder level: residual blocks and a downsampler, plus the ``avg_down`` of its input."""
    h, resnets = _resnets(p["resnets"], x, cache.get("resnets"))
    if "downsampler" not in p:
        return h + avg_down(x, h.shape[1], factor_t=1, factor_s=1), {"resnets": resnets}
    downsampler = p["downsampler"]
    h, downsampler_cache = _downsample(downsampler, h, cache.get("downsampler", {}))
    shortcut = avg_down(x, h.shape[1], factor_t=2 if "time_conv" in downsampler else 1, factor_s=2)
    return h + shortcut, {"resnets": resnets, "downsampler": downsampler_cache}


def _encoder_block(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """One entry of ``encoder.down_blocks``: Wan 2.1's residual block or downsampler, or a Wan 2.2 level."""
    if "resample" in p:
        return _downsample(p, x, cache)
    if "resnets" in p:
        return _residual_down_level(p, x, cache)
    return _residual_block(p, x, cache)


def _decoder_block(p: dict, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """One entry of ``decoder.up_blocks``: residual blocks, then Wan 2.1's upsampler or Wan 2.2's with a ``dup_up`` shortcut."""
    h, resnets = _resnets(p["resnets"], x, cache.get("resnets"))
    if "upsamplers" in p:
        h, upsampler_cache = _upsample(p["upsamplers"][0], h, cache.get("upsamplers", [{}])[0])
        return h, {"resnets": resnets, "upsamplers": [upsampler_cache]}
    if "upsampler" in p:
        upsampler = p["upsampler"]
        h, upsampler_cache = _upsample(upsampler, h, cache.get("upsampler", {}))
        factor_t = 2 if "time_conv" in upsampler else 1
        shortcut = dup_up(x, h.shape[1], factor_t, factor_s=2, first_chunk=not cache)
        return h + shortcut, {"resnets": resnets, "upsampler": upsampler_cache}
    return h, {"resnets": resnets}


def _run_cached_blocks(block_fn, blocks: list, x: torch.Tensor, caches: list | None) -> tuple[torch.Tensor, list]:
    """``dsf.run_blocks`` over blocks that each read their cache and return a new one: ``(x, new caches)``."""

    def step(block, carry):
        x, pending, done = carry
        x, cache = block_fn(block, x, pending[0])
        return x, pending[1:], (*done, cache)

    pending = tuple(caches) if caches else ({},) * len(blocks)
    x, _, done = dsf.run_blocks(step, blocks, (x, pending, ()))
    return x, list(done)


def encoder_step(params: dict, chunk: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """One encoder chunk: (patched) frames (B, C, t, H, W) -> ``(moments (B, 2z, 1, H/f, W/f), cache)``.

    ``chunk`` is the first frame when ``cache`` is empty, else 4 frames (for Wan's ×4 in time);
    the moments are the posterior mean ‖ log-variance after ``quant_conv``.

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> vparams = init_vae(cfg, dsf.random.key(0))
    >>> moments, cache = encoder_step(vparams, torch.zeros(1, 3, 1, 4, 4), {})
    >>> moments.shape, encoder_step(vparams, torch.zeros(1, 3, 4, 4, 4), cache)[0].shape
    (torch.Size([1, 4, 1, 2, 2]), torch.Size([1, 4, 2, 2, 2]))
    """
    encoder = params["encoder"]
    x, conv_in = _causal_conv(encoder["conv_in"], chunk, cache.get("conv_in"))
    x, down_blocks = _run_cached_blocks(_encoder_block, encoder["down_blocks"], x, cache.get("down_blocks"))
    x, mid_block = _mid_block(encoder["mid_block"], x, cache.get("mid_block", {}))
    x, conv_out = _causal_conv(encoder["conv_out"], _norm_silu(encoder["norm_out"], x), cache.get("conv_out"))
    new_cache = {"conv_in": conv_in, "down_blocks": down_blocks, "mid_block": mid_block, "conv_out": conv_out}
    return _pointwise_conv(params["quant_conv"], x), new_cache


def decoder_step(params: dict, latent_frame: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
    """One decoder step: a raw latent frame (B, z, 1, h, w) -> ``((patched) frames (B, C, t, h·f, w·f), cache)``.

    ``post_quant_conv`` is applied first; t is 1 when ``cache`` is empty, else 4 (for Wan's ×4 in time).

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> vparams = init_vae(cfg, dsf.random.key(0))
    >>> frames, cache = decoder_step(vparams, torch.zeros(1, 2, 1, 2, 2), {})
    >>> frames.shape, decoder_step(vparams, torch.zeros(1, 2, 1, 2, 2), cache)[0].shape
    (torch.Size([1, 3, 1, 4, 4]), torch.Size([1, 3, 2, 4, 4]))
    """
    decoder = params["decoder"]
    x = _pointwise_conv(params["post_quant_conv"], latent_frame)
    x, conv_in = _causal_conv(decoder["conv_in"], x, cache.get("conv_in"))
    x, mid_block = _mid_block(decoder["mid_block"], x, cache.get("mid_block", {}))
    x, up_blocks = _run_cached_blocks(_decoder_block, decoder["up_blocks"], x, cache.get("up_blocks"))
    x, conv_out = _causal_conv(decoder["conv_out"], _norm_silu(decoder["norm_out"], x), cache.get("conv_out"))
    return x, {"conv_in": conv_in, "mid_block": mid_block, "up_blocks": up_blocks, "conv_out": conv_out}


def frame_chunks(frames: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's chunks of (B, C, T, H, W): the first frame, then 4 frames at a time (views, no copies).

    >>> [chunk.shape[2] for chunk in frame_chunks(torch.zeros(1, 1, 9, 1, 1))], len(frame_chunks(torch.zeros(1, 1, 1, 1, 1)))
    ([1, 4, 4], 1)
    """
    return [frames[:, :, :1]] + [frames[:, :, t : t + CHUNK_FRAMES] for t in range(1, frames.shape[2], CHUNK_FRAMES)]


def run_encoder(params: dict, video: torch.Tensor, *, config: WanVAEConfig) -> torch.Tensor:
    """Patch (Wan 2.2) and encode a video (B, 3, T, H, W) chunk by chunk: posterior moments (B, 2z, T', H/f, W/f).

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> run_encoder(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 3, 5, 4, 4), config=cfg).shape
    torch.Size([1, 4, 3, 2, 2])
    """
    cache, moments = {}, []
    for chunk in frame_chunks(video):
        out, cache = encoder_step(params, patchify(chunk, config.patch_size), cache)
        moments.append(out)
    return torch.cat(moments, dim=2)


def run_decoder(params: dict, z: torch.Tensor, *, config: WanVAEConfig) -> torch.Tensor:
    """Decode raw latents (B, z, T', h, w) one latent frame at a time and unpatch (Wan 2.2): (B, 3, T, h·f, w·f).

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> run_decoder(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 2, 3, 2, 2), config=cfg).shape
    torch.Size([1, 3, 5, 4, 4])
    """
    cache, frames = {}, []
    for latent_frame in z.split(1, dim=2):
        out, cache = decoder_step(params, latent_frame, cache)
        frames.append(unpatchify(out, config.patch_size))
    return torch.cat(frames, dim=2)


def check_video(config: WanVAEConfig, video) -> None:
    """Raise a ValueError naming the problem with a video to encode and the fix.

    >>> check_video(WAN21_VAE_CONFIG, torch.zeros(1, 3, 10, 64, 64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: video has 10 frames; this VAE encodes 1 + 4k frames ...: trim to 9 or pad to 13 frames
    """
    channels, factor = config.video_channels, config.spatial_factor
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != channels:
        raise ValueError(
            f"video has shape {tuple(getattr(video, 'shape', ()))}; this VAE encodes (B, {channels}, T, H, W) videos "
            f"in [-1, 1]: put channels before time, add a batch axis, give an image as one frame (image[:, :, None])"
        )
    frames, height, width = video.shape[2:]
    if (frames - 1) % CHUNK_FRAMES:
        below = frames - (frames - 1) % CHUNK_FRAMES
        raise ValueError(
            f"video has {frames} frames; this VAE encodes 1 + {CHUNK_FRAMES}k frames (the first alone, then chunks of "
            f"{CHUNK_FRAMES}): trim to {below} or pad to {below + CHUNK_FRAMES} frames"
        )
    if height % factor or width % factor:
        raise ValueError(
            f"video has height {height} and width {width}, which must both be multiples of {factor} "
            f"(the VAE downsamples {factor}×): resize or crop to e.g. {height - height % factor}×{width - width % factor}"
        )


def check_latents(config: WanVAEConfig, latents) -> None:
    """Raise a ValueError naming the problem with latents to decode and the fix.

    >>> check_latents(WAN21_VAE_CONFIG, torch.zeros(1, 48, 3, 4, 4))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: latents have shape (1, 48, 3, 4, 4); this VAE decodes (B, 16, T, H, W) latents...
    """
    channels = config.z_dim
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != channels:
        raise ValueError(
            f"latents have shape {tuple(getattr(latents, 'shape', ()))}; this VAE decodes (B, {channels}, T, H, W) "
            f"latents: unpack DiT patches first, and use the VAE the latents came from (Wan 2.1: 16 channels, Wan 2.2: 48)"
        )


def _channel_stats(config: WanVAEConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (z, 1, 1, 1) to broadcast over (B, z, T, H, W)."""
    def column(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None, None]

    return column(config.latents_mean), column(config.latents_std)


def encode(
    params: dict,
    video: torch.Tensor,
    key: Key | None = None,
    *,
    config: WanVAEConfig,
    tiled: bool = False,
    tile_size: int = ENCODE_TILE,
    tile_overlap: int = ENCODE_OVERLAP,
) -> torch.Tensor:
    """Normalized latents ``(z − mean)/std`` (B, z, 1 + (T−1)/4, H/f, W/f) of a video (B, 3, T, H, W) in [−1, 1].

    ``z`` is the posterior mean, or with a ``key`` a sample ``mean + std·ε``. ``tiled=True`` encodes
    ``tile_size``-pixel squares overlapping by ``tile_overlap`` pixels (multiples of f), blended with linear ramps.

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> vparams, video = init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 3, 5, 8, 8)
    >>> encode(vparams, video, dsf.random.key(1), config=cfg, tiled=True, tile_size=4, tile_overlap=2).shape
    torch.Size([1, 2, 3, 4, 4])
    """
    check_video(config, video)
    encoder = partial(run_encoder, params, config=config)
    if tiled:
        check_tiling(tile_size, tile_overlap, config.spatial_factor, "pixels")
        moments = tiled_apply(encoder, video, tile_size, tile_overlap)
    else:
        moments = encoder(video)
    z = posterior_latents(moments, key)
    latents_mean, latents_std = _channel_stats(config, z)
    return (z - latents_mean) / latents_std


def decode(
    params: dict,
    latents: torch.Tensor,
    *,
    config: WanVAEConfig,
    tiled: bool = False,
    tile_size: int = DECODE_TILE,
    tile_overlap: int = DECODE_OVERLAP,
) -> torch.Tensor:
    """The video (B, 3, 1 + 4(T'−1), H·f, W·f) in [−1, 1] (clamped) of normalized latents (B, z, T', H, W).

    ``tiled=True`` decodes ``tile_size``-latent-pixel squares overlapping by ``tile_overlap``.

    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 1), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> vparams, latents = init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 2, 2, 4, 4)
    >>> decode(vparams, latents, config=cfg, tiled=True, tile_size=2, tile_overlap=1).shape
    torch.Size([1, 3, 3, 8, 8])
    """
    check_latents(config, latents)
    latents_mean, latents_std = _channel_stats(config, latents)
    decoder = partial(run_decoder, params, config=config)
    z = latents * latents_std + latents_mean
    if tiled:
        check_tiling(tile_size, tile_overlap, 1, "latent pixels")
        video = tiled_apply(decoder, z, tile_size, tile_overlap)
    else:
        video = decoder(z)
    return video.clamp(-1.0, 1.0)


@dataclass(frozen=True)
class WanVAE:
    """A Wan video VAE: its config, with :func:`encode` and :func:`decode` as methods taking the params.

    >>> WanVAE(WAN22_VAE_CONFIG).config.z_dim
    48
    """

    config: WanVAEConfig

    def encode(
        self, params: dict, video: torch.Tensor, key: Key | None = None, *, tiled: bool = False,
        tile_size: int = ENCODE_TILE, tile_overlap: int = ENCODE_OVERLAP,
    ) -> torch.Tensor:
        """:func:`encode` with this config.

        >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1,), temperal_downsample=(), latents_mean=(0, 0), latents_std=(1, 1))
        >>> WanVAE(cfg).encode(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 3, 1, 4, 4)).shape
        torch.Size([1, 2, 1, 4, 4])
        """
        return encode(params, video, key, config=self.config, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)

    def decode(
        self, params: dict, latents: torch.Tensor, *, tiled: bool = False, tile_size: int = DECODE_TILE,
        tile_overlap: int = DECODE_OVERLAP,
    ) -> torch.Tensor:
        """:func:`decode` with this config.

        >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1,), temperal_downsample=(), latents_mean=(0, 0), latents_std=(1, 1))
        >>> WanVAE(cfg).decode(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 2, 1, 4, 4)).shape
        torch.Size([1, 3, 1, 4, 4])
        """
        return decode(params, latents, config=self.config, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)
