"""LoRA files in every common layout, read and written exactly.

In memory a LoRA is ``{weight path: Factors(down, up, scale)}``: ``down`` (rank, in), ``up``
(out, rank), and the change it makes to the weight at that "/"-joined tree path
(``transformer_blocks/0/attn/to_q/weight``) is ``scale · up @ down``. Files differ in key style,
in module names and in how they carry the scale:

- ``dsf``: ``<weight path>.lora_down`` / ``.lora_up`` / ``.lora_scale`` (float64), our names;
- ``diffusers`` (PEFT): ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``, our names,
  ``<module>.alpha`` keys only when some scale is not 1;
- ``kohya``: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, native names;
- ``comfyui``: ``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  native names;
- ``bfl``: ``<module>.lora_A.weight`` / ``.lora_B.weight`` (``.alpha`` as diffusers), native names.

Reading is lenient: any layout may use ``lora_A``/``lora_B`` (with or without PEFT's ``.default``)
or ``lora_down``/``lora_up``, and the ``transformer.`` prefix of diffusers files is optional. The
scale is ``alpha / rank`` where a ``.alpha`` key is present, else ``lora_alpha / rank`` from the
file's metadata (``lora_alpha``, ``network_alpha``, kohya's ``ss_network_alpha`` or diffusers'
``lora_adapter_metadata``), else 1 (the PEFT/diffusers convention ``W + B @ A``).

Native module names are those of the model family's native layout (its family record's
``native_layout``, :mod:`dsf.model_parts.family`; the family is found by the weight paths). For
FLUX.1 they are BFL's (``img_attn.qkv``, ``linear1``), whose fused weights hold several of ours as
row blocks; for a family without one, and a model of no registered family, they are ours. A fused
LoRA is exactly several LoRAs sharing ``down`` with ``up`` split into row blocks (and a LoRA on a
weight whose rows BFL orders otherwise, FLUX's final modulation, has its ``up`` rows permuted alike).
Writing fuses our LoRAs back: with one shared ``down`` and scale, ``up`` is concatenated; otherwise
the ranks are stacked (``down`` concatenated, ``up`` block-diagonal, each part's scale folded into
its ``up`` block when the scales differ), which is exact too, and the rank of each part is kept in
the file's metadata (``dsf_rank_split``) so that reading it back gives the parts unchanged.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> shapes = {"proj/weight": (3, 2)}
    >>> lora = {"proj/weight": Factors(torch.ones(1, 2), torch.ones(3, 1), 0.5)}
    >>> path = Path(tempfile.mkdtemp()) / "lora.safetensors"
    >>> write_lora(lora, path, "kohya", shapes)
    >>> back = read_lora(path, shapes)["proj/weight"]
    >>> back.scale, bool(torch.equal(back.up, lora["proj/weight"].up))
    (0.5, True)
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsf.files.io import Source, load_state_dict
from dsf.model_parts.family import Family, family_of, registered

LAYOUTS = ("dsf", "diffusers", "kohya", "comfyui", "bfl")
RANK_SPLIT_KEY = "dsf_rank_split"
EXAMPLES = 5  # keys shown in errors


class Factors(NamedTuple):
    """One LoRA on one weight: ``scale · up @ down`` with ``down`` (rank, in) and ``up`` (out, rank)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True)
class _KeyStyle:
    """How one layout spells a module's keys: ``prefix + name + suffix``."""

    prefix: str
    down: str
    up: str
    scale: str  # the key of the scale (dsf) or of alpha (the others)
    native_names: bool
    underscores: bool = False
    always_alpha: bool = False


_STYLES = {
    "dsf": _KeyStyle("", ".lora_down", ".lora_up", ".lora_scale", native_names=False),
    "diffusers": _KeyStyle("transformer.", ".lora_A.weight", ".lora_B.weight", ".alpha", native_names=False),
    "kohya": _KeyStyle("lora_unet_", ".lora_down.weight", ".lora_up.weight", ".alpha", True, True, True),
    "comfyui": _KeyStyle("diffusion_model.", ".lora_down.weight", ".lora_up.weight", ".alpha", True, always_alpha=True),
    "bfl": _KeyStyle("", ".lora_A.weight", ".lora_B.weight", ".alpha", native_names=True),
}

