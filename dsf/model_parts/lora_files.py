"""LoRA files in the forms people share them: read from every common form, written in the forms tools read.

In memory a LoRA file is ``{parameter path: change}``, the paths "/"-joined in the parameter tree it is
read for (``transformer_blocks/0/attn/to_q/weight``; with a whole pipeline's params ``dit/...``, and the
text encoders' ``clip/...``, ``t5/...``). A change is :class:`Factors` ``(down, up, scale)`` on a 2-D
weight, adding ``scale · up @ down`` (``down`` (rank, in), ``up`` (out, rank)), or a :class:`Difference`,
a dense addition to any parameter (ComfyUI's ``.diff`` of a weight, ``.diff_b`` of a bias).

A file key is ``<prefix><module name><suffix>``. The suffix gives the role: ``.lora_down.weight`` or
``.lora_A[.default].weight`` (down), ``.lora_up.weight`` or ``.lora_B[.default].weight`` (up),
``.alpha``, ``.diff``, ``.diff_b``, and ours, ``.lora_down`` / ``.lora_up`` / ``.lora_scale``. The
prefix gives the module names that follow (:data:`DIT_PREFIXES`): ``lora_unet_`` (kohya) and
``diffusion_model.`` (ComfyUI) the family's native names, ``transformer.`` (diffusers), ``lora_transformer_``
(OneTrainer) and ``lycoris_`` (SimpleTuner's LyCORIS) ours; ``_``-joined after a prefix ending in ``_``.
Without a prefix the names are ours (PEFT), the native ones (BFL) or DiffSynth-Studio's, whichever
names every module of the file. Text-encoder keys (``lora_te1_...``) go to the pipeline component the
family's ``lora_text_encoders`` names, when the tree holds it; otherwise they are skipped with one warning.
The step files that :func:`dsf.training.train.train` writes are read too: their keys are the trained
leaves' "."-joined tree paths, ``<weight path>.adapt.adapters.<adapter name>.down`` / ``.up``
(:data:`STEP_FILE_KEY`), matched against the tree's own paths (a file written for a whole pipeline's
params reads into its DiT's, and the other way round). A step file holds no scale: its adapter reads
with scale 1, the scale of ``lora(rank, alpha)`` with ``alpha`` equal to ``rank`` (its default).

The scale is ``alpha / rank`` where a ``.alpha`` key is present (ComfyUI's rule, rank = rows of down),
else ``lora_alpha / rank`` from the file's metadata (``lora_alpha``, ``network_alpha``, kohya's
``ss_network_alpha`` or diffusers' ``lora_adapter_metadata``), else 1 (PEFT's ``W + B @ A``).

Native module names are those of the family's native layout (``Family.native_layout``: BFL's for
FLUX.1, the original ones for Wan), DiffSynth-Studio's come from ``Family.diffsynth_module``; the family
is found by the weight paths (:func:`dsf.model_parts.family.family_of`). A native tensor may hold
several of ours as row blocks (FLUX.1's ``img_attn.qkv``, ``linear1``) or in another row order (its final
modulation): the row map is read off the family's own weight conversion (:func:`native_modules`). A
fused LoRA is exactly several LoRAs sharing ``down`` with ``up`` split into row blocks. Writing fuses
ours back: with one shared ``down`` and scale, ``up`` is concatenated; otherwise the ranks are stacked
(``down`` concatenated, ``up`` block-diagonal, each part's scale folded into its ``up`` block when the
scales differ), exact too, with the rank of each part in the file's metadata (``dsf_rank_split``) so
that reading it back gives the parts unchanged.

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsf.files.io import Source, load_state_dict
from dsf.model_parts.family import Family, family_of

LAYOUTS = ("dsf", "diffusers", "kohya", "comfyui", "diffsynth")  # the forms written
RANK_SPLIT_KEY = "dsf_rank_split"
EXAMPLES = 5  # keys shown in errors
DIT_PREFIXES = {  # key prefix -> (the naming of the module names after it, "." written as "_"), who writes it
    "lora_unet_": ("native", True),  # kohya sd-scripts, musubi-tuner, DiffSynth-Studio --align_to_opensource_format
    "diffusion_model.": ("native", False),  # ComfyUI (its loader and its training node)
    "transformer.": ("ours", False),  # diffusers, PEFT, ai-toolkit, SimpleTuner
    "lora_transformer_": ("ours", True),  # OneTrainer
    "lycoris_": ("ours", True),  # SimpleTuner's LyCORIS
}
_LAYOUT_OF_PREFIX = {"lora_unet_": "kohya", "diffusion_model.": "comfyui", "transformer.": "diffusers",
                     "lora_transformer_": "onetrainer", "lycoris_": "lycoris"}
_LAYOUT_OF_BARE_NAMING = {"ours": "diffusers", "native": "native", "diffsynth": "diffsynth"}
_TEXT_ENCODER_PREFIX = re.compile(r"lora_te\d*_|text_encoders?(_\d+)?\.")
_ROLES = {  # key suffix -> role; no suffix is the end of another
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
    ".diff": "diff",
    ".diff_b": "diff_b",
}
_FACTOR_ROLES = {"down", "up", "scale", "alpha"}
STEP_FILE_KEY = re.compile(r"(?P<weight>.+)\.adapt\.adapters\.(?P<name>[^./]+)\.(?P<role>down|up)")
_METADATA_ALPHAS = ("lora_alpha", "network_alpha", "ss_network_alpha")


class Factors(NamedTuple):
    """One LoRA on one weight: ``scale · up @ down`` with ``down`` (rank, in) and ``up`` (out, rank)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


