"""FLUX.1 VAE checkpoint layouts and loading: ours (= diffusers ``AutoencoderKL``) and LDM/BFL (``ae.safetensors``).

The LDM layout (BFL's ``ae.safetensors``, Stable Diffusion's ``first_stage_model.``) names levels
``encoder.down.N.block.M`` and ``decoder.up.N...`` with the decoder levels numbered in reverse
(``up.0`` is the last, full-resolution level), the mid block ``mid.block_1 / attn_1 / block_2``,
the shortcut ``nin_shortcut`` and the head ``norm_out``; its attention q/k/v/proj_out are 1×1 conv
weights (C, C, 1, 1) where diffusers has linear ones (C, C). :data:`VAE` (the family contract's
checkpoint record) and :func:`load_vae` read either layout, detected from the keys.

A loaded VAE's config is: the FLUX.1 defaults < what the checkpoint's shapes say < the diffusers
``config.json`` beside the weights < the ``config=`` the caller passes (``AutoencoderKL`` config
keys, or a whole :class:`FluxVAEConfig`). ``norm_num_groups`` and the scale/shift are not in the
shapes: a non-FLUX VAE without its ``config.json`` needs them in ``config=``.

Example:
    >>> import dsf
    >>> from dsf.model_parts.flux_vae import init_vae
    >>> cfg = FluxVAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    >>> ldm = ours_to_ldm(init_vae(cfg, dsf.random.key(0)))
    >>> tuple(ldm["decoder.mid.attn_1.q.weight"].shape), "decoder.up.0.block.0.nin_shortcut.weight" in ldm
    ((16, 16, 1, 1), True)
    >>> sorted(ldm_to_ours(ldm)) == sorted(dsf.tree.flatten_dict(init_vae(cfg, dsf.random.key(0))))
    True
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Mapping

import torch

from dsf.files import loading
from dsf.files.io import Source
from dsf.model_parts.family import Checkpoint, Layout
from dsf.model_parts.flux_vae import FluxVAE, FluxVAEConfig, vae_param_shapes
from dsf.tree import flatten_dict

LDM_PREFIXES = ("first_stage_model.", "vae.")  # a VAE inside a whole-pipeline LDM / ComfyUI file
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers AutoencoderKL (encoder.down_blocks.N.resnets.M...), LDM/BFL ae.safetensors "
    f"(encoder.down.N.block.M..., optionally prefixed {' or '.join(map(repr, LDM_PREFIXES))}). "
    "If the sizes differ, pass config= (AutoencoderKL config keys)."
)

# (our key prefix, LDM key prefix), first match wins. {part}: encoder or decoder; {i}, {j}: indices;
# {r}: the LDM number of our decoder level i, levels − 1 − i.
_RENAMES = (
    ("{part}.conv_norm_out.", "{part}.norm_out."),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.", "encoder.down.{i}.block.{j}.nin_shortcut."),
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{i}.resnets.{j}.conv_shortcut.", "decoder.up.{r}.block.{j}.nin_shortcut."),
    ("decoder.up_blocks.{i}.resnets.{j}.", "decoder.up.{r}.block.{j}."),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up.{r}.upsample."),
    ("{part}.mid_block.resnets.0.", "{part}.mid.block_1."),
    ("{part}.mid_block.resnets.1.", "{part}.mid.block_2."),
    ("{part}.mid_block.attentions.0.group_norm.", "{part}.mid.attn_1.norm."),
    ("{part}.mid_block.attentions.0.to_q.", "{part}.mid.attn_1.q."),
    ("{part}.mid_block.attentions.0.to_k.", "{part}.mid.attn_1.k."),
    ("{part}.mid_block.attentions.0.to_v.", "{part}.mid.attn_1.v."),
    ("{part}.mid_block.attentions.0.to_out.0.", "{part}.mid.attn_1.proj_out."),
)
_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_PLACEHOLDER_PATTERNS = {"part": "encoder|decoder", "i": r"\d+", "j": r"\d+", "r": r"\d+"}


def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    parts = (re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_PLACEHOLDER_PATTERNS[p]})" for n, p in enumerate(pieces))
    return re.compile("".join(parts))


_RULES = tuple((_template_regex(ours), _template_regex(ldm), ours, ldm) for ours, ldm in _RENAMES)


def _rename(key: str, to_ldm: bool, levels: int) -> str:
    """``key`` in the other layout; keys named alike in both (``conv_in``, ``quant_conv``, ...) or unknown stay."""
    for ours_regex, ldm_regex, ours, ldm in _RULES:
        match = (ours_regex if to_ldm else ldm_regex).match(key)
        if match:
            found = match.groupdict()
            if "i" in found:
                found["r"] = str(levels - 1 - int(found["i"]))
            elif "r" in found:
                found["i"] = str(levels - 1 - int(found["r"]))
            return (ldm if to_ldm else ours).format(**found) + key[match.end() :]
    return key


def ldm_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat LDM/BFL VAE state dict in our (diffusers) layout; attention 1×1 conv weights become linear views.

    Keys it does not know are kept under their name, for the key check to report.

    >>> ours = ldm_to_ours({"decoder.up.0.block.1.conv1.bias": torch.zeros(1), "decoder.up.1.upsample.conv.bias": torch.zeros(1),
    ...                     "encoder.mid.attn_1.q.weight": torch.zeros(4, 4, 1, 1)})
    >>> sorted(ours)  # doctest: +NORMALIZE_WHITESPACE
    ['decoder.up_blocks.0.upsamplers.0.conv.bias', 'decoder.up_blocks.1.resnets.1.conv1.bias',
     'encoder.mid_block.attentions.0.to_q.weight']
    >>> tuple(ours["encoder.mid_block.attentions.0.to_q.weight"].shape)
    (4, 4)
    """
    levels = loading.numbered_count(flat, "decoder.up.")
    ours = {}
    for key, tensor in flat.items():
        name = _rename(key, to_ldm=False, levels=levels)
        ours[name] = tensor.flatten(1) if _ATTENTION_WEIGHT.search(name) else tensor
    return ours


