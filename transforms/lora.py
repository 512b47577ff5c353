"""LoRA: low-rank adapters on linear weights, trained factored, attached from files, merged on demand.

The :func:`lora` transform's ``init`` gives each selected 2-D weight an adapt stage holding new
factors: ``down`` (rank, in) drawn from the init key like PEFT's default (uniform in ±1/√in),
``up`` (out, rank) zeros, scale ``alpha / rank``. At use the stage turns the decoded weight W into a
:class:`FactoredLinear`, whose ``linear(x, bias)`` computes ``x Wᵀ + Σ s·(x Aᵀ) Bᵀ``: no full ΔW is
built, so backward builds no full dW either. Ops that need the matrix (conv, norms, a
``functional_call`` through :func:`dsf.model_parts.modules.pure_module`) get ``merge()``, the dense
``W + Σ s·B A``, through :func:`dsf.weight.dense`.

Several adapters share a weight's one adapt slot, by name: the trained one and files attached with
:func:`load_lora`, each with its own scale. The factors are ordinary leaves of the parameter tree at
``<weight path>/adapt/adapters/<name>/down`` and ``.../up``; :data:`lora_trainable` (or
:func:`lora_leaves`) selects them for :func:`dsf.value_and_grad` and the optimizers.

Data functions (verbs, not transforms): :func:`load_lora` attaches a file unfused (hot),
:func:`clear_lora` detaches attached files exactly, :func:`merge_lora` folds adapters into the
stored weights (cold), :func:`save_lora` writes one adapter in any layout of
:mod:`dsf.model_parts.lora_files`.

Example:
    >>> import torch, dsf
    >>> from dsf import ops
    >>> params = {"proj": {"weight": torch.randn(3, 4)}}
    >>> t = lora(rank=2, alpha=4)
    >>> adapted = t.init(params, dsf.random.key(0))
    >>> loss = lambda p, x: ops.linear(x, p["proj"]["weight"]).square().sum()
    >>> value, grads = dsf.value_and_grad(t(loss), where=lora_trainable)(adapted, torch.ones(1, 4))
    >>> bool(value == loss(params, torch.ones(1, 4))), sorted(dsf.tree.select(grads, None))
    (True, ['proj/weight/adapt/adapters/lora/down', 'proj/weight/adapt/adapters/lora/up'])
"""

from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import optree
import torch
import torch.nn.functional as F

from dsf.files.io import Source, safetensors_files
from dsf.model_parts.input_checks import check_finite
from dsf.random import Key, fold_in, uniform
from dsf.transform import Transform
from dsf.tree import NAMESPACE, Where, as_predicate, leaves_with_paths
from dsf.weight import Cast, Stage, Weight, as_weight, compute_device, map_weights, stage
from dsf.model_parts.lora_files import Difference, Factors, LAYOUTS, module_aliases, read_lora, write_lora

TRAINED = "lora"  # the adapter name that `lora` gives by default
DENOISER = "dit"  # a pipeline tree's denoiser: what `lora` adapts there unless `where=` says otherwise