class Difference(NamedTuple):
    """A dense addition to one parameter (ComfyUI's ``.diff`` of a weight, ``.diff_b`` of a bias)."""

    delta: torch.Tensor


Change = Union[Factors, Difference]


# ----------------------------------------------------------------------------- namings


@dataclass(frozen=True)
class Fusion:
    """A tensor of a naming as rows of our parameters: ``parts`` in order, and for each of its rows the row in
    ``cat(parts)`` (``rows`` ``None``: the same rows)."""

    parts: tuple[str, ...]
    rows: torch.Tensor | None = None


def _dotted(path: str) -> str:
    return path.replace("/", ".")


def _under(shapes: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    return {path[len(prefix):]: shape for path, shape in shapes.items() if path.startswith(prefix)}


def _dit_root(shapes: Mapping[str, tuple]) -> tuple[str, Family | None]:
    """``(path prefix of the DiT in the tree, its family)``: the tree itself, or a top-level part (``"dit/"``) of it."""
    family = family_of(shapes)
    if family is not None:
        return "", family
    for top in dict.fromkeys(path.partition("/")[0] for path in shapes):
        family = family_of(_under(shapes, top + "/"))
        if family is not None:
            return top + "/", family
    return "", None


@functools.lru_cache(maxsize=8)
def _fusions(family: Family, shapes: tuple[tuple[str, tuple], ...]) -> dict[str, Fusion]:
    """``{native key: Fusion}`` of a DiT, read off the family's conversion run on row labels (module id, row)."""
    entries = [(path, shape[0]) for path, shape in shapes if len(shape) >= 1]
    paths = [path for path, _ in entries]
    outs = torch.tensor([out for _, out in entries])
    labels = {
        _dotted(path): torch.stack([torch.full((out,), i), torch.arange(out)], dim=1)
        for i, (path, out) in enumerate(entries)
    }
    fusions = {}
    for key, label in family.dit.from_ours(labels, family.native_layout).items():
        ids = torch.tensor(list(dict.fromkeys(torch.unique_consecutive(label[:, 0]).tolist())))
        part_index = torch.empty(len(paths), dtype=torch.long)
        part_index[ids] = torch.arange(len(ids))
        starts = torch.cat([torch.zeros(1, dtype=torch.long), outs[ids].cumsum(0)[:-1]])
        rows = starts[part_index[label[:, 0]]] + label[:, 1]
        same = len(ids) == 1 and torch.equal(rows, torch.arange(len(rows)))
        fusions[key] = Fusion(tuple(paths[i] for i in ids.tolist()), None if same else rows)
    return fusions


@functools.lru_cache(maxsize=8)
def _namings(family: Family | None, shapes: tuple[tuple[str, tuple], ...]) -> dict[str, dict[str, Fusion]]:
    """``{"ours" | "native" | "diffsynth": {parameter key in that naming: Fusion}}`` of a DiT."""
    ours = {_dotted(path): Fusion((path,)) for path, _ in shapes}
    if family is None or family.native_layout is None:
        return {"ours": ours, "native": ours, "diffsynth": ours}
    native = _fusions(family, shapes)
    if family.diffsynth_uses_ours:
        return {"ours": ours, "native": native, "diffsynth": ours}
    rename = family.diffsynth_module
    if rename is None:
        return {"ours": ours, "native": native, "diffsynth": native}
    diffsynth = {}
    for key, fusion in native.items():
        module, _, leaf = key.rpartition(".")
        renamed = rename(module) if module else None
        if renamed is not None:
            diffsynth[f"{renamed}.{leaf}"] = fusion
    return {"ours": ours, "native": native, "diffsynth": diffsynth}


@dataclass(frozen=True)
class _Model:
    """A parameter tree as LoRA files see it: its shapes, where its DiT is, and the DiT's family."""

    shapes: Mapping[str, tuple]
    root: str
    family: Family | None

    @classmethod
    def of(cls, shapes: Mapping[str, tuple]) -> "_Model":
        root, family = _dit_root(shapes)
        return cls(shapes, root, family)

    def naming(self, kind: str) -> dict[str, Fusion]:
        return _namings(self.family, tuple(_under(self.shapes, self.root).items()))[kind]

    def text_encoder(self, prefix: str) -> str | None:
        """The tree's path prefix of the text encoder that keys with ``prefix`` name, if the tree holds it."""
        component = None if self.family is None or not self.root else self.family.lora_text_encoders.get(prefix)
        held = component is not None and any(path.startswith(component + "/") for path in self.shapes)
        return component + "/" if held else None


def native_modules(shapes: Mapping[str, tuple]) -> dict[str, Fusion] | None:
    """``{native parameter key: Fusion}`` of a DiT with parameters of ``shapes`` (``None``: the names are ours).

    The family's native conversion (``family.dit.from_ours(..., family.native_layout)``) runs on tensors
    that label each row with its (parameter, row), so every rename, fusion and half swap of the weight
    conversion is read off, never restated.

    >>> from dsf.models import flux
    >>> cfg = flux.FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                       num_single_blocks=0, context_dim=8, pooled_dim=8)
    >>> shapes = {k.replace(".", "/"): s for k, s in flux.param_shapes(cfg).items()}
    >>> native_modules(shapes)["double_blocks.0.img_attn.qkv.weight"].parts
    ('transformer_blocks/0/attn/to_q/weight', 'transformer_blocks/0/attn/to_k/weight', 'transformer_blocks/0/attn/to_v/weight')
    """
    model = _Model.of(shapes)
    if model.family is None or model.family.native_layout is None:
        return None
    return model.naming("native")


def module_aliases(shapes: Mapping[str, tuple]) -> dict[str, str]:
    """``{weight path: its native module name}`` of a tree's weights (their own module name where names are ours).

    >>> module_aliases({"blocks/0/q/weight": (4, 4)})
    {'blocks/0/q/weight': 'blocks.0.q'}
    """
    model = _Model.of(shapes)
    return {
        model.root + part: key.removesuffix(".weight")
        for key, fusion in model.naming("native").items()
        if key.endswith(".weight")
        for part in fusion.parts
        if part.endswith("/weight")
    }


# ----------------------------------------------------------------------------- fusing and splitting


def _shared_down(found: list[Factors]) -> bool:
    first = found[0]
    return all(f.scale == first.scale and f.down.shape == first.down.shape and torch.equal(f.down, first.down) for f in found)


def _in_order(fusion: Fusion, stacked: torch.Tensor) -> torch.Tensor:
    return stacked if fusion.rows is None else stacked[fusion.rows]


def _fuse_factors(fusion: Fusion, changes: Mapping[str, Change], shapes) -> tuple[Factors, list[int] | None]:
    """One fused tensor's LoRA from its parts' (and the rank of each part when stacked)."""
    found = [changes[part] for part in fusion.parts if part in changes]
    if len(found) == len(fusion.parts) and _shared_down(found):
        return Factors(found[0].down, _in_order(fusion, torch.cat([f.up for f in found])), found[0].scale), None
    scale = found[0].scale if all(f.scale == found[0].scale for f in found) else 1.0
    template = found[0].down
    downs, ups = [], []
    for part in fusion.parts:
        out_dim, in_dim = shapes[part]
        factors = changes.get(part, Factors(template.new_zeros(0, in_dim), template.new_zeros(out_dim, 0), scale))
        downs.append(factors.down)
        ups.append(factors.up if factors.scale == scale else factors.up * (factors.scale / scale))
    return Factors(torch.cat(downs), _in_order(fusion, torch.block_diag(*ups)), scale), [d.shape[0] for d in downs]


def _fuse_differences(fusion: Fusion, changes: Mapping[str, Change], shapes) -> Difference:
    template = next(changes[part].delta for part in fusion.parts if part in changes)
    deltas = [changes[part].delta if part in changes else template.new_zeros(shapes[part]) for part in fusion.parts]
    return Difference(_in_order(fusion, torch.cat(deltas)))


def _all_rows(fusion: Fusion, tensor: torch.Tensor, outs: list[int]) -> list[torch.Tensor]:
    """The row blocks of ``tensor`` (a fused tensor's rows, or an ``up``'s) that belong to each part."""
    if fusion.rows is None:
        return list(tensor.split(outs))
    stacked = tensor.new_empty(sum(outs), *tensor.shape[1:])
    stacked[fusion.rows] = tensor
    return list(stacked.split(outs))


def _split(fusion: Fusion, change: Change, rank_split: list[int] | None, shapes) -> dict[str, Change]:
    """Our parts' changes from one fused tensor's."""
    if len(fusion.parts) == 1 and fusion.rows is None:
        return {fusion.parts[0]: change}
    outs = [shapes[part][0] for part in fusion.parts]
    rows = change.delta.shape[0] if isinstance(change, Difference) else change.up.shape[0]
    if rows != sum(outs):
        raise ValueError(f"a LoRA change of {rows} rows does not fit {fusion.parts} ({sum(outs)} rows): "
                         "the file is for another model size")
    if isinstance(change, Difference):
        return {part: Difference(delta) for part, delta in zip(fusion.parts, _all_rows(fusion, change.delta, outs))}
    ups = _all_rows(fusion, change.up, outs)
    if rank_split is None:
        return {part: Factors(change.down, up, change.scale) for part, up in zip(fusion.parts, ups)}
    if sum(rank_split) != change.down.shape[0] or len(rank_split) != len(fusion.parts):
        raise ValueError(
            f"metadata {RANK_SPLIT_KEY} gives ranks {rank_split} for {fusion.parts}, but the LoRA has rank {change.down.shape[0]}"
        )
    downs = change.down.split(rank_split)
    return {
        part: Factors(downs[i], up.split(rank_split, dim=1)[i], change.scale)
        for i, (part, up) in enumerate(zip(fusion.parts, ups))
        if rank_split[i]
    }


# ----------------------------------------------------------------------------- reading keys


def _split_role(key: str) -> tuple[str, str]:
    for suffix, role in _ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise ValueError(
        f"LoRA key {key!r} is neither a down/A, up/B, alpha, scale, .diff nor .diff_b tensor "
        "(DoRA, LoHa and LoKr files are not supported)"
    )


def _prefix(stem: str) -> str:
    """The prefix of a key stem: a text-encoder one, one of :data:`DIT_PREFIXES`, or ``""``."""
    text_encoder = _TEXT_ENCODER_PREFIX.match(stem)
    if text_encoder:
        return text_encoder.group(0)
    return next((prefix for prefix in DIT_PREFIXES if stem.startswith(prefix)), "")


def _group(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """``{(prefix, module name): {role: tensor}}`` of a flat LoRA state dict."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, role = _split_role(key)
        prefix = _prefix(stem)
        grouped.setdefault((prefix, stem[len(prefix):]), {})[role] = tensor
    return grouped


def _target(naming: Mapping[str, Fusion], name: str, role: str) -> str | None:
    """The key of ``naming`` that a module name's ``role`` changes: its bias, its weight, or the name itself."""
    candidates = (name + ".bias",) if role == "diff_b" else (name + ".weight", name)
    return next((key for key in candidates if key in naming), None)


def _roles_of(roles: Mapping[str, torch.Tensor]) -> list[str]:
    """The changes a group of keys makes: ``"factors"``, ``"diff"``, ``"diff_b"``."""
    kinds = (["factors"] if roles.keys() & _FACTOR_ROLES else []) + [r for r in ("diff", "diff_b") if r in roles]
    if "factors" in kinds and "diff" in kinds:
        raise ValueError(f"a LoRA module has both factors and a .diff of its weight ({sorted(roles)}): only one can apply")
    return kinds


def _underscored(naming: Mapping[str, Fusion]) -> dict[str, str]:
    """``{module or parameter name with "." written "_": the name}`` of a naming."""
    names = {key.removesuffix(".weight").removesuffix(".bias") for key in naming} | set(naming)
    return {name.replace(".", "_"): name for name in names}


def _names_resolve(naming: Mapping[str, Fusion], groups) -> bool:
    return all(_target(naming, name, kind) for name, roles in groups for kind in _roles_of(roles))


def _bare_naming(model: _Model, groups) -> str:
    """The naming (ours, native, DiffSynth's) in which every unprefixed module name of a file is a module."""
    found = next((kind for kind in ("ours", "diffsynth", "native") if _names_resolve(model.naming(kind), groups)), None)
    if found is None:
        _read_group(model.naming("ours"), groups, False, {}, "module")  # raises, naming the unknown modules
    return found


def _check_known(unknown: list[str], naming: Mapping[str, Fusion], what: str) -> None:
    if unknown:
        examples = sorted({key.removesuffix(".weight") for key in naming if not key.endswith(".bias")})
        raise ValueError(
            f"{len(unknown)} LoRA targets are not {what}s of this model, e.g. {unknown[:EXAMPLES]}; "
            f"its {what}s look like {examples[:EXAMPLES]}. Is the file for another model?"
        )


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


def _changes(name: str, roles, naming, metadata) -> dict[str, Change]:
    """``{key of naming: change}`` that one module's keys make."""
    found = {}
    for kind in _roles_of(roles):
        key = _target(naming, name, kind)
        found[key] = _factors(name, roles, metadata) if kind == "factors" else Difference(roles[kind])
    return found


def _read_group(naming, groups, underscores: bool, metadata, what: str) -> dict[str, Change]:
    """``{key of naming: change}`` of the groups ``[(module name, roles)]`` written in one naming."""
    spelled = _underscored(naming) if underscores else None
    names = [spelled.get(name) if spelled else name for name, _ in groups]
    bad = [name for (name, roles), dotted in zip(groups, names)
           if dotted is None or not all(_target(naming, dotted, kind) for kind in _roles_of(roles))]
    _check_known(bad, naming, what)
    changes = {}
    for dotted, (_, roles) in zip(names, groups):
        changes |= _changes(dotted, roles, naming, metadata)
    return changes


def _to_ours(changes: Mapping[str, Change], naming, shapes, splits: Mapping[str, list[int]]) -> dict[str, Change]:
    ours = {}
    for key, change in changes.items():
        ours |= _split(naming[key], change, splits.get(key.removesuffix(".weight")), shapes)
    return ours


def _text_encoder_changes(model: _Model, by_prefix, metadata) -> dict[str, Change]:
    """The changes of text-encoder keys to the tree's text encoders; keys for none of them skipped with one warning."""
    changes, skipped = {}, []
    for prefix, groups in by_prefix.items():
        component = model.text_encoder(prefix)
        if component is None:
            skipped += [prefix + name for name, _ in groups]
            continue
        shapes = _under(model.shapes, component)
        naming = {_dotted(path): Fusion((path,)) for path in shapes}
        for key, change in _read_group(naming, groups, prefix.endswith("_"), metadata, f"{component[:-1]} module").items():
            changes[component + naming[key].parts[0]] = change
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} text-encoder LoRA modules (e.g. {skipped[:3]}): the parameters given hold no text "
            "encoder for them; pass a whole pipeline's params (with its text encoders) to apply them",
            stacklevel=5,  # the caller of load_lora
        )
    return changes