_ROLES = {  # key suffix -> role, longest first so ".lora_down.weight" wins over ".lora_down"
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down": "down",
    ".lora_up": "up",
    ".lora_scale": "scale",
    ".alpha": "alpha",
}

_METADATA_ALPHAS = ("lora_alpha", "network_alpha", "ss_network_alpha")


# ----------------------------------------------------------------------------- module names


@dataclass(frozen=True)
class Fusion:
    """A native module as rows of ours: ``parts`` in order, and for each native row its row in ``cat(parts)``."""

    parts: tuple[str, ...]
    rows: torch.Tensor


def _module(path: str) -> str:
    return path.removesuffix("/weight").replace("/", ".")


def _weight_path(module: str) -> str:
    return module.replace(".", "/") + "/weight"


def _native_family(shapes: Mapping[str, tuple]) -> Family | None:
    """The registered family of a model with weights of ``shapes`` if its LoRA files use native names, else None."""
    family = family_of(shapes)
    return family if family is not None and family.native_layout is not None else None


def native_modules(shapes: Mapping[str, tuple]) -> dict[str, Fusion] | None:
    """The native module names of a model by its 2-D weight shapes (``None``: the names are ours).

    The family's native conversion (``family.dit.from_ours(..., family.native_layout)``) runs on
    tensors that label each row with its (module, row), so every rename, fusion and half swap of the
    weight conversion is read off, never restated.

    >>> from dsf.models import flux
    >>> cfg = flux.FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                       num_single_blocks=0, context_dim=8, pooled_dim=8)
    >>> shapes = {k.replace(".", "/"): s for k, s in flux.param_shapes(cfg).items() if len(s) == 2}
    >>> native_modules(shapes)["double_blocks.0.img_attn.qkv"].parts
    ('transformer_blocks.0.attn.to_q', 'transformer_blocks.0.attn.to_k', 'transformer_blocks.0.attn.to_v')
    """
    family = _native_family(shapes)
    return None if family is None else _fusions(family, tuple(shapes.items()))


@functools.lru_cache(maxsize=4)
def _fusions(family: Family, shapes: tuple[tuple[str, tuple], ...]) -> dict[str, Fusion]:
    modules = [_module(path) for path, _ in shapes]
    outs = torch.tensor([shape[0] for _, shape in shapes])
    labels = {
        f"{module}.weight": torch.stack([torch.full((out,), i), torch.arange(out)], dim=1)  # (out, 2): module id, row
        for i, (module, out) in enumerate(zip(modules, outs.tolist()))
    }
    fusions = {}
    for key, label in family.dit.from_ours(labels, family.native_layout).items():
        ids = torch.tensor(list(dict.fromkeys(torch.unique_consecutive(label[:, 0]).tolist())))
        part_index = torch.empty(len(modules), dtype=torch.long)
        part_index[ids] = torch.arange(len(ids))
        starts = torch.cat([torch.zeros(1, dtype=torch.long), outs[ids].cumsum(0)[:-1]])
        rows = starts[part_index[label[:, 0]]] + label[:, 1]
        fusions[key.removesuffix(".weight")] = Fusion(tuple(modules[i] for i in ids.tolist()), rows)
    return fusions


def module_aliases(shapes: Mapping[str, tuple]) -> dict[str, str]:
    """``{weight path: its native module name}`` (its own module name where names are ours).

    >>> module_aliases({"blocks/0/q/weight": (4, 4)})
    {'blocks/0/q/weight': 'blocks.0.q'}
    """
    fusions = native_modules(shapes)
    if fusions is None:
        return {path: _module(path) for path in shapes}
    return {_weight_path(part): native for native, fusion in fusions.items() for part in fusion.parts}