@optree.dataclasses.dataclass(frozen=True, namespace=NAMESPACE)
class Adapter:
    """One low-rank adapter: ``scale · up @ down``, ``down`` (rank, in), ``up`` (out, rank).

    ``hot`` marks an adapter attached from a file by :func:`load_lora` (what :func:`clear_lora` removes).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = optree.dataclasses.field(pytree_node=False)
    hot: bool = optree.dataclasses.field(pytree_node=False, default=False)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense change ``scale · up @ down`` (out, in) in ``dtype``."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


@optree.dataclasses.dataclass(frozen=True, namespace=NAMESPACE)
class DenseAdapter:
    """A dense change of a parameter of any shape, ``scale · difference`` (a file's ``.diff`` / ``.diff_b``).

    >>> DenseAdapter(torch.ones(2), 0.5).delta(torch.float32).tolist()
    [0.5, 0.5]
    """

    difference: torch.Tensor
    scale: float = optree.dataclasses.field(pytree_node=False)
    hot: bool = optree.dataclasses.field(pytree_node=False, default=False)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        return self.scale * self.difference.to(dtype)


def _plus_dense(value: torch.Tensor, dense: list[DenseAdapter]) -> torch.Tensor:
    """``value`` plus dense changes, added in float32 (at least) and stored back in its dtype."""
    compute = torch.promote_types(value.dtype, torch.float32)
    return (value.to(compute) + sum(adapter.delta(compute) for adapter in dense)).to(value.dtype)


@dataclass(frozen=True)
class FactoredLinear:
    """A decoded base weight (out, in) with its adapters, kept factored for ``ops.linear``.

    >>> w = FactoredLinear(torch.eye(2), (Adapter(torch.ones(1, 2), torch.ones(2, 1), 0.5),))
    >>> w.linear(torch.ones(1, 2)).tolist(), w.merge().tolist()
    ([[2.0, 2.0]], [[1.5, 0.5], [0.5, 1.5]])
    """

    base: torch.Tensor
    adapters: tuple[Adapter, ...]

    def linear(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        out = F.linear(x, self.base, bias)
        for adapter in self.adapters:
            hidden = F.linear(x.to(adapter.down.dtype), adapter.down) * adapter.scale  # (..., rank)
            out = out + F.linear(hidden, adapter.up).to(out.dtype)
        return out

    def merge(self) -> torch.Tensor:
        compute = torch.promote_types(self.base.dtype, torch.float32)
        merged = self.base.to(compute)
        for adapter in self.adapters:
            merged = merged + adapter.delta(compute)
        return merged.to(self.base.dtype)


@stage("adapt")
class LoraStage(Stage):
    """Adapt stage: named adapters on one parameter; merged at use when sampling if asked.

    Dense adapters are added to the value first; factored ones keep a 2-D weight factored. A second LoRA
    stage on the same parameter joins this one (distinct names); any other adapt stage is an error.
    """

    adapters: dict[str, Adapter | DenseAdapter]
    merge_when_sampling: bool = optree.dataclasses.field(pytree_node=False, default=False)

    def apply(self, value):
        dense = [adapter for adapter in self.adapters.values() if isinstance(adapter, DenseAdapter)]
        factored = tuple(adapter for adapter in self.adapters.values() if isinstance(adapter, Adapter))
        value = _plus_dense(value, dense) if dense else value
        if not factored:
            return value
        form = FactoredLinear(value, factored)
        return form.merge() if self.merge_when_sampling and not torch.is_grad_enabled() else form

    def combine(self, other: Stage) -> Stage:
        if not isinstance(other, LoraStage):
            return super().combine(other)
        clash = sorted(self.adapters.keys() & other.adapters.keys())
        if clash:
            raise ValueError(
                f"a LoRA named {clash} is already on this weight: give the new one another name= (or clear it first)"
            )
        return LoraStage({**self.adapters, **other.adapters}, self.merge_when_sampling or other.merge_when_sampling)


def lora_leaves(name: str | None = None) -> str:
    """A ``where`` regex selecting the factors of the adapter ``name`` (of every adapter when ``None``).

    >>> bool(re.search(lora_leaves("style"), "blocks/0/q/weight/adapt/adapters/style/up"))
    True
    """
    adapter = "[^/]+" if name is None else re.escape(name)
    return rf"(^|/)adapt/adapters/{adapter}/(down|up)$"


lora_trainable = lora_leaves(TRAINED)


# ----------------------------------------------------------------------------- selecting weights


def _has_lora(param) -> bool:
    return isinstance(param, Weight) and isinstance(param.stages.get("adapt"), LoraStage)


def _weights(params) -> list[tuple[str, object]]:
    """``(path, param)`` of every parameter named ``weight`` (a tensor or a record)."""
    return [
        (path, param)
        for path, param in leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight))
        if path.rpartition("/")[2] == "weight" and isinstance(param, (torch.Tensor, Weight))
    ]


def param_shapes(params) -> dict[str, tuple]:
    """``{path: shape}`` of every parameter of a tree (tensors and weight records).

    >>> param_shapes({"q": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}})
    {'q/bias': (3,), 'q/weight': (3, 2)}
    """
    return {
        path: tuple(param.shape)
        for path, param in leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight))
        if isinstance(param, (torch.Tensor, Weight))
    }


def linear_weight_shapes(params) -> dict[str, tuple]:
    """``{path: shape}`` of the 2-D weights of a tree, the weights a LoRA can adapt.

    >>> linear_weight_shapes({"q": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, "norm": {"weight": torch.ones(2)}})
    {'q/weight': (3, 2)}
    """
    return {path: tuple(param.shape) for path, param in _weights(params) if len(param.shape) == 2}


def _ends_with(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name)


def _target_names(targets: str | Iterable[str]) -> list[str]:
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    return [name.strip() for name in names if name.strip()]


def denoiser_only(params, where: Where) -> Where:
    """``where``, or in a whole pipeline's tree (one with a ``"dit"`` part) when ``where`` is ``None``, its denoiser.

    >>> denoiser_only({"dit": {}, "vae": {}}, None), denoiser_only({"blocks": []}, None), denoiser_only({"dit": {}}, "^vae/")
    ('^dit/', None, '^vae/')
    """
    return rf"^{DENOISER}/" if where is None and isinstance(params, dict) and DENOISER in params else where


def _selected_paths(params, where: Where, targets) -> list[str]:
    """The weight paths a ``lora(where=, targets=)`` adapts; explicit choices of non-2-D weights are errors."""
    explicit = where is not None or targets is not None
    where = denoiser_only(params, where)
    keep = as_predicate(where)
    weights = _weights(params)
    names = None if targets is None else _target_names(targets)
    aliases = module_aliases(param_shapes(params)) if names else {}

    def named(path: str) -> bool:
        modules = (path.removesuffix("/weight").replace("/", "."), aliases.get(path, ""))
        return names is None or any(_ends_with(module, name) for module in modules if module for name in names)

    chosen = [(path, param) for path, param in weights if keep(path, param) and named(path)]
    not_linear = [f"{path} {tuple(param.shape)}" for path, param in chosen if len(param.shape) != 2]
    if explicit and not_linear:
        raise ValueError(
            f"lora adapts linear (2-D) weights, but where={where!r}, targets={targets!r} select {not_linear[:5]}: "
            "narrow the selection to linear layers"
        )
    paths = [path for path, param in chosen if len(param.shape) == 2]
    if not paths:
        examples = [path for path, param in weights if len(param.shape) == 2][:5]
        raise ValueError(f"where={where!r}, targets={targets!r} select no linear weight; linear weights look like {examples}")
    return paths


# ----------------------------------------------------------------------------- the transform


def _new_adapter(key: Key, path: str, shape: tuple, rank: int, scale: float, dtype, device) -> Adapter:
    out_dim, in_dim = shape
    bound = 1 / math.sqrt(in_dim)
    down = uniform(fold_in(key, zlib.crc32(path.encode())), (rank, in_dim), -bound, bound, device=device, dtype=dtype)
    return Adapter(down, torch.zeros(out_dim, rank, dtype=dtype, device=device), scale)


def lora(
    rank: int,
    alpha: float | None = None,
    where: Where = None,
    targets: str | Iterable[str] | None = None,
    key: Key | None = None,
    *,
    name: str = TRAINED,
    merge_when_sampling: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Transform:
    """Add a trainable LoRA of ``rank`` (scale ``alpha / rank``; ``alpha`` defaults to ``rank``).

    Adapts the 2-D ``weight`` leaves selected by ``where`` (a dsf filter: regex, list, callable) and
    ``targets`` (module names, a comma-separated string or a list, matching the path segments before
    ``/weight``: ``"to_q,to_k,to_v,to_out.0"``; for FLUX.1 BFL names work too and cover their parts:
    ``"img_attn.qkv"`` is to_q, to_k and to_v of the double blocks, ``"linear1"`` is q, k, v and
    proj_mlp of the single blocks). With neither, every 2-D weight is adapted. In a whole pipeline's tree
    (``{"dit": ..., "vae": ..., "clip": ...}``) ``where=None`` means the denoiser only (``"^dit/"``): the
    VAE's and the text encoders' attention are adapted only when ``where`` names them. ``key`` is used when
    ``init`` gets none. Factors are stored in ``dtype`` on the device the weight computes on (an
    offloaded weight's target, so they and their gradients never travel). With
    ``merge_when_sampling`` a weight is merged at use while gradients are off (fast sampling).

    >>> import torch, dsf
    >>> params = {"attn": {"to_q": {"weight": torch.ones(4, 4)}, "norm": {"weight": torch.ones(4)}}}
    >>> adapted = lora(rank=2, targets="to_q").init(params, dsf.random.key(0))
    >>> adapted["attn"]["to_q"]["weight"]
    Weight((4, 4) torch.float32 cpu, slots=['adapt'])
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    if "/" in name:
        raise ValueError(f"an adapter name is a path segment and cannot hold '/': got {name!r}")
    if alpha is not None:
        check_finite(alpha=alpha)
    scale = (rank if alpha is None else alpha) / rank

    def init(params, init_key: Key | None = None):
        draw = init_key if init_key is not None else key
        if draw is None:
            raise ValueError("lora draws its down factors from a key: call init(params, key) or pass lora(..., key=)")
        paths = set(_selected_paths(params, where, targets))

        def adapt(path: str, param):
            adapter = _new_adapter(draw, path, tuple(param.shape), rank, scale, dtype, compute_device(param))
            return as_weight(param).with_stage(LoraStage({name: adapter}, merge_when_sampling))

        return map_weights(adapt, params, where=lambda path, _: path in paths)

    return Transform(name=f"lora(rank={rank}, alpha={alpha}, name={name!r})", init_fn=init)


# ----------------------------------------------------------------------------- data functions


def _adapters(params) -> dict[str, dict[str, Adapter | DenseAdapter]]:
    """``{adapter name: {weight path: adapter}}`` over a tree."""
    found: dict[str, dict[str, Adapter | DenseAdapter]] = {}
    for path, param in leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight)):
        if _has_lora(param):
            for name, adapter in param.stages["adapt"].adapters.items():
                found.setdefault(name, {})[path] = adapter
    return found