def _step_file_path(stem: str, dotted_paths: Mapping[str, str], root: str) -> str | None:
    """The tree path a step file's dotted weight path names: itself, or across a pipeline's DiT root (``dit.``)."""
    dotted_root = _dotted(root)
    candidates = (stem, dotted_root + stem, stem.partition(".")[2])
    return next((dotted_paths[c] for c in candidates if c in dotted_paths), None)


def _step_file_changes(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple]) -> dict[str, Change]:
    """``{parameter path: Factors(down, up, 1.0)}`` of a training step file's LoRA leaves (one adapter)."""
    matches = {key: STEP_FILE_KEY.fullmatch(key) for key in tensors}
    others = [key for key, match in matches.items() if match is None]
    names = sorted({match["name"] for match in matches.values() if match is not None})
    if others or len(names) != 1:
        raise ValueError(
            f"this step file holds {f'the adapters {names}' if len(names) != 1 else 'trained leaves'}"
            f"{f' and other leaves, e.g. {others[:EXAMPLES]}' if others else ''}: load_lora reads one adapter's factors; "
            "read every trained leaf into the trained tree with dsf.training.step_files.load_trainable(params, file)"
        )
    model = _Model.of(shapes)
    dotted_paths = {_dotted(path): path for path in shapes}
    roles: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, match in matches.items():
        path = _step_file_path(match["weight"], dotted_paths, model.root)
        if path is None:
            unknown.append(match["weight"])
        else:
            roles.setdefault(path, {})[match["role"]] = tensors[key]
    _check_known(unknown, {_dotted(path): None for path in shapes}, "weight path")
    incomplete = sorted(path for path, found in roles.items() if len(found) != 2)
    if incomplete:
        raise ValueError(f"the step file has a down or an up factor alone for {incomplete[:EXAMPLES]}: it is damaged")
    return {path: Factors(found["down"], found["up"], 1.0) for path, found in roles.items()}