def _shared_down(found: list[Factors]) -> bool:
    first = found[0]
    return all(f.scale == first.scale and f.down.shape == first.down.shape and torch.equal(f.down, first.down) for f in found)


def _fuse(fusion: Fusion, lora: Mapping[str, Factors], shapes) -> tuple[Factors, list[int] | None]:
    """One native module's LoRA from its parts' (and the rank of each part when stacked)."""
    found = [lora[part] for part in fusion.parts if part in lora]
    if len(found) == len(fusion.parts) and _shared_down(found):
        return Factors(found[0].down, torch.cat([f.up for f in found])[fusion.rows], found[0].scale), None
    scale = found[0].scale if all(f.scale == found[0].scale for f in found) else 1.0
    template = found[0].down
    downs, ups = [], []
    for part in fusion.parts:
        out_dim, in_dim = shapes[_weight_path(part)]
        factors = lora.get(part, Factors(template.new_zeros(0, in_dim), template.new_zeros(out_dim, 0), scale))
        downs.append(factors.down)
        ups.append(factors.up if factors.scale == scale else factors.up * (factors.scale / scale))
    up = torch.block_diag(*ups)[fusion.rows]  # (out, Σ rank)
    return Factors(torch.cat(downs), up, scale), [d.shape[0] for d in downs]


def _unfuse(fusion: Fusion, factors: Factors, split: list[int] | None, shapes) -> dict[str, Factors]:
    """Our parts' LoRAs from one native module's."""
    outs = [shapes[_weight_path(part)][0] for part in fusion.parts]
    up = factors.up.new_empty(sum(outs), factors.up.shape[1])
    up[fusion.rows] = factors.up
    if split is None:
        return {part: Factors(factors.down, part_up, factors.scale) for part, part_up in zip(fusion.parts, up.split(outs))}
    if sum(split) != factors.down.shape[0] or len(split) != len(fusion.parts):
        raise ValueError(
            f"metadata {RANK_SPLIT_KEY} gives ranks {split} for {fusion.parts}, but the LoRA has rank {factors.down.shape[0]}"
        )
    downs = factors.down.split(split)
    parts = {}
    for i, (part, part_up) in enumerate(zip(fusion.parts, up.split(outs))):
        if split[i]:
            parts[part] = Factors(downs[i], part_up.split(split, dim=1)[i], factors.scale)
    return parts


def _to_native(lora: Mapping[str, Factors], shapes) -> tuple[dict[str, Factors], dict[str, list[int]]]:
    fusions = native_modules(shapes)
    by_module = {_module(path): factors for path, factors in lora.items()}
    if fusions is None:
        return by_module, {}
    native, splits = {}, {}
    for name, fusion in fusions.items():
        if any(part in by_module for part in fusion.parts):
            native[name], split = _fuse(fusion, by_module, shapes)
            if split is not None:
                splits[name] = split
    return native, splits


def _from_native(native: Mapping[str, Factors], splits: Mapping[str, list[int]], shapes) -> dict[str, Factors]:
    fusions = native_modules(shapes)
    if fusions is None:
        return {_weight_path(name): factors for name, factors in native.items()}
    _check_known(native, fusions, "native (BFL) module")
    lora = {}
    for name, factors in native.items():
        lora |= _unfuse(fusions[name], factors, splits.get(name), shapes)
    return {_weight_path(part): factors for part, factors in lora.items()}


def _check_known(names, known, what: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"{len(unknown)} LoRA targets are not {what}s of this model, e.g. {unknown[:EXAMPLES]}; "
            f"its {what}s look like {list(known)[:EXAMPLES]}. Is the file for another model, or does it hold text-encoder keys?"
        )


# ----------------------------------------------------------------------------- keys