def ours_to_ldm(params) -> dict[str, torch.Tensor]:
    """The flat LDM/BFL state dict (``ae.safetensors`` names) of a parameter tree or flat dict in our layout.

    >>> ldm = ours_to_ldm({"decoder.up_blocks.0.resnets.2.conv_shortcut.weight": torch.zeros(1),
    ...                    "decoder.up_blocks.1.resnets.0.norm1.weight": torch.zeros(1),
    ...                    "encoder.mid_block.attentions.0.to_out.0.weight": torch.zeros(4, 4)})
    >>> sorted(ldm)  # doctest: +NORMALIZE_WHITESPACE
    ['decoder.up.0.block.0.norm1.weight', 'decoder.up.1.block.2.nin_shortcut.weight',
     'encoder.mid.attn_1.proj_out.weight']
    >>> tuple(ldm["encoder.mid.attn_1.proj_out.weight"].shape)
    (4, 4, 1, 1)
    """
    flat = flatten_dict(params)
    levels = loading.numbered_count(flat, "decoder.up_blocks.")
    return {
        _rename(key, to_ldm=True, levels=levels): tensor[:, :, None, None] if _ATTENTION_WEIGHT.search(key) else tensor
        for key, tensor in flat.items()
    }


DIFFUSERS_REQUIRED = {  # AutoencoderKL config keys with one value the FLUX VAE supports: (check, what it must be)
    "act_fn": (lambda v: v == "silu", "'silu'"),
    "down_block_types": (lambda v: all(t == "DownEncoderBlock2D" for t in v), "all 'DownEncoderBlock2D'"),
    "up_block_types": (lambda v: all(t == "UpDecoderBlock2D" for t in v), "all 'UpDecoderBlock2D'"),
    "latents_mean": (lambda v: v is None, "null (per-channel latent statistics are another VAE family)"),
    "latents_std": (lambda v: v is None, "null (per-channel latent statistics are another VAE family)"),
}
DIFFUSERS_IGNORED = ("sample_size", "force_upcast")  # diffusers' tiling and precision hints
_SIZE_READINGS = {  # FluxVAEConfig field -> (key, axis) of the checkpoint shape that holds it
    "in_channels": ("encoder.conv_in.weight", 1),
    "out_channels": ("decoder.conv_out.weight", 0),
    "latent_channels": ("decoder.conv_in.weight", 1),
}


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """FluxVAEConfig fields from ``AutoencoderKL`` config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` are skipped, as are ``None`` values, except ``shift_factor: null`` (no shift).

    >>> config_json = {"norm_num_groups": 8, "shift_factor": None, "sample_size": 1024, "_class_name": "AutoencoderKL"}
    >>> fields_from_diffusers(config_json, strict=True)
    {'norm_num_groups': 8, 'shift_factor': 0.0}
    """
    known = {f.name for f in fields(FluxVAEConfig)}
    listed = known | set(DIFFUSERS_REQUIRED)
    if strict:
        loading.check_known_config_keys(config, listed | set(DIFFUSERS_IGNORED), listed, "AutoencoderKL")
    loading.check_supported_values(config, DIFFUSERS_REQUIRED, "AutoencoderKL", "FLUX VAE")
    found = {k: v for k, v in config.items() if k in known and v is not None}
    if "shift_factor" in config and config["shift_factor"] is None:
        found["shift_factor"] = 0.0
    return found


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """FluxVAEConfig fields implied by the shapes of a checkpoint in our layout (absent keys are skipped).

    >>> found = fields_from_shapes({"decoder.conv_in.weight": (512, 16, 3, 3), "quant_conv.weight": (32, 32, 1, 1),
    ...                             "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
    ...                             "encoder.down_blocks.0.resnets.1.conv1.weight": (128, 128, 3, 3)})
    >>> found["latent_channels"], found["block_out_channels"], found["layers_per_block"], found["use_quant_conv"]
    (16, (128,), 2, True)
    """
    found = loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    levels = loading.numbered_count(shapes, "encoder.down_blocks.")
    level_keys = [f"encoder.down_blocks.{i}.resnets.0.conv1.weight" for i in range(levels)]
    if level_keys and all(k in shapes for k in level_keys):
        found["block_out_channels"] = tuple(shapes[k][0] for k in level_keys)
    layers = loading.numbered_count(shapes, "encoder.down_blocks.0.resnets.")
    if layers:
        found["layers_per_block"] = layers
    found["use_quant_conv"] = "quant_conv.weight" in shapes
    found["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    found["mid_block_add_attention"] = any(".mid_block.attentions." in k for k in shapes)
    return found


def resolve_vae_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | FluxVAEConfig | None = None
) -> FluxVAEConfig:
    """The config of a checkpoint: FLUX.1 defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`FluxVAEConfig` passed as ``config`` is taken as is.

    >>> shapes = {"encoder.down_blocks.0.resnets.0.conv1.weight": (64, 64, 3, 3)}
    >>> cfg = resolve_vae_config(shapes, {"norm_num_groups": 16, "scaling_factor": 0.5}, {"scaling_factor": 0.25})
    >>> cfg.block_out_channels, cfg.norm_num_groups, cfg.scaling_factor
    ((64,), 16, 0.25)
    """
    if isinstance(config, FluxVAEConfig):
        return config
    return FluxVAEConfig(**loading.config_fields(fields_from_shapes(shapes), config_json, config, fields_from_diffusers))


