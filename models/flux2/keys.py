"""FLUX.2 DiT checkpoint layouts: ours (= diffusers ``Flux2Transformer2DModel``), BFL's original, and ComfyUI's
prefixed BFL.

BFL's single files (``flux2-dev.safetensors``, ``flux2-klein-4b.safetensors``, ...) differ from ours by
names, by the double blocks' fused projections (``img_attn.qkv`` = q, k, v) and by the final modulation,
whose two halves are (shift, scale) in BFL and (scale, shift) in diffusers. The single blocks' fused
``linear1`` (q, k, v, SwiGLU input) is fused in both. ComfyUI files put ``model.diffusion_model.``
before BFL keys. The table :data:`RULES` is the whole conversion; :data:`DIT` (the family contract's
checkpoint record) and :func:`load_dit` read any layout, detected from the keys.

Example:
    >>> import dsf
    >>> from dsf.models.flux2.model import init_dit
    >>> from dsf.models.flux2.config import Flux2Config
    >>> cfg = Flux2Config(num_heads=1, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1,
    ...                   num_single_blocks=1, context_dim=8)
    >>> bfl = ours_to_bfl(init_dit(cfg, dsf.random.key(0)))
    >>> tuple(bfl["double_blocks.0.img_attn.qkv.weight"].shape)
    (48, 16)
    >>> ours, layout = DIT.to_ours(bfl)
    >>> layout, sorted(ours) == sorted(dsf.tree.flatten_dict(init_dit(cfg, dsf.random.key(0))))
    ('bfl', True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from dsf.files.io import Source
from dsf.model_parts.family import Checkpoint, Layout
from dsf.models.flux2.config import Flux2Config, resolve_config
from dsf.models.flux2.model import Flux2DiT, param_shapes
from dsf.tree import flatten_dict

COMFY_PREFIX = "model.diffusion_model."
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers (x_embedder.weight, transformer_blocks.N..., single_stream_modulation.linear...), "
    f"BFL (img_in.weight, double_blocks.N..., single_stream_modulation.lin...), BFL with ComfyUI's {COMFY_PREFIX!r} "
    "prefix. If the sizes differ, pass config= (diffusers config keys)."
)


@dataclass(frozen=True)
class Rule:
    """One BFL key and the key(s) of ours it holds: ``{i}`` is a block index; several of ours are row blocks of equal
    size (a fused q, k, v); ``swapped`` when the two row halves trade places."""

    bfl: str
    ours: tuple[str, ...]
    swapped: bool = False


def _renamed(bfl: str, ours: str, leaves: tuple[str, str] = ("weight", "weight")) -> Rule:
    return Rule(f"{bfl}.{leaves[0]}", (f"{ours}.{leaves[1]}",))


def _fused(bfl: str, ours: tuple[str, ...]) -> Rule:
    return Rule(f"{bfl}.weight", tuple(f"{part}.weight" for part in ours))


_SCALE = ("scale", "weight")  # BFL's RMSNorm scale is diffusers' RMSNorm weight
RULES = (
    _renamed("img_in", "x_embedder"),
    _renamed("txt_in", "context_embedder"),
    _renamed("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    _renamed("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    _renamed("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    _renamed("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    _renamed("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    _renamed("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    _renamed("single_stream_modulation.lin", "single_stream_modulation.linear"),
    Rule("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), swapped=True),
    _renamed("final_layer.linear", "proj_out"),
    _fused("double_blocks.{i}.img_attn.qkv", tuple(f"transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv")),
    _fused("double_blocks.{i}.txt_attn.qkv", tuple(f"transformer_blocks.{{i}}.attn.add_{p}_proj" for p in "qkv")),
    _renamed("double_blocks.{i}.img_attn.norm.query_norm", "transformer_blocks.{i}.attn.norm_q", _SCALE),
    _renamed("double_blocks.{i}.img_attn.norm.key_norm", "transformer_blocks.{i}.attn.norm_k", _SCALE),
    _renamed("double_blocks.{i}.txt_attn.norm.query_norm", "transformer_blocks.{i}.attn.norm_added_q", _SCALE),
    _renamed("double_blocks.{i}.txt_attn.norm.key_norm", "transformer_blocks.{i}.attn.norm_added_k", _SCALE),
    _renamed("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
    _renamed("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
    _renamed("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.linear_in"),
    _renamed("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.linear_out"),
    _renamed("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.linear_in"),
    _renamed("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.linear_out"),
    _renamed("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"),
    _renamed("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.attn.to_out"),
    _renamed("single_blocks.{i}.norm.query_norm", "single_transformer_blocks.{i}.attn.norm_q", _SCALE),
    _renamed("single_blocks.{i}.norm.key_norm", "single_transformer_blocks.{i}.attn.norm_k", _SCALE),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_BY_BFL = [(_pattern(rule.bfl), rule) for rule in RULES]
_BY_OURS = [(_pattern(part), rule) for rule in RULES for part in rule.ours]


def _match(key: str, table) -> tuple[Rule, str | None] | None:
    """``(rule, block index or None)`` of the first rule whose template the key fits, or ``None``."""
    for pattern, rule in table:
        found = pattern.fullmatch(key)
        if found:
            return rule, found.groupdict().get("i")
    return None


def _filled(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat BFL state dict in our (diffusers) key layout; fused q, k, v become views of their thirds.

    Keys it does not know are kept under their name, for the key check to report.

    >>> w = torch.arange(6.0).reshape(6, 1)
    >>> sorted(bfl_to_ours({"double_blocks.2.txt_attn.qkv.weight": w, "foo": w}))
    ['foo', 'transformer_blocks.2.attn.add_k_proj.weight', 'transformer_blocks.2.attn.add_q_proj.weight', 'transformer_blocks.2.attn.add_v_proj.weight']
    >>> bfl_to_ours({"final_layer.adaLN_modulation.1.weight": w})["norm_out.linear.weight"].flatten().tolist()
    [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    """
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in flat.items():
        found = _match(key, _BY_BFL)
        if found is None:
            ours[key] = tensor
            continue
        rule, index = found
        if rule.swapped:
            tensor = _swap_halves(tensor)
        if len(rule.ours) > 1 and tensor.shape[0] % len(rule.ours):
            raise ValueError(f"BFL weight {key!r} has {tensor.shape[0]} rows, not {len(rule.ours)} equal parts "
                             f"({', '.join(rule.ours)}); is it transposed?")
        for part, piece in zip(rule.ours, tensor.chunk(len(rule.ours), dim=0)):
            ours[_filled(part, index)] = piece
    return ours


