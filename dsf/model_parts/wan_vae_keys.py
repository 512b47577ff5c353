"""Wan VAE checkpoint layouts and loading: ours (= diffusers ``AutoencoderKLWan``) and the original Wan one.

The original layout (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``, converted to safetensors; DiffSynth
prefixes it ``model.``) names the stems ``encoder.conv1`` / ``head.0`` / ``head.2``, the mid block
``middle.0 / 1 / 2``, the quant convs ``conv1`` / ``conv2``, and a residual block's parts
``residual.0`` (norm1), ``residual.2`` (conv1), ``residual.3`` (norm2), ``residual.6`` (conv2) and
``shortcut``. Wan 2.1 keeps each side's levels in one flat list (``encoder.downsamples.K``,
``decoder.upsamples.K``: the residual blocks of each level, then its resampler); diffusers splits
the decoder's into ``up_blocks.N.resnets.M`` / ``upsamplers.0``. Wan 2.2 nests them
(``encoder.downsamples.N.downsamples.M``), diffusers names them ``down_blocks.N.resnets.M`` /
``downsampler`` (``up_blocks.N.resnets.M`` / ``upsampler``). :data:`VAE` (the family contract's
checkpoint record) and :func:`load_vae` read either layout, detected from the keys.

A loaded VAE's config is: the Wan 2.1 defaults (Wan 2.2's for a checkpoint with residual levels) <
what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights < the
``config=`` the caller passes (``AutoencoderKLWan`` config keys, or a whole :class:`WanVAEConfig`).
The patch size and the latent statistics are not in the shapes.

Example:
    >>> import dsf
    >>> from dsf.model_parts.wan_vae import init_vae
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
    ...                    latents_mean=(0, 0), latents_std=(1, 1))
    >>> ours = dsf.tree.flatten_dict(init_vae(cfg, dsf.random.key(0)))
    >>> original = ours_to_original_vae(ours)
    >>> tuple(original["decoder.upsamples.3.shortcut.weight"].shape), tuple(original["decoder.upsamples.5.time_conv.weight"].shape)
    ((8, 4, 1, 1, 1), (16, 8, 3, 1, 1))
    >>> original_vae_to_ours(original).keys() == ours.keys()
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields

import torch

from dsf.files import loading
from dsf.files.io import Source
from dsf.model_parts.family import Checkpoint, Layout
from dsf.model_parts.wan_vae import WAN21_VAE_CONFIG, WAN22_VAE_CONFIG, WanVAE, WanVAEConfig, vae_param_shapes
from dsf.tree import flatten_dict

ORIGINAL_PREFIXES = ("model.",)  # DiffSynth's WanVideoVAE wraps the original module as .model
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers AutoencoderKLWan (encoder.conv_in, encoder.down_blocks.N..., decoder.up_blocks.N.resnets.M...), "
    "original Wan2.1_VAE.pth / Wan2.2_VAE.pth converted to safetensors (encoder.conv1, encoder.downsamples.N..., "
    f"optionally prefixed {' or '.join(map(repr, ORIGINAL_PREFIXES))}). "
    "If the sizes differ, pass config= (AutoencoderKLWan config keys)."
)
_RESIDUAL_PARTS = (  # (ours, original) inside a residual block
    ("norm1.", "residual.0."),
    ("conv1.", "residual.2."),
    ("norm2.", "residual.3."),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)
_STEMS = (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2."))
_PART_STEMS = (
    ("conv_in.", "conv1."),
    ("norm_out.", "head.0."),
    ("conv_out.", "head.2."),
    ("mid_block.resnets.0.", "middle.0."),
    ("mid_block.attentions.0.", "middle.1."),
    ("mid_block.resnets.1.", "middle.2."),
)


def _level_modules(residual: bool, levels: int, blocks: int) -> list[tuple[str, str]]:
    """(our prefix, original prefix) of each residual block and resampler of the encoder and decoder levels."""
    pairs = []
    for level in range(levels):
        if residual:
            ours, original = f"encoder.down_blocks.{level}.", f"encoder.downsamples.{level}.downsamples."
            pairs += [(f"{ours}resnets.{j}.", f"{original}{j}.") for j in range(blocks)]
            pairs.append((f"{ours}downsampler.", f"{original}{blocks}."))
            ours, original = f"decoder.up_blocks.{level}.", f"decoder.upsamples.{level}.upsamples."
            pairs += [(f"{ours}resnets.{j}.", f"{original}{j}.") for j in range(blocks + 1)]
            pairs.append((f"{ours}upsampler.", f"{original}{blocks + 1}."))
        else:
            first = level * (blocks + 1)  # the encoder's flat list is the same in both layouts
            pairs += [(f"encoder.down_blocks.{k}.", f"encoder.downsamples.{k}.") for k in range(first, first + blocks + 1)]
            first = level * (blocks + 2)
            ours = f"decoder.up_blocks.{level}."
            pairs += [(f"{ours}resnets.{j}.", f"decoder.upsamples.{first + j}.") for j in range(blocks + 1)]
            pairs.append((f"{ours}upsamplers.0.", f"decoder.upsamples.{first + blocks + 1}."))
    return pairs


def module_renames(residual: bool, levels: int, blocks: int) -> dict[str, str]:
    """``{our module prefix: original module prefix}`` for a VAE of ``levels`` levels of ``blocks`` residual blocks.

    >>> renames = module_renames(residual=False, levels=4, blocks=2)
    >>> renames["decoder.up_blocks.1.resnets.0."], renames["decoder.up_blocks.2.upsamplers.0."], renames["quant_conv."]
    ('decoder.upsamples.4.', 'decoder.upsamples.11.', 'conv1.')
    """
    pairs = list(_STEMS)
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.{ours}", f"{part}.{original}") for ours, original in _PART_STEMS]
    return dict(pairs + _level_modules(residual, levels, blocks))


def _indices(keys, pattern: str) -> set[int]:
    """The distinct integers a regex group ``(\\d+)`` takes over the keys it matches."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, keys) if m}