def _with_adapters(param: Weight, data, adapters: dict[str, Adapter | DenseAdapter]):
    """``param`` with new data and adapt stage; a record left with no stage is its plain data."""
    stages = {phase: s for phase, s in param.stages.items() if phase != "adapt"}
    if adapters:
        stages["adapt"] = LoraStage(adapters, param.stages["adapt"].merge_when_sampling)
    return Weight(data, stages) if stages else data


def _free_name(params, source: Source, name: str | None) -> str:
    taken = _adapters(params)
    if name is not None:
        if name in taken or "/" in name:
            raise ValueError(f"cannot name the LoRA {name!r}: names in use are {sorted(taken)} and a name holds no '/'")
        return name
    stem = Path(source).stem if isinstance(source, (str, os.PathLike)) else "loaded"
    candidates = [stem] + [f"{stem}_{i}" for i in range(2, len(taken) + 3)]
    return next(candidate for candidate in candidates if candidate not in taken)


def load_lora(params, source: Source, scale: float = 1.0, name: str | None = None):
    """``params`` with the LoRA file ``source`` (any form of :mod:`dsf.model_parts.lora_files`) attached unfused,
    times ``scale``.

    The adapter is named ``name`` (default: the file's stem). Attach several at once, each with its
    own scale; :func:`clear_lora` removes them exactly. ``params`` is a DiT's tree, or a whole pipeline's
    (``{"dit": ..., "clip": ..., "t5": ...}``): then a file's text-encoder keys apply to its text encoders,
    else they are skipped with a warning. A file's dense differences (``.diff``, ``.diff_b``) attach like
    factors, and merge and clear alike. A training step file (``step-N.safetensors`` of a LoRA run) attaches
    its trained adapter with scale ``scale`` (the file holds no ``alpha / rank``: pass it when ``alpha`` was
    not ``rank``); :func:`dsf.training.step_files.load_trainable` reads it into the trained tree instead.

    >>> import torch
    >>> params = {"q": {"weight": torch.zeros(3, 2)}}
    >>> f = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    >>> from dsf.weight import dense
    >>> dense(load_lora(params, f, scale=0.5)["q"]["weight"]).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    check_finite(scale=scale)
    if isinstance(source, (str, os.PathLike)):
        safetensors_files(source)  # a pickle or a missing file is refused with its name before anything is read
    found = read_lora(source, param_shapes(params))
    name = _free_name(params, source, name)

    def attach(path: str, param):
        device = compute_device(param)
        change = found[path]
        if isinstance(change, Difference):
            adapter = DenseAdapter(change.delta.to(device), scale, hot=True)
        else:
            adapter = Adapter(change.down.to(device), change.up.to(device), change.scale * scale, hot=True)
        return as_weight(param).with_stage(LoraStage({name: adapter}))

    return map_weights(attach, params, where=lambda path, _: path in found)


def _name_set(names: str | Iterable[str] | None) -> set[str] | None:
    return None if names is None else ({names} if isinstance(names, str) else set(names))


def clear_lora(params, names: str | Iterable[str] | None = None):
    """``params`` without the adapters ``names`` (default: every one attached by :func:`load_lora`).

    >>> import torch
    >>> params = {"q": {"weight": torch.zeros(3, 2)}}
    >>> f = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    >>> clear_lora(load_lora(params, f))["q"]["weight"] is params["q"]["weight"]
    True
    """
    chosen = _name_set(names)

    def strip(path: str, param: Weight):
        adapters = param.stages["adapt"].adapters
        kept = {n: a for n, a in adapters.items() if not (a.hot if chosen is None else n in chosen)}
        return _with_adapters(param, param.data, kept)

    return map_weights(strip, params, where=lambda _, param: _has_lora(param))


def _check_mergeable(path: str, param: Weight) -> None:
    data, others = param.data, {p: s for p, s in param.stages.items() if p != "adapt"}
    blocking = {p: s for p, s in others.items() if p == "gather" or (p == "decode" and not isinstance(s, Cast))}
    stored_low = isinstance(data, torch.Tensor) and data.is_floating_point() and data.element_size() == 1
    if blocking or not isinstance(data, torch.Tensor) or stored_low:
        stages = ", ".join(f"{p}: {type(s).__name__}" for p, s in others.items()) or "none"
        raise ValueError(
            f"merge_lora cannot fold a LoRA into {path!r}: its data is stored as "
            f"{getattr(data, 'dtype', type(data).__name__)} (stages {stages}); folding needs a plain float tensor, and "
            "requantizing fp8 storage would lose most of the LoRA's change. Merge before quantizing, sharding or "
            "offloading to disk (merge_lora, then that transform's init), or keep the LoRA hot (load_lora)."
        )


def merge_lora(params, names: str | Iterable[str] | None = None):
    """``params`` with the adapters ``names`` (default: all) folded into the stored weights (cold).

    Weights stored in another dtype than they are used in (a :class:`dsf.weight.Cast` stage) are
    merged in float32 and stored back in their dtype; fp8-stored or sharded weights are refused.

    >>> import torch
    >>> params = {"q": {"weight": torch.zeros(3, 2)}}
    >>> f = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    >>> merge_lora(load_lora(params, f))["q"]["weight"].tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    chosen = _name_set(names)

    def fold(path: str, param: Weight):
        adapters = param.stages["adapt"].adapters
        merging = [a for n, a in adapters.items() if chosen is None or n in chosen]
        if not merging:
            return param
        _check_mergeable(path, param)
        compute = torch.promote_types(param.data.dtype, torch.float32)
        merged = param.data.to(compute)
        for adapter in merging:
            merged = merged + adapter.delta(compute).to(merged.device)
        kept = {n: a for n, a in adapters.items() if not (chosen is None or n in chosen)}
        return _with_adapters(param, merged.to(param.data.dtype), kept)

    return map_weights(fold, params, where=lambda _, param: _has_lora(param))