VAE = Checkpoint(
    what="FLUX VAE",
    class_name="AutoencoderKL",
    folder="vae",
    layouts=(
        Layout("ldm", marks=("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.", "encoder.norm_out."),
               to_ours=ldm_to_ours, from_ours=ours_to_ldm),
        Layout("diffusers", marks=("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")),
    ),
    resolve_config=resolve_vae_config,
    param_shapes=vae_param_shapes,
    build=FluxVAE,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=LDM_PREFIXES,
    wrapper_parts=("encoder.", "decoder."),
)


def load_vae(source: Source, config: Mapping | FluxVAEConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(vae, params)`` from a FLUX.1 VAE checkpoint in the diffusers or LDM/BFL layout.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers pipeline folder (its
    ``vae/``). The config is: FLUX.1 defaults < the checkpoint's shapes < the ``config.json`` beside
    the weights < ``config`` (``AutoencoderKL`` config keys, or a :class:`FluxVAEConfig`).

    >>> import dsf
    >>> from dsf.model_parts.flux_vae import init_vae
    >>> cfg = FluxVAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    >>> vae, vparams = load_vae(ours_to_ldm(init_vae(cfg, dsf.random.key(0))), {"norm_num_groups": 4})
    >>> vae.config == cfg, len(vparams["decoder"]["up_blocks"][0]["resnets"])
    (True, 2)
    """
    return VAE.load(source, config, dtype=dtype, device=device)
