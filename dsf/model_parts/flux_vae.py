"""The FLUX.1 VAE (16-channel KL autoencoder, ×8) as pure functions of a diffusers-layout param tree.

A shared model part: FLUX.1 and Z-Image use this network; keys and loading are in :mod:`dsf.model_parts.flux_vae_keys`.

The encoder maps images (B, 3, H, W) in [−1, 1] through ResNet levels with stride-2 downsampling,
a mid block (ResNet, one-head self-attention over the H·W positions, ResNet) and a GroupNorm+SiLU
head to the posterior moments (mean ‖ log-variance). The decoder mirrors it with nearest ×2
upsampling. Latents handed to the DiT are normalized, ``(z − shift)·scale``; :func:`decode` undoes
that first. Large images can be encoded and decoded in overlapping tiles blended by linear ramps.

Example:
    >>> import torch, dsf
    >>> cfg = FluxVAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vae, vparams = FluxVAE(cfg), init_vae(cfg, dsf.random.key(0))
    >>> latents = vae.encode(vparams, torch.zeros(1, 3, 8, 12))
    >>> latents.shape, vae.decode(vparams, latents).shape
    (torch.Size([1, 4, 4, 6]), torch.Size([1, 3, 8, 12]))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange

import dsf
from dsf import ops
from dsf.model_parts.init import xavier_uniform
from dsf.model_parts.posterior import posterior_latents
from dsf.random import Key, split
from dsf.model_parts.tiling import check_tiling, tiled_apply

NORM_EPS = 1e-6
ENCODE_TILE, ENCODE_OVERLAP = 512, 128  # pixels
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels (the same image area as the encoder's)


@dataclass(frozen=True)
class FluxVAEConfig:
    """Sizes of the KL autoencoder, named as diffusers' ``AutoencoderKL`` config; the defaults are FLUX.1's.

    >>> FluxVAEConfig().downsample_factor, FluxVAEConfig(block_out_channels=(32, 32), norm_num_groups=8).downsample_factor
    (8, 2)
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty: give the width of each level, e.g. (128, 256, 512, 512)")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} are not all divisible by norm_num_groups "
                f"{self.norm_num_groups} (offending: {uneven}): pick a norm_num_groups that divides every width "
                "(when loading, pass config={'norm_num_groups': N})"
            )
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor is 0: latents would all be zero; FLUX.1 uses 0.3611")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


def _conv_shapes(name: str, out_ch: int, in_ch: int, kernel: int) -> dict[str, tuple]:
    return {f"{name}.weight": (out_ch, in_ch, kernel, kernel), f"{name}.bias": (out_ch,)}


def _vector_shapes(name: str, width: int) -> dict[str, tuple]:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def _resnet_shapes(prefix: str, in_ch: int, out_ch: int) -> dict[str, tuple]:
    shapes = _vector_shapes(f"{prefix}norm1", in_ch) | _conv_shapes(f"{prefix}conv1", out_ch, in_ch, 3)
    shapes |= _vector_shapes(f"{prefix}norm2", out_ch) | _conv_shapes(f"{prefix}conv2", out_ch, out_ch, 3)
    if in_ch != out_ch:
        shapes |= _conv_shapes(f"{prefix}conv_shortcut", out_ch, in_ch, 1)
    return shapes


def _mid_block_shapes(prefix: str, width: int, attention: bool) -> dict[str, tuple]:
    shapes = _resnet_shapes(f"{prefix}resnets.0.", width, width) | _resnet_shapes(f"{prefix}resnets.1.", width, width)
    if attention:
        shapes |= _vector_shapes(f"{prefix}attentions.0.group_norm", width)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes |= {f"{prefix}attentions.0.{name}.weight": (width, width), f"{prefix}attentions.0.{name}.bias": (width,)}
    return shapes