def save_lora(params, path: str | os.PathLike, layout: str = "dsf", name: str | None = None) -> None:
    """Write the adapter ``name`` (default: the only one) of a DiT as a safetensors file in ``layout``.

    ``layout`` names the form, and so who reads the file (see :mod:`dsf.model_parts.lora_files`):

    - ``dsf``: our weight paths and exact float64 scales; read by dsf (and its ``.diff`` keys).
    - ``diffusers``: ``transformer.<module>.lora_A/B.weight`` (``.alpha`` when a scale is not 1); read by
      diffusers (``load_lora_weights``), by ComfyUI for FLUX.1 (its ``transformer.`` keys), and by
      DiffSynth-Studio for FLUX.1 (its block modules; it applies one file-wide alpha).
    - ``kohya``: ``lora_unet_<native module>.lora_down/up.weight`` and ``.alpha``; read by ComfyUI, kohya
      sd-scripts (FLUX.1) and musubi-tuner (Wan), diffusers, and DiffSynth-Studio for FLUX.1 (block modules).
    - ``comfyui``: ``diffusion_model.<native module>.lora_down/up.weight`` and ``.alpha`` (``.diff``,
      ``.diff_b`` for dense changes); read by ComfyUI, diffusers, and DiffSynth-Studio for Wan.
    - ``diffsynth``: DiffSynth-Studio's module names (FLUX.1's ``blocks.N.attn.a_to_qkv``, Wan's original
      ones), ``.lora_A/B.weight``, the scale folded into ``down``; read by DiffSynth-Studio (``pipe.load_lora``).

    The file is written under a temporary name, then renamed.

    >>> import tempfile, torch, dsf
    >>> from pathlib import Path
    >>> params = lora(rank=1).init({"q": {"weight": torch.zeros(3, 2)}}, dsf.random.key(0))
    >>> file = Path(tempfile.mkdtemp()) / "q.safetensors"
    >>> save_lora(params, file, "diffusers")
    >>> sorted(load_lora({"q": {"weight": torch.zeros(3, 2)}}, file)["q"]["weight"].stages["adapt"].adapters)
    ['q']
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {LAYOUTS}")
    adapters = _adapters(params)
    if name is None and len(adapters) != 1:
        raise ValueError(f"params hold the LoRAs {sorted(adapters)}: pass save_lora(..., name=) to pick one")
    name = next(iter(adapters)) if name is None else name
    if name not in adapters:
        raise ValueError(f"no LoRA named {name!r} in params; they hold {sorted(adapters)}")
    changes = {
        path: Difference(a.delta(a.difference.dtype)) if isinstance(a, DenseAdapter) else Factors(a.down, a.up, a.scale)
        for path, a in adapters[name].items()
    }
    write_lora(changes, path, layout, param_shapes(params))
