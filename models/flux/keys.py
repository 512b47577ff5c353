"""FLUX.1 DiT checkpoint layouts: ours (= diffusers), BFL's original, and ComfyUI's prefixed BFL.

Our parameter tree mirrors diffusers' ``FluxTransformer2DModel`` state dict. The BFL layout
(``flux1-dev.safetensors``) differs by names, by fused projections (``img_attn.qkv`` = q, k, v;
single-block ``linear1`` = q, k, v, MLP-in) and by the final modulation, whose two halves are
(shift, scale) in BFL and (scale, shift) in diffusers. ComfyUI files put ``model.diffusion_model.``
before BFL keys. :data:`DIT` (the family contract's checkpoint record) and :func:`load_dit` read any of
them, detected from the keys.

Example:
    >>> import dsf
    >>> from dsf.models.flux.model import init_dit
    >>> from dsf.models.flux.config import FluxConfig
    >>> cfg = FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                  num_single_blocks=1, context_dim=8, pooled_dim=8)
    >>> bfl = ours_to_bfl(init_dit(cfg, dsf.random.key(0)))
    >>> tuple(bfl["single_blocks.0.linear1.weight"].shape)
    (112, 16)
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
from dsf.models.flux.config import FluxConfig, resolve_config
from dsf.model_parts.family import Checkpoint, Layout
from dsf.models.flux.model import FluxDiT, param_shapes
from dsf.tree import flatten_dict

COMFY_PREFIX = "model.diffusion_model."
SHIFT_SCALE_SWAPPED = "final_layer.adaLN_modulation.1"  # BFL (shift, scale) halves = diffusers norm_out (scale, shift)
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers (x_embedder.weight, transformer_blocks.N...), BFL (img_in.weight, double_blocks.N...), "
    f"BFL with ComfyUI's {COMFY_PREFIX!r} prefix. If the sizes differ, pass config= (diffusers config keys)."
)


def _module_renames(modules: Mapping[str, str]) -> dict[str, str]:
    return {f"{bfl}.{leaf}": f"{ours}.{leaf}" for bfl, ours in modules.items() for leaf in ("weight", "bias")}


@dataclass(frozen=True)
class _Scope:
    """One group of keys: BFL prefix, our prefix, one-to-one renames and fused BFL modules (with their parts)."""

    bfl: str
    ours: str
    renames: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]]


_GLOBAL = _Scope(
    bfl="",
    ours="",
    renames=_module_renames(
        {
            "img_in": "x_embedder",
            "txt_in": "context_embedder",
            "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
            "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
            "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
            SHIFT_SCALE_SWAPPED: "norm_out.linear",
            "final_layer.linear": "proj_out",
        }
    ),
    fused={},
)

_DOUBLE = _Scope(
    bfl="double_blocks.",
    ours="transformer_blocks.",
    renames={
        **_module_renames(
            {
                "img_mod.lin": "norm1.linear",
                "txt_mod.lin": "norm1_context.linear",
                "img_attn.proj": "attn.to_out.0",
                "txt_attn.proj": "attn.to_add_out",
                "img_mlp.0": "ff.net.0.proj",
                "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj",
                "txt_mlp.2": "ff_context.net.2",
            }
        ),
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    },
    fused={
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    },
)

_SINGLE = _Scope(
    bfl="single_blocks.",
    ours="single_transformer_blocks.",
    renames={
        **_module_renames({"modulation.lin": "norm.linear", "linear2": "proj_out"}),
        "norm.query_norm.scale": "attn.norm_q.weight",
        "norm.key_norm.scale": "attn.norm_k.weight",
    },
    fused={"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
)

_BLOCK_SCOPES = (_DOUBLE, _SINGLE)
_BFL_NAMES = {scope.ours: {ours: bfl for bfl, ours in scope.renames.items()} for scope in (_GLOBAL, *_BLOCK_SCOPES)}


def _split_key(key: str, side: str) -> tuple[_Scope, str, str]:
    """(scope, block index prefix like ``"3."`` or ``""``, key within the scope) of a BFL or our key."""
    for scope in _BLOCK_SCOPES:
        match = re.match(rf"{re.escape(getattr(scope, side))}(\d+\.)(.+)$", key)
        if match:
            return scope, match.group(1), match.group(2)
    return _GLOBAL, "", key


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fused_sizes(fused_weight: torch.Tensor, parts: int, key: str) -> list[int]:
    """Row sizes of a fused (q, k, v[, mlp]) weight: q, k and v are as wide as the input, the MLP takes the rest."""
    hidden = fused_weight.shape[1]
    rows_fit = fused_weight.shape[0] > 3 * hidden if parts > 3 else fused_weight.shape[0] == 3 * hidden
    if fused_weight.ndim != 2 or not rows_fit:
        raise ValueError(f"BFL weight {key!r} has shape {tuple(fused_weight.shape)}, but a fused weight of {parts} parts "
                         f"has {'more than' if parts > 3 else 'exactly'} 3 × its {hidden} columns as rows; is it transposed?")
    return [hidden] * 3 + [fused_weight.shape[0] - 3 * hidden] * (parts - 3)


def bfl_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat BFL state dict in our (diffusers) key layout; fused weights become views of their parts.

    Keys it does not know are kept under their name, for the key check to report.

    >>> w = torch.arange(6.0).reshape(6, 1)
    >>> sorted(bfl_to_ours({"final_layer.adaLN_modulation.1.weight": w, "foo": w}))
    ['foo', 'norm_out.linear.weight']
    >>> bfl_to_ours({"final_layer.adaLN_modulation.1.weight": w})["norm_out.linear.weight"].flatten().tolist()
    [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    """
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in flat.items():
        scope, index, local = _split_key(key, "bfl")
        module, _, leaf = local.rpartition(".")
        fused_weight = flat.get(f"{scope.bfl}{index}{module}.weight")
        if local in scope.renames:
            ours[scope.ours + index + scope.renames[local]] = _swap_halves(tensor) if module == SHIFT_SCALE_SWAPPED else tensor
        elif module in scope.fused and leaf in ("weight", "bias") and fused_weight is not None:
            parts = scope.fused[module]
            for part, piece in zip(parts, tensor.split(_fused_sizes(fused_weight, len(parts), f"{scope.bfl}{index}{module}.weight"))):
                ours[f"{scope.ours}{index}{part}.{leaf}"] = piece
        else:
            ours[key] = tensor
    return ours


