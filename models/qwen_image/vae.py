"""Qwen-Image's VAE: Wan 2.1's causal 3-D VAE network (:mod:`dsf.model_parts.wan_vae`), used on single frames.

diffusers' ``AutoencoderKLQwenImage`` is ``AutoencoderKLWan``'s Wan 2.1 network under the same key names (and
the original Wan layout of ComfyUI's ``qwen_image_vae.safetensors`` is Wan's), with Wan 2.1's per-channel latent
mean and std; its config names the image channels ``input_channels``. :data:`VAE` is Wan's checkpoint record
with that config reader and a model that takes images (B, 3, H, W) and latents (B, 16, H/8, W/8): the frame axis
is added and dropped here.

Example:
    >>> import torch, dsf
    >>> from dsf.model_parts.wan_vae import init_vae
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), temperal_downsample=(False,), latents_mean=(0, 0),
    ...                    latents_std=(1, 1))
    >>> vae, vparams = load_vae(dsf.tree.flatten_dict(init_vae(cfg, dsf.random.key(0))), cfg)
    >>> latents = vae.encode(vparams, torch.zeros(1, 3, 8, 8))
    >>> latents.shape, vae.decode(vparams, latents).shape
    (torch.Size([1, 2, 4, 4]), torch.Size([1, 3, 8, 8]))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch

from dsf.files.io import Source
from dsf.model_parts import wan_vae_keys
from dsf.model_parts.wan_vae import DECODE_OVERLAP, DECODE_TILE, ENCODE_OVERLAP, ENCODE_TILE, WAN21_VAE_CONFIG, WanVAEConfig
from dsf.model_parts.wan_vae import decode as decode_video
from dsf.model_parts.wan_vae import encode as encode_video
from dsf.model_parts.input_checks import fits, shape_of
from dsf.random import Key

QWEN_IMAGE_VAE_CONFIG = WAN21_VAE_CONFIG  # Qwen/Qwen-Image's vae/config.json: Wan 2.1's sizes and latent statistics


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """WanVAEConfig fields from ``AutoencoderKLQwenImage`` config keys (``input_channels`` counts the image channels
    in and out; the rest are ``AutoencoderKLWan``'s).

    >>> fields_from_diffusers({"input_channels": 4, "z_dim": 16, "_class_name": "AutoencoderKLQwenImage"}, strict=True)
    {'z_dim': 16, 'in_channels': 4, 'out_channels': 4}
    """
    renamed = {k: v for k, v in config.items() if k != "input_channels"}
    if config.get("input_channels") is not None:
        renamed |= {"in_channels": config["input_channels"], "out_channels": config["input_channels"]}
    return wan_vae_keys.fields_from_diffusers(renamed, strict)


def resolve_vae_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | WanVAEConfig | None = None
) -> WanVAEConfig:
    """The config of a checkpoint: Qwen-Image's defaults < shapes < ``config.json`` < ``config`` (a
    :class:`WanVAEConfig` is taken as is).

    >>> from dsf.model_parts.wan_vae import vae_param_shapes
    >>> resolve_vae_config(vae_param_shapes(QWEN_IMAGE_VAE_CONFIG), {"input_channels": 3}) == QWEN_IMAGE_VAE_CONFIG
    True
    """
    if isinstance(config, WanVAEConfig):
        return config

    def renamed(mapping):
        return None if mapping is None else fields_from_diffusers(mapping, strict=mapping is config)

    return wan_vae_keys.resolve_vae_config(shapes, renamed(config_json), renamed(config))


def _check_images(images) -> None:
    if not fits(images, (None, None, None, None)):
        raise ValueError(f"images have shape {shape_of(images)}; the Qwen-Image VAE encodes images (B, 3, H, W) in [-1, 1]")


def _check_latents(config: WanVAEConfig, latents) -> None:
    if not fits(latents, (None, config.z_dim, None, None)):
        raise ValueError(
            f"latents have shape {shape_of(latents)}; the Qwen-Image VAE decodes latents (B, {config.z_dim}, H, W) "
            "(unpatchified DiT output)"
        )


@dataclass(frozen=True)
class QwenImageVAE:
    """The Qwen-Image VAE on images: its config, with ``encode`` and ``decode`` taking the params.

    >>> QwenImageVAE(QWEN_IMAGE_VAE_CONFIG).config.spatial_factor
    8
    """

    config: WanVAEConfig

    def encode(self, params: dict, images: torch.Tensor, key: Key | None = None, *, tiled: bool = False,
               tile_size: int = ENCODE_TILE, tile_overlap: int = ENCODE_OVERLAP) -> torch.Tensor:
        """Normalized latents ``(z − mean)/std`` (B, 16, H/8, W/8) of images (B, 3, H, W) in [−1, 1]; ``z`` is the
        posterior mode, or with a ``key`` a sample (see :func:`dsf.model_parts.wan_vae.encode` for tiling)."""
        _check_images(images)
        latents = encode_video(params, images[:, :, None], key, config=self.config, tiled=tiled, tile_size=tile_size,
                               tile_overlap=tile_overlap)
        return latents[:, :, 0]

    def decode(self, params: dict, latents: torch.Tensor, *, tiled: bool = False, tile_size: int = DECODE_TILE,
               tile_overlap: int = DECODE_OVERLAP) -> torch.Tensor:
        """Images (B, 3, H·8, W·8) in [−1, 1] (clamped, as diffusers does) of normalized latents (B, 16, H, W)."""
        _check_latents(self.config, latents)
        images = decode_video(params, latents[:, :, None], config=self.config, tiled=tiled, tile_size=tile_size,
                              tile_overlap=tile_overlap)
        return images[:, :, 0]


VAE = dataclasses.replace(
    wan_vae_keys.VAE, what="Qwen-Image VAE", class_name="AutoencoderKLQwenImage", resolve_config=resolve_vae_config,
    build=QwenImageVAE,
)


def load_vae(source: Source, config: Mapping | WanVAEConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(vae, params)`` from a Qwen-Image VAE checkpoint: a diffusers ``vae/`` folder or pipeline folder, a file in
    the diffusers or original Wan layout, a state dict, or a :class:`dsf.files.hub.ModelSource`. The config is:
    Qwen-Image's defaults < the checkpoint's shapes < the ``config.json`` beside the weights < ``config``
    (``AutoencoderKLQwenImage`` config keys, or a :class:`WanVAEConfig`).

    >>> import dsf
    >>> from dsf.model_parts.wan_vae import init_vae
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), temperal_downsample=(False,), latents_mean=(0, 0),
    ...                    latents_std=(1, 1))
    >>> flat = wan_vae_keys.ours_to_original_vae(init_vae(cfg, dsf.random.key(0)))
    >>> vae, _ = load_vae(flat, {"latents_mean": [0, 0], "latents_std": [1, 1], "input_channels": 3})
    >>> vae.config == cfg
    True
    """
    return VAE.load(source, config, dtype=dtype, device=device)