def ours_to_bfl(params) -> dict[str, torch.Tensor]:
    """The flat BFL state dict of a parameter tree (or flat dict) in our layout, ready for ``save_file``.

    >>> w = torch.arange(4.0).reshape(4, 1)
    >>> ours_to_bfl({"norm_out": {"linear": {"weight": w}}})["final_layer.adaLN_modulation.1.weight"].flatten().tolist()
    [2.0, 3.0, 0.0, 1.0]
    """
    flat = flatten_dict(params)
    bfl: dict[str, torch.Tensor] = {}
    for key in flat:
        found = _match(key, _BY_OURS)
        if found is None:
            raise ValueError(f"parameter {key!r} has no name in the BFL FLUX.2 layout")
        rule, index = found
        target = _filled(rule.bfl, index)
        if target in bfl:
            continue
        parts = [_filled(part, index) for part in rule.ours]
        absent = [part for part in parts if part not in flat]
        if absent:
            raise ValueError(f"cannot build BFL {target!r}: the parameters {absent} of its fused parts are missing")
        tensor = torch.cat([flat[part] for part in parts], dim=0) if len(parts) > 1 else flat[parts[0]]
        bfl[target] = _swap_halves(tensor) if rule.swapped else tensor
    return bfl


DIT = Checkpoint(
    what="FLUX.2 DiT",
    class_name="Flux2Transformer2DModel",
    folder="transformer",
    layouts=(
        Layout("bfl", marks=("double_blocks.", "single_blocks.", "img_in.", "final_layer.", "single_stream_modulation.lin."),
               to_ours=bfl_to_ours, from_ours=ours_to_bfl),
        Layout("diffusers", marks=("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "time_guidance_embed.")),
    ),
    resolve_config=resolve_config,
    param_shapes=param_shapes,
    build=Flux2DiT,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=(COMFY_PREFIX,),
)


def load_dit(source: Source, config: Mapping | Flux2Config | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(dit, params)`` from a FLUX.2 DiT checkpoint in the diffusers, BFL or ComfyUI layout.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a
    diffusers pipeline folder (its ``transformer/``). The config is: FLUX.2-dev defaults < the checkpoint's
    shapes < the ``config.json`` beside the weights < ``config`` (diffusers config keys, or a :class:`Flux2Config`).
    ``dtype=None`` keeps the file's dtypes (an fp8 file loads as fp8 storage).

    >>> import dsf
    >>> from dsf.models.flux2.model import init_dit
    >>> cfg = Flux2Config(num_heads=1, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=0,
    ...                   num_single_blocks=1, context_dim=8, guidance_embeds=False)
    >>> dit, params = load_dit(ours_to_bfl(init_dit(cfg, dsf.random.key(0))), {"axes_dims_rope": [4, 4, 4, 4]})
    >>> dit.config == cfg, len(params["single_transformer_blocks"])
    (True, 1)
    """
    return DIT.load(source, config, dtype=dtype, device=device)
