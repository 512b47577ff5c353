"""The FLUX.2 VAE: FLUX.1's KL autoencoder network with 32 latent channels and its quant convs
(:mod:`dsf.model_parts.flux_vae`), whose latents the pipeline cuts into 2×2 patches (128 channels at 1/16 of
the image size) and normalizes by the batch-norm running statistics stored with the VAE's weights.

``encode``: images (B, 3, H, W) in [−1, 1] → (patchify(z) − running_mean) / sqrt(running_var + eps), z the
posterior mode (or a sample with a key); patch channel ``4c + 2dy + dx``. ``decode`` is the inverse, then the
decoder (no clamp). Checkpoints: ours (= diffusers ``AutoencoderKLFlux2``: ``quant_conv``, ``bn.running_mean``
at the top) and BFL's ``ae.safetensors`` (FLUX.1's LDM names, with ``encoder.quant_conv`` and
``decoder.post_quant_conv`` inside the encoder and decoder); ``bn.num_batches_tracked`` is dropped.

Example:
    >>> import torch, dsf
    >>> cfg = Flux2VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vae, vparams = Flux2VAE(cfg), init_vae(cfg, dsf.random.key(0))
    >>> latents = vae.encode(vparams, torch.zeros(1, 3, 8, 12))
    >>> latents.shape, vae.decode(vparams, latents).shape
    (torch.Size([1, 16, 2, 3]), torch.Size([1, 3, 8, 12]))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from einops import rearrange

import dsf
from dsf.files import loading
from dsf.files.io import Source
from dsf.model_parts import flux_vae, flux_vae_keys
from dsf.model_parts.family import Checkpoint, Layout
from dsf.model_parts.input_checks import fits, shape_of
from dsf.random import Key
from dsf.weight import materialize

PATCH = 2  # latents are cut into PATCH × PATCH patches before the DiT
BFL_NESTED = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}  # ours -> BFL


@dataclass(frozen=True)
class Flux2VAEConfig(flux_vae.FluxVAEConfig):
    """FLUX.1's autoencoder config with FLUX.2's sizes (32 latent channels, quant convs), no scale or shift (the batch
    norm normalizes), and the batch norm's ``eps``.

    >>> cfg = Flux2VAEConfig()
    >>> cfg.latent_channels, cfg.patch_channels, cfg.downsample_factor, cfg.batch_norm_eps
    (32, 128, 8, 0.0001)
    """

    latent_channels: int = 32
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    batch_norm_eps: float = 1e-4

    @property
    def patch_channels(self) -> int:
        """Channels of the pipeline's latents: the latent channels of a PATCH × PATCH patch."""
        return self.latent_channels * PATCH * PATCH


def vae_param_shapes(config: Flux2VAEConfig) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of every weight, in the diffusers ``AutoencoderKLFlux2`` layout.

    >>> vae_param_shapes(Flux2VAEConfig())["bn.running_var"], vae_param_shapes(Flux2VAEConfig())["quant_conv.weight"]
    ((128,), (64, 64, 1, 1))
    """
    statistics = {"bn.running_mean": (config.patch_channels,), "bn.running_var": (config.patch_channels,)}
    return flux_vae.vae_param_shapes(config) | statistics


def init_vae(config: Flux2VAEConfig, key: Key, dtype: torch.dtype = torch.float32) -> dict:
    """Fresh parameters (:func:`dsf.model_parts.flux_vae.init_vae`) and identity statistics (mean 0, variance 1).

    >>> init_vae(Flux2VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4), dsf.random.key(0))["bn"]["running_var"].shape
    torch.Size([128])
    """
    statistics = {"running_mean": torch.zeros(config.patch_channels, dtype=dtype),
                  "running_var": torch.ones(config.patch_channels, dtype=dtype)}
    return flux_vae.init_vae(config, key, dtype) | {"bn": statistics}


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) → (B, 4C, H/2, W/2), patch channel ``4c + 2dy + dx``.

    >>> patchify(torch.arange(4.0).reshape(1, 1, 2, 2)).flatten().tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    return rearrange(z, "b c (h dy) (w dx) -> b (c dy dx) h w", dy=PATCH, dx=PATCH)  # (B, 4C, H/2, W/2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, 4C, h, w) → (B, C, 2h, 2w).

    >>> x = torch.randn(1, 8, 4, 6)
    >>> bool((unpatchify(patchify(x)) == x).all())
    True
    """
    return rearrange(latents, "b (c dy dx) h w -> b c (h dy) (w dx)", dy=PATCH, dx=PATCH)  # (B, C, 2h, 2w)