def detect_lora_layout(keys, shapes: Mapping[str, tuple] | None = None) -> str:
    """The form of a LoRA file from its keys: ``step file`` (a training step file's LoRA leaves), ``dsf``, ``kohya``, ``comfyui``, ``diffusers``, ``onetrainer``,
    ``lycoris``, or, for unprefixed module names, ``diffusers`` (ours), ``native`` or ``diffsynth`` as
    ``shapes`` (the model's) tell (``unprefixed`` without them); an unknown form is an error showing some keys.

    >>> detect_lora_layout(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    'kohya'
    >>> detect_lora_layout(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    'diffusers'
    >>> detect_lora_layout(["dit.blocks.0.qkv.weight.adapt.adapters.lora.down"])
    'step file'
    """
    keys = list(keys)
    if keys and any(STEP_FILE_KEY.fullmatch(key) for key in keys):
        return "step file"
    stems = [stem for stem, role in (_role_or_none(key) for key in keys) if role in ("down", "up", "diff", "diff_b", "scale")]
    if not stems:
        raise ValueError(
            f"unknown LoRA layout: keys like {keys[:EXAMPLES]}; known forms: "
            "a training step file (<weight path>.adapt.adapters.<name>.down/.up), dsf (<weight path>.lora_down/.lora_up/.lora_scale), diffusers/PEFT ([transformer.]<module>.lora_A[.default].weight), "
            "kohya (lora_unet_<module>.lora_down.weight, .alpha), comfyui (diffusion_model.<module>.lora_down.weight, "
            ".diff, .diff_b), OneTrainer (lora_transformer_<module>), LyCORIS (lycoris_<module>), "
            "BFL or DiffSynth-Studio (<module>.lora_A.weight)"
        )
    if any(key.endswith((".lora_down", ".lora_up", ".lora_scale")) for key in keys):
        return "dsf"
    prefixes = [_prefix(stem) for stem in stems]
    found = next((prefix for prefix in prefixes if prefix in DIT_PREFIXES), None)
    if found is not None:
        return _LAYOUT_OF_PREFIX[found]
    if any(_TEXT_ENCODER_PREFIX.fullmatch(prefix) and prefix.startswith("lora_te") for prefix in prefixes):
        return "kohya"
    if shapes is None:
        return "unprefixed"
    model = _Model.of(shapes)
    groups = list(_group({key: torch.empty(0) for key in keys if not _TEXT_ENCODER_PREFIX.match(key)}).items())
    return _LAYOUT_OF_BARE_NAMING[_bare_naming(model, [(name, roles) for (_, name), roles in groups])]