def detect_lora_layout(keys) -> str:
    """The layout of a LoRA file from its keys; an unknown layout is an error showing some keys.

    >>> detect_lora_layout(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    'kohya'
    >>> detect_lora_layout(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    'diffusers'
    """
    keys = list(keys)
    if any(k.endswith((".lora_down", ".lora_up", ".lora_scale")) for k in keys):
        return "dsf"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(re.search(r"\.lora_(A|B|down|up)\.", k) for k in keys):
        names = [k.removeprefix("transformer.") for k in keys]
        return "bfl" if any(_names_native(family, names) for family in registered()) else "diffusers"
    raise ValueError(
        f"unknown LoRA layout: keys like {keys[:EXAMPLES]}; known layouts: "
        "dsf (<weight path>.lora_down/.lora_up/.lora_scale), diffusers/PEFT ([transformer.]<module>.lora_A[.default].weight), "
        "kohya (lora_unet_<module>.lora_down.weight, .alpha), comfyui (diffusion_model.<module>.lora_down.weight), "
        "bfl (double_blocks.N.img_attn.qkv.lora_A.weight)"
    )


def _names_native(family: Family, names: list[str]) -> bool:
    return family.native_layout is not None and family.dit.detect_layout(names) == family.native_layout


def _split_role(key: str) -> tuple[str, str]:
    for suffix, role in _ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise ValueError(
        f"LoRA key {key!r} is neither a down/A, up/B, alpha nor scale tensor (DoRA and bias LoRAs are not supported)"
    )


def _file_names(tensors: Mapping[str, torch.Tensor], layout: str, shapes) -> dict[str, dict[str, torch.Tensor]]:
    """``{name in the file's naming: {role: tensor}}`` with the layout's prefix and spelling undone."""
    style = _STYLES[layout]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, role = _split_role(key.removeprefix(style.prefix))
        grouped.setdefault(name, {})[role] = tensor
    if not style.underscores:
        return grouped
    dotted = {name.replace(".", "_"): name for name in set(module_aliases(shapes).values())}
    _check_known(grouped, dotted, "kohya module name")
    return {dotted[name]: roles for name, roles in grouped.items()}