def ours_to_bfl(params) -> dict[str, torch.Tensor]:
    """The flat BFL state dict of a parameter tree (or flat dict) in our layout, ready for ``save_file``.

    >>> w = torch.arange(4.0).reshape(4, 1)
    >>> ours_to_bfl({"norm_out": {"linear": {"weight": w}}})["final_layer.adaLN_modulation.1.weight"].flatten().tolist()
    [2.0, 3.0, 0.0, 1.0]
    """
    bfl: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flatten_dict(params).items():
        scope, index, local = _split_key(key, "ours")
        part, _, leaf = local.rpartition(".")
        fused_module = next((module for module, parts in scope.fused.items() if part in parts), None)
        if local in _BFL_NAMES[scope.ours]:
            name = _BFL_NAMES[scope.ours][local]
            bfl[scope.bfl + index + name] = _swap_halves(tensor) if name.rpartition(".")[0] == SHIFT_SCALE_SWAPPED else tensor
        elif fused_module is not None:
            pieces.setdefault(f"{scope.bfl}{index}{fused_module}.{leaf}", {})[part] = tensor
        else:
            raise ValueError(f"parameter {key!r} has no name in the BFL FLUX.1 layout")
    for fused_key, parts in pieces.items():
        scope, _, local = _split_key(fused_key, "bfl")
        order = scope.fused[local.rpartition(".")[0]]
        absent = [p for p in order if p not in parts]
        if absent:
            raise ValueError(f"cannot build BFL {fused_key!r}: the parameters {absent} of its fused parts are missing")
        bfl[fused_key] = torch.cat([parts[p] for p in order], dim=0)
    return bfl