def _encoder_shapes(config: FluxVAEConfig) -> dict[str, tuple]:
    widths, last = config.block_out_channels, len(config.block_out_channels) - 1
    shapes = _conv_shapes("encoder.conv_in", widths[0], config.in_channels, 3)
    in_ch = widths[0]
    for level, out_ch in enumerate(widths):
        for j in range(config.layers_per_block):
            shapes |= _resnet_shapes(f"encoder.down_blocks.{level}.resnets.{j}.", in_ch if j == 0 else out_ch, out_ch)
        if level < last:
            shapes |= _conv_shapes(f"encoder.down_blocks.{level}.downsamplers.0.conv", out_ch, out_ch, 3)
        in_ch = out_ch
    shapes |= _mid_block_shapes("encoder.mid_block.", widths[-1], config.mid_block_add_attention)
    shapes |= _vector_shapes("encoder.conv_norm_out", widths[-1])
    return shapes | _conv_shapes("encoder.conv_out", 2 * config.latent_channels, widths[-1], 3)


def _decoder_shapes(config: FluxVAEConfig) -> dict[str, tuple]:
    widths, last = config.block_out_channels[::-1], len(config.block_out_channels) - 1
    shapes = _conv_shapes("decoder.conv_in", widths[0], config.latent_channels, 3)
    shapes |= _mid_block_shapes("decoder.mid_block.", widths[0], config.mid_block_add_attention)
    in_ch = widths[0]
    for level, out_ch in enumerate(widths):
        for j in range(config.layers_per_block + 1):
            shapes |= _resnet_shapes(f"decoder.up_blocks.{level}.resnets.{j}.", in_ch if j == 0 else out_ch, out_ch)
        if level < last:
            shapes |= _conv_shapes(f"decoder.up_blocks.{level}.upsamplers.0.conv", out_ch, out_ch, 3)
        in_ch = out_ch
    shapes |= _vector_shapes("decoder.conv_norm_out", widths[-1])
    return shapes | _conv_shapes("decoder.conv_out", config.out_channels, widths[-1], 3)


