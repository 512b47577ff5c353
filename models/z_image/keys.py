"""Z-Image DiT checkpoint layouts: ours (= diffusers), and the Lumina2-style names of the original/ComfyUI files.

Our parameter tree mirrors diffusers' ``ZImageTransformer2DModel`` state dict. The original Z-Image
code and Comfy-Org's single files (``z_image_turbo_bf16.safetensors``, usually with ComfyUI's
``model.diffusion_model.`` prefix) use Lumina2's names: a fused ``attention.qkv`` (q, k, v stacked),
``attention.out``, ``attention.q_norm``/``k_norm``, and ``x_embedder.``/``final_layer.`` for
diffusers' ``all_x_embedder.2-1.``/``all_final_layer.2-1.``. Layouts are told apart by key
prefixes (``startswith``): a substring test on ``final_layer.`` would also match diffusers'
``all_final_layer.2-1.``. :data:`DIT` (the family contract's checkpoint record) and
:func:`load_dit` read any of them.

Example:
    >>> import dsf
    >>> from dsf.models.z_image.model import init_dit
    >>> from dsf.models.z_image.config import ZImageConfig
    >>> cfg = ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=8, axes_dims=(4, 6, 6))
    >>> lumina = ours_to_lumina2(init_dit(cfg, dsf.random.key(0)))
    >>> tuple(lumina["layers.0.attention.qkv.weight"].shape)
    (96, 32)
    >>> ours, layout = DIT.to_ours(lumina)
    >>> layout, sorted(ours) == sorted(dsf.tree.flatten_dict(init_dit(cfg, dsf.random.key(0))))
    ('lumina2', True)
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from dsf.files.io import Source
from dsf.model_parts.family import Checkpoint, Layout
from dsf.models.z_image.config import ZImageConfig, resolve_config
from dsf.models.z_image.model import PATCH_KEY, ZImageDiT, param_shapes
from dsf.tree import flatten_dict

COMFY_PREFIX = "model.diffusion_model."
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers (all_x_embedder.2-1.weight, layers.N.attention.to_q...), Lumina2-style original/ComfyUI "
    f"(x_embedder.weight, layers.N.attention.qkv...), either with ComfyUI's {COMFY_PREFIX!r} prefix. "
    "If the sizes differ, pass config= (diffusers config keys)."
)

# Lumina2 module -> ours, outside the blocks
_GLOBAL_MODULES = {
    "x_embedder": f"all_x_embedder.{PATCH_KEY}",
    "final_layer.linear": f"all_final_layer.{PATCH_KEY}.linear",
    "final_layer.adaLN_modulation.1": f"all_final_layer.{PATCH_KEY}.adaLN_modulation.1",
}
# Lumina2 module -> ours, inside a block (noise_refiner.N., context_refiner.N., layers.N.)
_BLOCK_MODULES = {"attention.out": "attention.to_out.0", "attention.q_norm": "attention.norm_q", "attention.k_norm": "attention.norm_k"}
_BLOCK_FUSED = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")}  # stacked on the output axis
_BLOCK = re.compile(r"((?:noise_refiner|context_refiner|layers)\.\d+\.)(.+)$")
_OURS_MODULES = {ours: lumina for lumina, ours in (_GLOBAL_MODULES | _BLOCK_MODULES).items()}
_OURS_FUSED = {part: (fused, parts) for fused, parts in _BLOCK_FUSED.items() for part in parts}
# the final LayerNorm has no affine weights; some converted files carry an unused scale anyway (diffusers drops it)
DROPPED_KEYS = re.compile(rf"(all_final_layer\.{PATCH_KEY}\.|final_layer\.)?norm_final\.weight")


def _split(key: str) -> tuple[str, str, str]:
    """(block prefix like ``"layers.3."`` or ``""``, module path within it, leaf name) of a key."""
    match = _BLOCK.match(key)
    block, local = (match.group(1), match.group(2)) if match else ("", key)
    module, _, leaf = local.rpartition(".")
    return block, module, leaf


def lumina2_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat Lumina2-style state dict in our (diffusers) key layout; a fused qkv becomes views of q, k and v.

    Keys it does not know are kept under their name, for the key check to report.

    >>> ours = lumina2_to_ours({"layers.0.attention.qkv.weight": torch.arange(6.0).reshape(6, 1), "x_embedder.bias": torch.zeros(2)})
    >>> sorted(ours), ours["layers.0.attention.to_k.weight"].flatten().tolist()
    (['all_x_embedder.2-1.bias', 'layers.0.attention.to_k.weight', 'layers.0.attention.to_q.weight', 'layers.0.attention.to_v.weight'], [2.0, 3.0])
    """
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in flat.items():
        block, module, leaf = _split(key)
        renames = _BLOCK_MODULES if block else _GLOBAL_MODULES
        if module in renames:
            ours[f"{block}{renames[module]}.{leaf}"] = tensor
        elif block and module in _BLOCK_FUSED:
            parts = _BLOCK_FUSED[module]
            if tensor.shape[0] % len(parts):
                raise ValueError(f"Lumina2 weight {key!r} has {tensor.shape[0]} rows, not q, k and v of equal size stacked")
            ours |= {f"{block}{part}.{leaf}": piece for part, piece in zip(parts, tensor.chunk(len(parts), dim=0))}
        else:
            ours[key] = tensor
    return ours