# DiffSynth-Studio's FluxDiT module names (the names its own LoRA files use): BFL's modules renamed, same tensors
# (diffsynth/utils/state_dict_converters/flux_dit.py, FluxDiTStateDictConverter). {BFL scope: (its scope, {module: its})}
_DIFFSYNTH_MODULES = {
    "": ("", {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_embedder.timestep_embedder.0", "time_in.out_layer": "time_embedder.timestep_embedder.2",
        "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
        "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2",
        "vector_in.in_layer": "pooled_text_embedder.0", "vector_in.out_layer": "pooled_text_embedder.2",
        SHIFT_SCALE_SWAPPED: "final_norm_out.linear", "final_layer.linear": "final_proj_out",
    }),
    "double_blocks.": ("blocks.", {
        "img_mod.lin": "norm1_a.linear", "txt_mod.lin": "norm1_b.linear",
        "img_attn.qkv": "attn.a_to_qkv", "txt_attn.qkv": "attn.b_to_qkv",
        "img_attn.proj": "attn.a_to_out", "txt_attn.proj": "attn.b_to_out",
        "img_mlp.0": "ff_a.0", "img_mlp.2": "ff_a.2", "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2",
    }),
    "single_blocks.": ("single_blocks.", {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}),
}

# Text-encoder keys of FLUX.1 LoRA files -> the pipeline's component: kohya sd-scripts writes lora_te1_ (CLIP-L) and
# lora_te3_ (T5), OneTrainer lora_te1_ and lora_te2_ (T5), diffusers text_encoder.; ComfyUI reads all of them
# (comfy/lora.py, model_lora_keys_clip). The names after the prefix are transformers' module names.
LORA_TEXT_ENCODERS = {"lora_te1_": "clip", "lora_te3_": "t5", "lora_te2_": "t5", "lora_te_": "clip", "text_encoder.": "clip"}


def diffsynth_module(bfl_module: str) -> str | None:
    """DiffSynth-Studio's FluxDiT name of a BFL module (``None`` if it has no LoRA-able one).

    >>> diffsynth_module("double_blocks.3.img_attn.qkv"), diffsynth_module("linear1"), diffsynth_module("img_in")
    ('blocks.3.attn.a_to_qkv', None, 'x_embedder')
    """
    scope, index, local = _split_key(bfl_module, "bfl")
    prefix, modules = _DIFFSYNTH_MODULES[scope.bfl]
    return None if local not in modules else prefix + index + modules[local]


DIT = Checkpoint(
    what="FLUX.1 DiT",
    class_name="FluxTransformer2DModel",
    folder="transformer",
    layouts=(
        Layout("bfl", marks=("double_blocks.", "single_blocks.", "img_in.", "final_layer."), to_ours=bfl_to_ours,
               from_ours=ours_to_bfl),
        Layout("diffusers", marks=("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "time_text_embed.")),
    ),
    resolve_config=resolve_config,
    param_shapes=param_shapes,
    build=FluxDiT,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=(COMFY_PREFIX,),
)


def load_dit(source: Source, config: Mapping | FluxConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(dit, params)`` from a FLUX.1 DiT checkpoint in the diffusers, BFL or ComfyUI layout.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers pipeline folder (its
    ``transformer/``). The config is: FLUX.1-dev defaults < the checkpoint's shapes < the
    ``config.json`` beside the weights < ``config`` (diffusers config keys, or a :class:`FluxConfig`).

    >>> import dsf
    >>> from dsf.models.flux.model import init_dit
    >>> cfg = FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=0,
    ...                  num_single_blocks=1, context_dim=8, pooled_dim=8, guidance_embeds=False)
    >>> dit, params = load_dit(ours_to_bfl(init_dit(cfg, dsf.random.key(0))), {"axes_dims_rope": [4, 6, 6]})
    >>> dit.config.guidance_embeds, len(params["single_transformer_blocks"])
    (False, 1)
    """
    return DIT.load(source, config, dtype=dtype, device=device)