def _role_or_none(key: str) -> tuple[str, str | None]:
    return next(((key[: -len(suffix)], role) for suffix, role in _ROLES.items() if key.endswith(suffix)), (key, None))


def _check_shapes(changes: Mapping[str, Change], shapes) -> None:
    wrong = []
    for path, change in changes.items():
        shape = (change.up.shape[0], change.down.shape[1]) if isinstance(change, Factors) else tuple(change.delta.shape)
        if shape != tuple(shapes[path]):
            parts = (f"up {tuple(change.up.shape)} @ down {tuple(change.down.shape)}" if isinstance(change, Factors)
                     else f"difference {tuple(change.delta.shape)}")
            wrong.append(f"{path}: {parts} vs weight {tuple(shapes[path])}")
    if wrong:
        raise ValueError(
            f"{len(wrong)} LoRA shapes do not fit the weights, e.g. {wrong[:EXAMPLES]}: the file is for another model size"
        )


def parse_lora(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], metadata: Mapping[str, str] | None = None):
    """``{parameter path: change}`` of a flat LoRA state dict in any form, for a tree with parameters of ``shapes``.

    >>> file = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1), "q.diff_b": torch.ones(3)}
    >>> changes = parse_lora(file, {"q/weight": (3, 2), "q/bias": (3,)})
    >>> changes["q/weight"].scale, changes["q/bias"].delta.tolist()
    (1.0, [1.0, 1.0, 1.0])
    """
    metadata = metadata or {}
    if detect_lora_layout(tensors) == "step file":
        changes = _step_file_changes(tensors, shapes)
        _check_shapes(changes, shapes)
        return changes
    model = _Model.of(shapes)
    dit_shapes = _under(shapes, model.root)
    splits = json.loads(metadata.get(RANK_SPLIT_KEY, "{}"))
    by_prefix: dict[str, list] = {}
    for (prefix, name), roles in _group(tensors).items():
        by_prefix.setdefault(prefix, []).append((name, roles))
    text_encoders = {p: groups for p, groups in by_prefix.items() if _TEXT_ENCODER_PREFIX.fullmatch(p)}
    changes = _text_encoder_changes(model, text_encoders, metadata)
    for prefix, groups in by_prefix.items():
        if prefix in text_encoders:
            continue
        kind, underscores = DIT_PREFIXES.get(prefix) or (_bare_naming(model, groups), False)
        naming = model.naming(kind)
        found = _read_group(naming, groups, underscores, metadata, "kohya module name" if underscores else "module")
        changes |= {model.root + path: change for path, change in _to_ours(found, naming, dit_shapes, splits).items()}
    _check_shapes(changes, shapes)
    return changes


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _WriteStyle:
    """How one written form spells a module's keys: ``prefix + name + suffix``, and how it carries the scale."""

    prefix: str
    naming: str
    down: str
    up: str
    scale: str  # "dsf": .lora_scale; "always" / "if_needed": .alpha; "folded": into down
    underscores: bool = False
    differences: bool = False  # whether the form carries .diff / .diff_b