def structure(keys, layout: str) -> tuple[bool, int, int]:
    """``(is_residual, levels, num_res_blocks)`` of a checkpoint, read off its key names in ``layout``.

    >>> structure(["decoder.upsamples.0.residual.2.weight", "decoder.upsamples.1.resample.1.weight",
    ...            "decoder.upsamples.2.residual.2.weight"], "original")
    (False, 2, 0)
    """
    keys = list(keys)
    if layout == "diffusers":
        residual = bool(_indices(keys, r"encoder\.down_blocks\.(\d+)\.resnets\."))
        levels = len(_indices(keys, r"decoder\.up_blocks\.(\d+)\."))
        return residual, levels, len(_indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")) - 1
    residual = bool(_indices(keys, r"decoder\.upsamples\.(\d+)\.upsamples\."))
    if residual:
        levels = len(_indices(keys, r"decoder\.upsamples\.(\d+)\."))
        return residual, levels, len(_indices(keys, r"decoder\.upsamples\.0\.upsamples\.(\d+)\.(?:residual|shortcut)\.")) - 1
    entries = len(_indices(keys, r"decoder\.upsamples\.(\d+)\."))
    resamplers = len(_indices(keys, r"decoder\.upsamples\.(\d+)\.(?:resample|time_conv)\."))
    levels = resamplers + 1 if entries else 0
    return residual, levels, (entries - resamplers) // max(levels, 1) - 1


def _split_module(key: str, renames: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module prefix in renames, rest)`` of a key, or None when no module of ``renames`` holds it."""
    for end in (i + 1 for i, char in enumerate(key) if char == "."):
        if key[:end] in renames:
            return key[:end], key[end:]
    return None


def _rename(key: str, renames: Mapping[str, str], parts: tuple[tuple[str, str], ...]) -> str:
    found = _split_module(key, renames)
    if found is None:
        return key
    module, rest = found
    for source, target in parts:
        if rest.startswith(source):
            rest = target + rest[len(source) :]
            break
    return renames[module] + rest


def original_vae_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat original-layout Wan VAE state dict in our (diffusers) layout; keys it does not know keep their name.

    >>> from dsf.model_parts.wan_vae import init_vae
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
    ...                    latents_mean=(0, 0), latents_std=(1, 1))
    >>> original = ours_to_original_vae(init_vae(cfg, __import__("dsf").random.key(0)))
    >>> ours = original_vae_to_ours(original)
    >>> torch.equal(ours["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"], original["decoder.upsamples.3.shortcut.weight"])
    True
    """
    renames = {original: ours for ours, original in module_renames(*structure(flat, "original")).items()}
    parts = tuple((original, ours) for ours, original in _RESIDUAL_PARTS)
    return {_rename(key, renames, parts): tensor for key, tensor in flat.items()}


def ours_to_original_vae(params) -> dict[str, torch.Tensor]:
    """The flat original-layout state dict (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` names) of a tree or flat dict in ours.

    >>> from dsf.model_parts.wan_vae import init_vae
    >>> original = ours_to_original_vae(init_vae(WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), temperal_downsample=(True,),
    ...                                                       is_residual=True, latents_mean=(0, 0), latents_std=(1, 1)),
    ...                                          __import__("dsf").random.key(0)))
    >>> tuple(original["encoder.downsamples.0.downsamples.2.time_conv.weight"].shape)
    (4, 4, 3, 1, 1)
    >>> tuple(original["decoder.upsamples.0.upsamples.3.resample.1.weight"].shape)
    (8, 8, 3, 3)
    """
    flat = flatten_dict(params)
    renames = module_renames(*structure(flat, "diffusers"))
    return {_rename(key, renames, _RESIDUAL_PARTS): tensor for key, tensor in flat.items()}


DIFFUSERS_REQUIRED = {  # AutoencoderKLWan config keys with one value the Wan VAE supports: (check, what it must be)
    "attn_scales": (lambda v: not v, "[] (attention inside the levels is not implemented; no released Wan VAE has it)"),
}
DIFFUSERS_IGNORED = (  # derived from the architecture, training-only, or unused by the installed diffusers (which always clamps)
    "scale_factor_spatial", "scale_factor_temporal", "dropout", "clip_output",
)
RGB_PATCH_SIZES = {3: None, 12: 2}  # encoder input channels -> the pixel patch side they imply for RGB videos
NULLABLE = ("decoder_base_dim", "patch_size")  # fields where null has a meaning (same as base_dim; no patches)
_SIZE_READINGS = {  # WanVAEConfig field -> (key, axis) of the checkpoint shape that holds it
    "in_channels": ("encoder.conv_in.weight", 1),
    "base_dim": ("encoder.conv_in.weight", 0),
    "z_dim": ("decoder.conv_in.weight", 1),
    "out_channels": ("decoder.conv_out.weight", 0),
}


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """WanVAEConfig fields from ``AutoencoderKLWan`` config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` are skipped, as are ``None`` values except for ``decoder_base_dim`` and ``patch_size``.

    >>> fields_from_diffusers({"z_dim": 48, "patch_size": None, "dropout": 0.0, "_class_name": "AutoencoderKLWan"}, strict=True)
    {'z_dim': 48, 'patch_size': None}
    """
    known = {f.name for f in fields(WanVAEConfig)}
    listed = known | set(DIFFUSERS_REQUIRED)
    if strict:
        loading.check_known_config_keys(config, listed | set(DIFFUSERS_IGNORED), listed, "AutoencoderKLWan")
    loading.check_supported_values(config, DIFFUSERS_REQUIRED, "AutoencoderKLWan", "Wan VAE")
    return {k: v for k, v in config.items() if k in known and (v is not None or k in NULLABLE)}


def _encoder_level_keys(residual: bool, levels: int, blocks: int) -> list[tuple[str, str]]:
    """(first residual block's conv1 weight, temporal downsampler weight) keys of each encoder level, in our layout."""
    if residual:
        return [(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", f"encoder.down_blocks.{i}.downsampler.time_conv.weight")
                for i in range(levels)]
    return [(f"encoder.down_blocks.{i * (blocks + 1)}.conv1.weight", f"encoder.down_blocks.{i * (blocks + 1) + blocks}.time_conv.weight")
            for i in range(levels)]


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """WanVAEConfig fields implied by the shapes of a checkpoint in our layout (absent keys are skipped).

    The patch size is read off the encoder's input channels, RGB assumed (12 = 3·2·2: Wan 2.2's 2×2 patches).

    >>> found = fields_from_shapes(vae_param_shapes(WAN22_VAE_CONFIG))
    >>> found["base_dim"], found["decoder_base_dim"], found["z_dim"], found["dim_mult"], found["temperal_downsample"]
    (160, 256, 48, (1, 2, 4, 4), (False, True, True))
    """
    residual, levels, blocks = structure(shapes, "diffusers")
    found = {"is_residual": residual} | loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    if "in_channels" in found:
        found["patch_size"] = RGB_PATCH_SIZES.get(found["in_channels"])
    if levels < 1:
        return found
    found["num_res_blocks"] = blocks
    level_keys = _encoder_level_keys(residual, levels, blocks)
    widths = [shapes[conv][0] for conv, _ in level_keys if conv in shapes]
    base = found.get("base_dim")
    if base and len(widths) == levels and all(w % base == 0 for w in widths):
        found["dim_mult"] = tuple(w // base for w in widths)
        found["temperal_downsample"] = tuple(time_conv in shapes for _, time_conv in level_keys[:-1])
        last_decoder_conv = f"decoder.up_blocks.{levels - 1}.resnets.0.conv1.weight"
        if last_decoder_conv in shapes:
            decoder_width = shapes[last_decoder_conv][0]
            found["decoder_base_dim"] = None if decoder_width == widths[0] else decoder_width // found["dim_mult"][0]
    return found


def resolve_vae_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | WanVAEConfig | None = None
) -> WanVAEConfig:
    """The config of a checkpoint: Wan 2.1 (or, with residual levels, 2.2) defaults < shapes < ``config.json`` < ``config``.

    A :class:`WanVAEConfig` passed as ``config`` is taken as is.

    >>> cfg = resolve_vae_config(vae_param_shapes(WAN22_VAE_CONFIG), {"z_dim": 48}, {"patch_size": 2})
    >>> cfg == WAN22_VAE_CONFIG
    True
    """
    if isinstance(config, WanVAEConfig):
        return config
    found = fields_from_shapes(shapes)
    defaults = WAN22_VAE_CONFIG if found["is_residual"] else WAN21_VAE_CONFIG
    defaults_and_shapes = {f.name: getattr(defaults, f.name) for f in fields(WanVAEConfig)} | found
    return WanVAEConfig(**loading.config_fields(defaults_and_shapes, config_json, config, fields_from_diffusers))


VAE = Checkpoint(
    what="Wan VAE",
    class_name="AutoencoderKLWan",
    folder="vae",
    layouts=(
        Layout("original", marks=tuple(f"{part}.{name}." for part in ("encoder", "decoder") for name in ("conv1", "middle", "head"))
               + ("encoder.downsamples.", "decoder.upsamples."), to_ours=original_vae_to_ours, from_ours=ours_to_original_vae),
        Layout("diffusers", marks=("encoder.conv_in.", "encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.",
                                   "decoder.mid_block.")),
    ),
    resolve_config=resolve_vae_config,
    param_shapes=vae_param_shapes,
    build=WanVAE,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=ORIGINAL_PREFIXES,
    wrapper_parts=("encoder.", "decoder."),
)


def load_vae(source: Source, config: Mapping | WanVAEConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(vae, params)`` from a Wan 2.1 or 2.2 VAE checkpoint in the diffusers or original layout.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers pipeline
    folder (its ``vae/``). The config is: Wan 2.1 (2.2 for residual levels) defaults < the checkpoint's shapes < the
    ``config.json`` beside the weights < ``config`` (``AutoencoderKLWan`` config keys, or a :class:`WanVAEConfig`).

    >>> import dsf
    >>> from dsf.model_parts.wan_vae import init_vae
    >>> cfg = WanVAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), temperal_downsample=(True,), latents_mean=(0, 0), latents_std=(1, 1))
    >>> vae, vparams = load_vae(ours_to_original_vae(init_vae(cfg, dsf.random.key(0))), {"latents_mean": [0, 0], "latents_std": [1, 1]})
    >>> vae.config == cfg, len(vparams["decoder"]["up_blocks"][0]["resnets"])
    (True, 3)
    """
    return VAE.load(source, config, dtype=dtype, device=device)