def _statistics(params: dict, config: Flux2VAEConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (1, 4C, 1, 1) of the batch norm, on ``like``'s device and dtype."""
    mean, var = (materialize(params["bn"][name]).to(like.device, like.dtype)[None, :, None, None]
                 for name in ("running_mean", "running_var"))
    return mean, torch.sqrt(var + config.batch_norm_eps)


def encode(params: dict, images: torch.Tensor, key: Key | None = None, *, config: Flux2VAEConfig, **tiling) -> torch.Tensor:
    """Normalized patchified latents (B, 4C, H/16, W/16) of images (B, 3, H, W) in [−1, 1].

    ``z`` is the posterior mode, or with a ``key`` a sample; ``tiling`` (``tiled``, ``tile_size``,
    ``tile_overlap``) as :func:`dsf.model_parts.flux_vae.encode`.

    >>> cfg = Flux2VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> encode(init_vae(cfg, dsf.random.key(0)), torch.zeros(2, 3, 4, 6), config=cfg).shape
    torch.Size([2, 16, 2, 3])
    """
    multiple = 2 * config.downsample_factor
    if isinstance(images, torch.Tensor) and images.ndim == 4 and (images.shape[-2] % multiple or images.shape[-1] % multiple):
        raise ValueError(
            f"images have height {images.shape[-2]} and width {images.shape[-1]}, which must both be multiples of "
            f"{multiple} (the VAE downsamples {config.downsample_factor}× and the pipeline cuts 2×2 patches): "
            f"resize or crop to e.g. {images.shape[-2] // multiple * multiple}×{images.shape[-1] // multiple * multiple}"
        )
    z = patchify(flux_vae.encode(params, images, key, config=config, **tiling))
    mean, std = _statistics(params, config, z)
    return (z - mean) / std


def decode(params: dict, latents: torch.Tensor, *, config: Flux2VAEConfig, **tiling) -> torch.Tensor:
    """Images (B, 3, 16h, 16w), about [−1, 1] (not clamped), of normalized patchified latents (B, 4C, h, w).

    >>> cfg = Flux2VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> decode(init_vae(cfg, dsf.random.key(0)), torch.zeros(1, 16, 2, 3), config=cfg).shape
    torch.Size([1, 3, 4, 6])
    """
    if not fits(latents, (None, config.patch_channels, None, None)):
        raise ValueError(
            f"latents have shape {shape_of(latents)}; this FLUX.2 VAE decodes the pipeline's normalized patchified "
            f"latents (B, {config.patch_channels}, H/16, W/16): unpack DiT tokens to (B, C, h, w) first"
        )
    mean, std = _statistics(params, config, latents)
    return flux_vae.decode(params, unpatchify(latents * std + mean), config=config, **tiling)


@dataclass(frozen=True)
class Flux2VAE:
    """A FLUX.2 VAE: its config, with :func:`encode` and :func:`decode` as methods taking the params.

    >>> Flux2VAE(Flux2VAEConfig()).config.patch_channels
    128
    """

    config: Flux2VAEConfig

    def encode(self, params: dict, images: torch.Tensor, key: Key | None = None, **tiling) -> torch.Tensor:
        return encode(params, images, key, config=self.config, **tiling)

    def decode(self, params: dict, latents: torch.Tensor, **tiling) -> torch.Tensor:
        return decode(params, latents, config=self.config, **tiling)


# ----------------------------------------------------------------------------- checkpoints


def _renest(flat: Mapping[str, torch.Tensor], moves: Mapping[str, str]) -> dict[str, torch.Tensor]:
    moved = {}
    for key, tensor in flat.items():
        source = next((prefix for prefix in moves if key.startswith(prefix)), None)
        moved[key if source is None else moves[source] + key[len(source):]] = tensor
    return moved


def bfl_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat BFL ``ae.safetensors`` state dict in our (diffusers ``AutoencoderKLFlux2``) layout.

    >>> sorted(bfl_to_ours({"encoder.quant_conv.bias": torch.zeros(1), "encoder.down.0.block.0.conv1.bias": torch.zeros(1),
    ...                     "bn.running_mean": torch.zeros(1)}))
    ['bn.running_mean', 'encoder.down_blocks.0.resnets.0.conv1.bias', 'quant_conv.bias']
    """
    return flux_vae_keys.ldm_to_ours(_renest(flat, {bfl: ours for ours, bfl in BFL_NESTED.items()}))


def ours_to_bfl(params) -> dict[str, torch.Tensor]:
    """The flat BFL ``ae.safetensors`` state dict of a parameter tree (or flat dict) in our layout.

    >>> sorted(ours_to_bfl({"post_quant_conv": {"weight": torch.zeros(1)}, "bn": {"running_var": torch.ones(1)}}))
    ['bn.running_var', 'decoder.post_quant_conv.weight']
    """
    return _renest(flux_vae_keys.ours_to_ldm(params), BFL_NESTED)


_REQUIRED = {  # AutoencoderKLFlux2 config keys with one value we support: (check, what it must be)
    "patch_size": (lambda v: tuple(v) == (PATCH, PATCH), f"[{PATCH}, {PATCH}] (the pipeline's 2×2 patches)"),
    "decoder_block_out_channels": (lambda v: v is None, "null (the decoder mirrors the encoder's widths)"),
}
_IGNORED = ("batch_norm_momentum",)  # how training would update the statistics; the statistics are loaded


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """Flux2VAEConfig fields from ``AutoencoderKLFlux2`` config keys; ``strict`` rejects keys it does not know.

    >>> fields_from_diffusers({"latent_channels": 32, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1,
    ...                        "patch_size": [2, 2], "_class_name": "AutoencoderKLFlux2"}, strict=True)
    {'latent_channels': 32, 'batch_norm_eps': 0.0001}
    """
    known = {f.name for f in dataclasses.fields(Flux2VAEConfig)} | set(flux_vae_keys.DIFFUSERS_REQUIRED) | set(_REQUIRED)
    if strict:
        loading.check_known_config_keys(config, known | {*flux_vae_keys.DIFFUSERS_IGNORED, *_IGNORED}, known, "AutoencoderKLFlux2")
    loading.check_supported_values(config, _REQUIRED, "AutoencoderKLFlux2", "FLUX.2 VAE")
    network = {k: v for k, v in config.items() if k not in {*_REQUIRED, *_IGNORED, "batch_norm_eps"}}
    fields = flux_vae_keys.fields_from_diffusers(network, strict=False)
    return fields | ({"batch_norm_eps": config["batch_norm_eps"]} if config.get("batch_norm_eps") is not None else {})


def resolve_vae_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | Flux2VAEConfig | None = None
) -> Flux2VAEConfig:
    """The config of a checkpoint: FLUX.2 defaults < its shapes < its ``config.json`` < ``config``.

    >>> resolve_vae_config({"decoder.conv_in.weight": (512, 16, 3, 3)}, {"batch_norm_eps": 1e-5}).latent_channels
    16
    """
    if isinstance(config, Flux2VAEConfig):
        return config
    found = flux_vae_keys.fields_from_shapes(shapes)
    return Flux2VAEConfig(**loading.config_fields(found, config_json, config, fields_from_diffusers))


VAE = Checkpoint(
    what="FLUX.2 VAE",
    class_name="AutoencoderKLFlux2",
    folder="vae",
    layouts=(
        Layout("bfl", marks=("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.", "encoder.quant_conv."),
               to_ours=bfl_to_ours, from_ours=ours_to_bfl),
        Layout("diffusers", marks=("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")),
    ),
    resolve_config=resolve_vae_config,
    param_shapes=vae_param_shapes,
    build=Flux2VAE,
    misfit_hint=(
        "Known layouts: diffusers AutoencoderKLFlux2 (encoder.down_blocks.N..., quant_conv, bn.running_mean), BFL "
        "ae.safetensors (encoder.down.N.block.M..., encoder.quant_conv, bn.running_mean). If the sizes differ, pass "
        "config= (AutoencoderKLFlux2 config keys)."
    ),
    wrapper_prefixes=flux_vae_keys.LDM_PREFIXES,
    wrapper_parts=("encoder.", "decoder."),
    dropped_keys=re.compile(r"bn\.num_batches_tracked"),
)


def load_vae(source: Source, config: Mapping | Flux2VAEConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(vae, params)`` from a FLUX.2 VAE checkpoint in the diffusers or BFL layout; the batch-norm running statistics
    load with the weights.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers
    pipeline folder (its ``vae/``). The config is: FLUX.2 defaults < the checkpoint's shapes < the ``config.json``
    beside the weights < ``config`` (``AutoencoderKLFlux2`` config keys, or a :class:`Flux2VAEConfig`).

    >>> cfg = Flux2VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vae, vparams = load_vae(ours_to_bfl(init_vae(cfg, dsf.random.key(0))), {"norm_num_groups": 4})
    >>> vae.config == cfg, vparams["bn"]["running_mean"].shape
    (True, torch.Size([16]))
    """
    return VAE.load(source, config, dtype=dtype, device=device)


def vae_params_meta(config: Flux2VAEConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The full parameter tree on the ``meta`` device.

    >>> round(dsf.tree.num_params(vae_params_meta(Flux2VAEConfig())) / 1e6, 1)
    84.0
    """
    flat = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in vae_param_shapes(config).items()}
    return dsf.tree.unflatten_dict(flat)