_WRITE = {
    "dsf": _WriteStyle("", "ours", ".lora_down", ".lora_up", "dsf", differences=True),
    "diffusers": _WriteStyle("transformer.", "ours", ".lora_A.weight", ".lora_B.weight", "if_needed"),
    "kohya": _WriteStyle("lora_unet_", "native", ".lora_down.weight", ".lora_up.weight", "always", underscores=True),
    "comfyui": _WriteStyle("diffusion_model.", "native", ".lora_down.weight", ".lora_up.weight", "always", differences=True),
    "diffsynth": _WriteStyle("", "diffsynth", ".lora_A.weight", ".lora_B.weight", "folded"),
}


def _to_naming(changes: Mapping[str, Change], naming: Mapping[str, Fusion], shapes, layout: str):
    """``({key of naming: change}, {module: rank split})`` of our changes; a change the naming cannot hold is an error."""
    named, splits, covered = {}, {}, set()
    for key, fusion in naming.items():
        if not any(part in changes for part in fusion.parts):
            continue
        covered.update(fusion.parts)
        if isinstance(changes[next(part for part in fusion.parts if part in changes)], Difference):
            named[key] = _fuse_differences(fusion, changes, shapes)
        else:
            named[key], split = _fuse_factors(fusion, changes, shapes)
            if split is not None:
                splits[key.removesuffix(".weight")] = split
    missing = [path for path in changes if path not in covered]
    if missing:
        raise ValueError(f"the {layout} form has no name for {missing[:EXAMPLES]}: write them as dsf or diffusers")
    return named, splits