def vae_param_shapes(config: FluxVAEConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every parameter, in the diffusers ``AutoencoderKL`` layout.

    >>> vae_param_shapes(FluxVAEConfig())["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"]
    (128, 256, 1, 1)
    """
    shapes = _encoder_shapes(config) | _decoder_shapes(config)
    if config.use_quant_conv:
        shapes |= _conv_shapes("quant_conv", 2 * config.latent_channels, 2 * config.latent_channels, 1)
    if config.use_post_quant_conv:
        shapes |= _conv_shapes("post_quant_conv", config.latent_channels, config.latent_channels, 1)
    return shapes


def vae_params_meta(config: FluxVAEConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device: shapes and counts without memory.

    >>> round(dsf.tree.num_params(vae_params_meta(FluxVAEConfig())) / 1e6, 1)
    83.8
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in vae_param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)


def init_vae(config: FluxVAEConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters: Glorot-uniform conv and linear weights, zero biases, unit GroupNorm scales.

    >>> vparams = init_vae(FluxVAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4), dsf.random.key(0))
    >>> vparams["encoder"]["mid_block"]["attentions"][0]["to_q"]["weight"].shape
    torch.Size([8, 8])
    """
    shapes = vae_param_shapes(config)
    flat = {}
    for name_key, (name, shape) in zip(split(key, len(shapes)), shapes.items()):
        if len(shape) > 1:
            flat[name] = xavier_uniform(name_key, shape, dtype=dtype)
        elif name.endswith(".weight"):  # the only 1-D weights are GroupNorm scales
            flat[name] = torch.ones(shape, dtype=dtype)
        else:
            flat[name] = torch.zeros(shape, dtype=dtype)
    return dsf.tree.unflatten_dict(flat)


def _conv(p: dict, x: torch.Tensor, padding: int = 1, stride: int = 1) -> torch.Tensor:
    return ops.conv2d(x, p["weight"], p["bias"], stride=stride, padding=padding)


def _norm_silu(p: dict, x: torch.Tensor, groups: int) -> torch.Tensor:
    return F.silu(ops.group_norm(x, groups, p["weight"], p["bias"], NORM_EPS))


def _resnet(p: dict, x: torch.Tensor, *, groups: int) -> torch.Tensor:
    h = _conv(p["conv1"], _norm_silu(p["norm1"], x, groups))
    h = _conv(p["conv2"], _norm_silu(p["norm2"], h, groups))
    shortcut = _conv(p["conv_shortcut"], x, padding=0) if "conv_shortcut" in p else x
    return shortcut + h


def _self_attention(p: dict, x: torch.Tensor, groups: int) -> torch.Tensor:
    normed = ops.group_norm(x, groups, p["group_norm"]["weight"], p["group_norm"]["bias"], NORM_EPS)
    tokens = rearrange(normed, "b c h w -> b (h w) c")  # (B, H·W, C)
    q, k, v = (ops.linear(tokens, **p[name]) for name in ("to_q", "to_k", "to_v"))
    out = ops.linear(ops.attention(q, k, v, heads=1), **p["to_out"][0])
    return x + rearrange(out, "b (h w) c -> b c h w", h=x.shape[-2])  # (B, C, H, W)


def _mid_block(p: dict, x: torch.Tensor, config: FluxVAEConfig) -> torch.Tensor:
    groups = config.norm_num_groups
    x = _resnet(p["resnets"][0], x, groups=groups)
    if config.mid_block_add_attention:
        x = _self_attention(p["attentions"][0], x, groups)
    return _resnet(p["resnets"][1], x, groups=groups)


def _downsample(p: dict, x: torch.Tensor) -> torch.Tensor:
    return _conv(p["conv"], F.pad(x, (0, 1, 0, 1)), padding=0, stride=2)


def _upsample(p: dict, x: torch.Tensor) -> torch.Tensor:
    return _conv(p["conv"], F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_encoder(params: dict, images: torch.Tensor, *, config: FluxVAEConfig) -> torch.Tensor:
    """The encoder (and ``quant_conv`` if any): images (B, 3, H, W) -> posterior moments (B, 2·C, H/f, W/f).

    The first C channels are the mean, the last C the log-variance; f is ``config.downsample_factor``.

    >>> cfg = FluxVAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> run_encoder(init_vae(cfg, dsf.random.key(0)), torch.zeros(2, 3, 4, 6), config=cfg).shape
    torch.Size([2, 8, 2, 3])
    """
    encoder, groups = params["encoder"], config.norm_num_groups
    h = _conv(encoder["conv_in"], images)
    for level in encoder["down_blocks"]:
        h = dsf.run_blocks(_resnet, level["resnets"], h, groups=groups)
        if "downsamplers" in level:
            h = _downsample(level["downsamplers"][0], h)
    h = _mid_block(encoder["mid_block"], h, config)
    moments = _conv(encoder["conv_out"], _norm_silu(encoder["conv_norm_out"], h, groups))
    return _conv(params["quant_conv"], moments, padding=0) if config.use_quant_conv else moments


def run_decoder(params: dict, z: torch.Tensor, *, config: FluxVAEConfig) -> torch.Tensor:
    """``post_quant_conv`` (if any) and the decoder: raw latents (B, C, h, w) -> images (B, 3, h·f, w·f).

    >>> cfg = FluxVAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> run_decoder(init_vae(cfg, dsf.random.key(0)), torch.zeros(2, 4, 2, 3), config=cfg).shape
    torch.Size([2, 3, 4, 6])
    """
    decoder, groups = params["decoder"], config.norm_num_groups
    if config.use_post_quant_conv:
        z = _conv(params["post_quant_conv"], z, padding=0)
    h = _mid_block(decoder["mid_block"], _conv(decoder["conv_in"], z), config)
    for level in decoder["up_blocks"]:
        h = dsf.run_blocks(_resnet, level["resnets"], h, groups=groups)
        if "upsamplers" in level:
            h = _upsample(level["upsamplers"][0], h)
    return _conv(decoder["conv_out"], _norm_silu(decoder["conv_norm_out"], h, groups))


def check_images(config: FluxVAEConfig, images) -> None:
    """Raise a ValueError naming the problem with images to encode and the fix.

    >>> check_images(FluxVAEConfig(), torch.zeros(1, 3, 100, 64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: images have height 100 and width 64, which must both be multiples of 8 ...: resize or crop to e.g. 96×64
    """
    channels, factor = config.in_channels, config.downsample_factor
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(
            f"images have shape {tuple(getattr(images, 'shape', ()))}; this VAE encodes (B, {channels}, H, W) "
            f"images in [-1, 1]: put channels first, add a batch axis, drop an alpha channel (images[:, :{channels}])"
        )
    height, width = images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"images have height {height} and width {width}, which must both be multiples of {factor} "
            f"(the VAE downsamples {factor}×): resize or crop to e.g. {height - height % factor}×{width - width % factor}"
        )


def check_latents(config: FluxVAEConfig, latents) -> None:
    """Raise a ValueError naming the problem with latents to decode and the fix.

    >>> check_latents(FluxVAEConfig(), torch.zeros(1, 64, 4, 4))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: latents have shape (1, 64, 4, 4); this VAE decodes (B, 16, H, W) latents: unpack ... (flux.unpatchify)
    """
    channels = config.latent_channels
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(
            f"latents have shape {tuple(getattr(latents, 'shape', ()))}; this VAE decodes (B, {channels}, H, W) latents: "
            "unpack DiT tokens or 2×2 patches first (flux.unpatchify)"
        )


def encode(
    params: dict,
    images: torch.Tensor,
    key: Key | None = None,
    *,
    config: FluxVAEConfig,
    tiled: bool = False,
    tile_size: int = ENCODE_TILE,
    tile_overlap: int = ENCODE_OVERLAP,
) -> torch.Tensor:
    """Normalized latents ``(z − shift)·scale`` (B, C, H/f, W/f) of images (B, 3, H, W) in [−1, 1].

    ``z`` is the posterior mean, or with a ``key`` a sample ``mean + std·ε``. ``tiled=True`` runs
    the encoder on ``tile_size``-pixel tiles overlapping by ``tile_overlap`` pixels (both multiples of f).

    >>> cfg = FluxVAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vparams, images = init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 3, 8, 8)
    >>> encode(vparams, images, dsf.random.key(1), config=cfg, tiled=True, tile_size=4, tile_overlap=2).shape
    torch.Size([1, 4, 4, 4])
    """
    check_images(config, images)
    encoder = partial(run_encoder, params, config=config)
    if tiled:
        check_tiling(tile_size, tile_overlap, config.downsample_factor, "pixels")
        moments = tiled_apply(encoder, images, tile_size, tile_overlap)
    else:
        moments = encoder(images)
    z = posterior_latents(moments, key)
    return (z - config.shift_factor) * config.scaling_factor


def decode(
    params: dict,
    latents: torch.Tensor,
    *,
    config: FluxVAEConfig,
    tiled: bool = False,
    tile_size: int = DECODE_TILE,
    tile_overlap: int = DECODE_OVERLAP,
) -> torch.Tensor:
    """Images (B, 3, H·f, W·f), about [−1, 1], of normalized latents (B, C, H, W): ``decoder(z/scale + shift)``.

    ``tiled=True`` runs the decoder on ``tile_size``-latent-pixel tiles overlapping by ``tile_overlap``.

    >>> cfg = FluxVAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vparams, latents = init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 4, 6, 6)
    >>> decode(vparams, latents, config=cfg, tiled=True, tile_size=4, tile_overlap=2).shape
    torch.Size([1, 3, 12, 12])
    """
    check_latents(config, latents)
    decoder = partial(run_decoder, params, config=config)
    z = latents / config.scaling_factor + config.shift_factor
    if not tiled:
        return decoder(z)
    check_tiling(tile_size, tile_overlap, 1, "latent pixels")
    return tiled_apply(decoder, z, tile_size, tile_overlap)


@dataclass(frozen=True)
class FluxVAE:
    """A FLUX.1 VAE: its config, with :func:`encode` and :func:`decode` as methods taking the params.

    >>> FluxVAE(FluxVAEConfig()).config.latent_channels
    16
    """

    config: FluxVAEConfig

    def encode(
        self, params: dict, images: torch.Tensor, key: Key | None = None, *, tiled: bool = False,
        tile_size: int = ENCODE_TILE, tile_overlap: int = ENCODE_OVERLAP,
    ) -> torch.Tensor:
        """:func:`encode` with this config.

        >>> cfg = FluxVAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4)
        >>> FluxVAE(cfg).encode(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 3, 4, 4)).shape
        torch.Size([1, 4, 4, 4])
        """
        return encode(params, images, key, config=self.config, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)

    def decode(
        self, params: dict, latents: torch.Tensor, *, tiled: bool = False, tile_size: int = DECODE_TILE,
        tile_overlap: int = DECODE_OVERLAP,
    ) -> torch.Tensor:
        """:func:`decode` with this config.

        >>> cfg = FluxVAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4)
        >>> FluxVAE(cfg).decode(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 4, 4, 4)).shape
        torch.Size([1, 3, 4, 4])
        """
        return decode(params, latents, config=self.config, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)