def _metadata_alpha(metadata: Mapping[str, str], module: str) -> float | None:
    """``lora_alpha`` for ``module`` from a file's metadata (PEFT's ``alpha_pattern`` included), if given."""
    for key in _METADATA_ALPHAS:
        if key in metadata:
            return float(metadata[key])
    if "lora_adapter_metadata" not in metadata:
        return None
    config = {k.removeprefix("transformer."): v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError("this LoRA file uses rsLoRA or DoRA (see its lora_adapter_metadata); only plain LoRA is supported")
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def _factors(name: str, roles: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Factors:
    if "down" not in roles or "up" not in roles:
        raise ValueError(f"LoRA module {name!r} has {sorted(roles)} but needs both a down/A and an up/B matrix")
    down, up = roles["down"], roles["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA module {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not (rank, in) and (out, rank)"
        )
    rank = down.shape[0]
    if "scale" in roles:
        scale = float(roles["scale"])
    elif "alpha" in roles:
        scale = float(roles["alpha"]) / rank
    else:
        alpha = _metadata_alpha(metadata, name)
        scale = 1.0 if alpha is None else alpha / rank
    return Factors(down, up, scale)


def _check_shapes(lora: Mapping[str, Factors], shapes) -> None:
    _check_known(lora, shapes, "2-D weight")
    wrong = [
        f"{path}: up {tuple(f.up.shape)} @ down {tuple(f.down.shape)} vs weight {tuple(shapes[path])}"
        for path, f in lora.items()
        if (f.up.shape[0], f.down.shape[1]) != tuple(shapes[path])
    ]
    if wrong:
        raise ValueError(
            f"{len(wrong)} LoRA shapes do not fit the weights, e.g. {wrong[:EXAMPLES]}: the file is for another model size"
        )


def parse_lora(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], metadata: Mapping[str, str] | None = None):
    """``{weight path: Factors}`` of a flat LoRA state dict in any layout, for weights of ``shapes``.

    >>> file = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    >>> parse_lora(file, {"q/weight": (3, 2)})["q/weight"].scale
    1.0
    """
    metadata = metadata or {}
    layout = detect_lora_layout(tensors)
    grouped = _file_names(tensors, layout, shapes)
    factors = {name: _factors(name, roles, metadata) for name, roles in grouped.items()}
    if layout == "dsf":
        lora = {name.replace(".", "/"): f for name, f in factors.items()}
    elif _STYLES[layout].native_names:
        if layout == "bfl" and _native_family(shapes) is None:
            raise ValueError("a LoRA with native (BFL) module names targets a family with a native layout, e.g. FLUX.1; "
                             "this model has none")
        lora = _from_native(factors, json.loads(metadata.get(RANK_SPLIT_KEY, "{}")), shapes)
    else:
        lora = {_weight_path(name): f for name, f in factors.items()}
    _check_shapes(lora, shapes)
    return lora


def lora_state_dict(lora: Mapping[str, Factors], layout: str, shapes: Mapping[str, tuple]):
    """``(tensors, metadata)`` of a LoRA in ``layout``, ready for ``save_file``.

    >>> lora = {"q/weight": Factors(torch.ones(1, 2), torch.ones(3, 1), 1.0)}
    >>> tensors, _ = lora_state_dict(lora, "diffusers", {"q/weight": (3, 2)})
    >>> sorted(tensors)
    ['transformer.q.lora_A.weight', 'transformer.q.lora_B.weight']
    """
    if layout not in _STYLES:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {LAYOUTS}")
    _check_shapes(lora, shapes)
    style = _STYLES[layout]
    splits: dict[str, list[int]] = {}
    if layout == "dsf":
        named = {path.replace("/", "."): f for path, f in lora.items()}
    elif style.native_names:
        if layout == "bfl" and _native_family(shapes) is None:
            raise ValueError("the BFL layout names a family's native modules (FLUX.1's); this model has none: "
                             "use layout='dsf' or 'diffusers'")
        named, splits = _to_native(lora, shapes)
    else:
        named = {_module(path): f for path, f in lora.items()}
    with_scale = layout == "dsf" or style.always_alpha or any(f.scale != 1.0 for f in named.values())
    tensors = {}
    for name, f in named.items():
        key = style.prefix + (name.replace(".", "_") if style.underscores else name)
        tensors[key + style.down], tensors[key + style.up] = f.down, f.up
        if layout == "dsf":
            tensors[key + style.scale] = torch.tensor(f.scale, dtype=torch.float64)
        elif with_scale:
            tensors[key + style.scale] = torch.tensor(f.scale * f.down.shape[0], dtype=torch.float32)
    metadata = {"format": "pt"} | ({RANK_SPLIT_KEY: json.dumps(splits)} if splits else {})
    return tensors, metadata


# ----------------------------------------------------------------------------- files


def read_lora(source: Source, shapes: Mapping[str, tuple]) -> dict[str, Factors]:
    """``{weight path: Factors}`` of a LoRA file (or flat dict) in any layout, for weights of ``shapes``.

    >>> read_lora({"q.lora_down.weight": torch.ones(1, 2), "q.lora_up.weight": torch.ones(3, 1), "q.alpha": torch.tensor(2.0)},
    ...           {"q/weight": (3, 2)})["q/weight"].scale
    2.0
    """
    metadata = {}
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        with safe_open(str(source), framework="pt") as file:
            metadata = file.metadata() or {}
    return parse_lora(load_state_dict(source), shapes, metadata)


def write_lora(lora: Mapping[str, Factors], path: str | os.PathLike, layout: str, shapes: Mapping[str, tuple]) -> None:
    """Write a LoRA as a safetensors file in ``layout``, atomically (a temporary name, then a rename).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "lora.safetensors"
    >>> write_lora({"q/weight": Factors(torch.ones(1, 2), torch.ones(3, 1), 1.0)}, path, "dsf", {"q/weight": (3, 2)})
    >>> path.is_file()
    True
    """
    tensors, metadata = lora_state_dict(lora, layout, shapes)
    owned = {key: tensor.detach().clone(memory_format=torch.contiguous_format) for key, tensor in tensors.items()}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(owned, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