def _file_keys(key: str, change: Change, style: _WriteStyle, with_alpha: bool) -> dict[str, torch.Tensor]:
    if isinstance(change, Difference):
        if style.scale == "dsf":
            return {f"{key}.diff": change.delta}
        module, _, leaf = key.rpartition(".")  # ComfyUI: <module>.diff for its weight, .diff_b for its bias, <key>.diff
        name = {"weight": f"{module}.diff", "bias": f"{module}.diff_b"}.get(leaf, f"{key}.diff")
        return {style.prefix + name: change.delta}
    name = key if style.scale == "dsf" else key.removesuffix(".weight")
    name = style.prefix + (name.replace(".", "_") if style.underscores else name)
    down = change.down * change.scale if style.scale == "folded" and change.scale != 1.0 else change.down
    tensors = {name + style.down: down, name + style.up: change.up}
    if style.scale == "dsf":
        tensors[name + ".lora_scale"] = torch.tensor(change.scale, dtype=torch.float64)
    elif with_alpha:
        tensors[name + ".alpha"] = torch.tensor(change.scale * change.down.shape[0], dtype=torch.float32)
    return tensors


def lora_state_dict(changes: Mapping[str, Change], layout: str, shapes: Mapping[str, tuple]):
    """``(tensors, metadata)`` of a LoRA in ``layout`` (one of :data:`LAYOUTS`), ready for ``save_file``.

    >>> lora = {"q/weight": Factors(torch.ones(1, 2), torch.ones(3, 1), 1.0)}
    >>> tensors, _ = lora_state_dict(lora, "diffusers", {"q/weight": (3, 2)})
    >>> sorted(tensors)
    ['transformer.q.lora_A.weight', 'transformer.q.lora_B.weight']
    """
    if layout not in _WRITE:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {LAYOUTS}")
    _check_shapes(changes, shapes)
    style = _WRITE[layout]
    model = _Model.of(shapes)
    outside = [path for path in changes if not path.startswith(model.root)]
    if outside:
        raise ValueError(f"LoRA files are written for the DiT ({model.root or 'the tree'}); these changes are not on it: "
                         f"{outside[:EXAMPLES]}")
    if not style.differences and any(isinstance(change, Difference) for change in changes.values()):
        raise ValueError(f"the {layout} form carries no dense differences (.diff, .diff_b): write comfyui or dsf")
    ours = {path[len(model.root):]: change for path, change in changes.items()}
    named, splits = _to_naming(ours, model.naming(style.naming), _under(shapes, model.root), layout)
    factors = [change for change in named.values() if isinstance(change, Factors)]
    with_alpha = style.scale == "always" or (style.scale == "if_needed" and any(f.scale != 1.0 for f in factors))
    tensors = {}
    for key, change in named.items():
        tensors |= _file_keys(key, change, style, with_alpha)
    metadata = {"format": "pt"} | ({RANK_SPLIT_KEY: json.dumps(splits)} if splits else {})
    return tensors, metadata