def ours_to_lumina2(params) -> dict[str, torch.Tensor]:
    """The flat Lumina2-style state dict of a parameter tree (or flat dict) in our layout, ready for ``save_file``.

    >>> w = {f"layers.0.attention.to_{n}.weight": torch.full((1, 1), float(i)) for i, n in enumerate("qkv")}
    >>> ours_to_lumina2(w)["layers.0.attention.qkv.weight"].flatten().tolist()
    [0.0, 1.0, 2.0]
    """
    lumina: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flatten_dict(params).items():
        block, module, leaf = _split(key)
        if module in _OURS_MODULES and (module.startswith("attention.") == bool(block)):
            lumina[f"{block}{_OURS_MODULES[module]}.{leaf}"] = tensor
        elif block and module in _OURS_FUSED:
            fused, _ = _OURS_FUSED[module]
            pieces.setdefault(f"{block}{fused}.{leaf}", {})[module] = tensor
        else:
            lumina[key] = tensor
    for fused_key, parts in pieces.items():
        _, module, _ = _split(fused_key)
        order = _BLOCK_FUSED[module]
        absent = [part for part in order if part not in parts]
        if absent:
            raise ValueError(f"cannot build Lumina2 {fused_key!r}: the parameters {absent} of its fused parts are missing")
        lumina[fused_key] = torch.cat([parts[part] for part in order], dim=0)
    return lumina


DIT = Checkpoint(
    what="Z-Image DiT",
    class_name="ZImageTransformer2DModel",
    folder="transformer",
    layouts=(
        Layout("lumina2", marks=("x_embedder.", "final_layer."), infixes=(".attention.qkv.",), to_ours=lumina2_to_ours,
               from_ours=ours_to_lumina2),
        Layout("diffusers", marks=("all_x_embedder.", "all_final_layer."), infixes=(".attention.to_q.",)),
    ),
    resolve_config=resolve_config,
    param_shapes=param_shapes,
    build=ZImageDiT,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=(COMFY_PREFIX,),
    dropped_keys=DROPPED_KEYS,
)


def load_dit(source: Source, config: Mapping | ZImageConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(dit, params)`` from a Z-Image DiT checkpoint in the diffusers or Lumina2-style layout, prefixed or not.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers
    pipeline folder (its ``transformer/``). The config is: Z-Image defaults < the checkpoint's shapes < the
    ``config.json`` beside the weights < ``config`` (diffusers config keys, or a :class:`ZImageConfig`).

    >>> import dsf
    >>> from dsf.models.z_image.model import init_dit
    >>> cfg = ZImageConfig(hidden_size=32, num_heads=2, num_layers=2, num_refiner_layers=1, cap_feat_dim=8, axes_dims=(4, 6, 6))
    >>> flat = {COMFY_PREFIX + k: v for k, v in ours_to_lumina2(init_dit(cfg, dsf.random.key(0))).items()}
    >>> dit, params = load_dit(flat, {"axes_dims": [4, 6, 6]})
    >>> dit.config == cfg, len(params["layers"])
    (True, 2)
    """
    return DIT.load(source, config, dtype=dtype, device=device)