# ----------------------------------------------------------------------------- files


def read_lora(source: Source, shapes: Mapping[str, tuple]) -> dict[str, Change]:
    """``{parameter path: change}`` of a LoRA file (or flat dict) in any form, for a tree with parameters of ``shapes``.

    >>> read_lora({"q.lora_down.weight": torch.ones(1, 2), "q.lora_up.weight": torch.ones(3, 1), "q.alpha": torch.tensor(2.0)},
    ...           {"q/weight": (3, 2)})["q/weight"].scale
    2.0
    """
    metadata = {}
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        with safe_open(str(source), framework="pt") as file:
            metadata = file.metadata() or {}
    return parse_lora(load_state_dict(source), shapes, metadata)


def write_lora(changes: Mapping[str, Change], path: str | os.PathLike, layout: str, shapes: Mapping[str, tuple]) -> None:
    """Write a LoRA as a safetensors file in ``layout``, atomically (a temporary name, then a rename).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "lora.safetensors"
    >>> write_lora({"q/weight": Factors(torch.ones(1, 2), torch.ones(3, 1), 1.0)}, path, "dsf", {"q/weight": (3, 2)})
    >>> path.is_file()
    True
    """
    tensors, metadata = lora_state_dict(changes, layout, shapes)
    owned = {key: tensor.detach().clone(memory_format=torch.contiguous_format) for key, tensor in tensors.items()}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(owned, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
