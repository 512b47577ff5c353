"""The family contract: what a model family (FLUX.1, Wan, ...) provides, as two records.

A :class:`Checkpoint` says how one component (a DiT, a VAE) is read from the files people have: its
layouts (ours, which mirrors diffusers, and the original/BFL ones, each recognized by key marks and
converted both ways), the wrapper prefixes of all-in-one files (ComfyUI's ``model.diffusion_model.``),
how its config is resolved (defaults < the checkpoint's shapes < the ``config.json`` beside it <
``config=``), its parameter shapes and the model it builds. :meth:`Checkpoint.load` is the one loader
every family uses.

A :class:`Family` gathers a family's pieces: its DiT and VAE checkpoints, its config readers, its
pure functions, its LoRA conventions (default targets; the layout whose module names kohya and
ComfyUI LoRA files use, from whose conversion the fused-weight splits are read), its pipeline
loader, its training pieces and a tiny pipeline for tests. Generic code takes the record instead of
importing a family: LoRA files (:mod:`dsf.model_parts.lora_files`) find the family of a parameter tree with
:func:`family_of`, model files are recognized by :func:`dsf.files.model_files.recognize_model_files`.
A family registers its record when its package is imported.

Adding a family (``models/<name>/``), a checklist:

1. ``config.py``: a frozen config dataclass with the official defaults; ``fields_from_diffusers(mapping,
   strict)`` and ``fields_from_shapes(shapes)`` (what shapes cannot tell, :meth:`Family.shape_free_fields`,
   comes from config.json or ``config=``).
2. ``model.py``: ``param_shapes(config)``, ``init_dit(config, key)``, ``apply(params, ..., config)``, a
   small model class holding the config; repeated blocks through :func:`dsf.run_blocks`.
3. ``keys.py``: ``DIT = Checkpoint(...)`` with every layout the family accepts (converters both ways,
   written as tables), and ``load_dit``; ``vae_keys.py`` the same for the VAE, unless the family
   reuses a VAE that lives in the shared model parts.
4. ``text.py`` (encoders through transformers as pure functions, layers through ``run_blocks``),
   ``pipeline.py`` (``load_pipeline``), ``training.py`` (``SampleEncoder``, losses, ``LORA_TARGETS``,
   ``COMPONENTS`` for model-file recognition), ``tiny.py`` (``tiny_pipeline()``).
5. ``family.py``: the :class:`Family` record; ``__init__.py`` registers it with :func:`register`.
6. Tests, copied from ``tests/test_flux_*.py``: parity of the DiT in every layout, the VAE and the text
   encoders against diffusers/transformers at fp32 (relative error ≤ 1e-4) on tiny random weights;
   meta-device parameter counts of the full config; the pipeline against the diffusers pipeline; LoRA
   files in every layout round-tripped; ``tests/test_import_arrows.py`` passes unchanged.

Example:
    >>> import torch
    >>> toy = Checkpoint(
    ...     what="toy DiT", class_name="ToyModel", folder="transformer",
    ...     layouts=(Layout("original", marks=("lin.",), to_ours=lambda f: {k.replace("lin.", "proj."): v for k, v in f.items()},
    ...                     from_ours=lambda f: {k.replace("proj.", "lin."): v for k, v in f.items()}),
    ...              Layout("diffusers", marks=("proj.",))),
    ...     resolve_config=lambda shapes, config_json, config: shapes["proj.weight"][0],
    ...     param_shapes=lambda width: {"proj.weight": (width, 2)},
    ...     build=lambda width: f"a toy of width {width}", misfit_hint="Pass config=.")
    >>> model, params = toy.load({"lin.weight": torch.zeros(3, 2)})
    >>> model, tuple(params["proj"]["weight"].shape), list(toy.from_ours(params, "original"))
    ('a toy of width 3', (3, 2), ['lin.weight'])
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.files.io import Source
from dsf.files.quantized import load_in_layout
from dsf.tree import flatten_dict, unflatten_dict

Flat = Mapping[str, Any]  # a flat state dict: {"blocks.0.attn.to_q.weight": tensor}


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: the key prefixes (``marks``) or key parts (``infixes``) only it has, and its converters
    to and from ours (``None`` for ours).

    >>> Layout("bfl", marks=("double_blocks.",)).recognizes(["double_blocks.0.img_mod.lin.weight"])
    True
    """

    name: str
    marks: tuple[str, ...] = ()
    infixes: tuple[str, ...] = ()
    to_ours: Callable[[Flat], dict] | None = None
    from_ours: Callable[[Flat], dict] | None = None

    def recognizes(self, keys: Iterable[str]) -> bool:
        return any(key.startswith(self.marks) or any(mark in key for mark in self.infixes) for key in keys)


@dataclass(frozen=True)
class Checkpoint:
    """How one component of a family is read from (and written to) its checkpoints; see the module docstring.

    ``layouts`` are checked in order, ours (the one without converters) among them; ``wrapper_prefixes``
    are stripped first (with ``wrapper_parts``, what must follow the prefix); ``dropped_keys`` matches keys some
    files carry that the model does not use; ``config_flags`` maps a key that only marks a variant (ComfyUI's empty
    ``__index_timestep_zero__``) to the diffusers config keys it stands for, read beside ``config.json``; ``locate``
    turns a source into the component's own (default: a diffusers pipeline folder stands for its ``folder``).
    """

    what: str
    class_name: str
    folder: str
    layouts: tuple[Layout, ...]
    resolve_config: Callable[[dict, dict | None, Any], Any]
    param_shapes: Callable[[Any], dict]
    build: Callable[[Any], Any]
    misfit_hint: str
    wrapper_prefixes: tuple[str, ...] = ()
    wrapper_parts: tuple[str, ...] = ("",)
    dropped_keys: re.Pattern | None = None
    config_flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    locate: Callable[[Source], Source] | None = field(default=None, compare=False)

    def layout(self, name: str) -> Layout:
        found = [layout for layout in self.layouts if layout.name == name]
        if not found:
            raise ValueError(f"unknown {self.what} layout {name!r}; known layouts: {[l.name for l in self.layouts]}")
        return found[0]

    def unwrapped(self, flat: Flat) -> tuple[dict, str]:
        """``(entries under the first wrapper prefix found, that prefix)``, or ``(all entries, "")``."""
        return loading.strip_wrapper_prefix(flat, self.wrapper_prefixes, self.wrapper_parts)

    def detect_layout(self, keys: Iterable[str]) -> str:
        """The name of the first layout whose marks some key (wrapper prefix stripped) has; ``"unknown"`` if none."""
        unwrapped, _ = self.unwrapped(dict.fromkeys(keys))
        return next((layout.name for layout in self.layouts if layout.recognizes(unwrapped)), "unknown")

    def to_ours(self, flat: Flat) -> tuple[dict, str]:
        """``(the flat state dict in our layout, a name of the layout it was in)``; an unknown layout is kept as is."""
        unwrapped, prefix = self.unwrapped(flat)
        name = self.detect_layout(unwrapped)
        convert = self.layout(name).to_ours if name != "unknown" else None
        ours = convert(unwrapped) if convert is not None else dict(unwrapped)
        if self.dropped_keys is not None:
            ours = {key: value for key, value in ours.items() if not self.dropped_keys.fullmatch(key)}
        return ours, f"{name} (prefix {prefix!r})" if prefix else name

    def from_ours(self, params, layout: str) -> dict:
        """The flat state dict of a params tree (or flat dict) in ``layout``, ready for ``save_file``."""
        convert = self.layout(layout).from_ours
        flat = flatten_dict(params)
        return convert(flat) if convert is not None else flat

    def check_keys(self, shapes: Mapping[str, tuple], config, layout: str = "diffusers") -> None:
        """Raise an error listing missing, unexpected and wrongly shaped keys (ours) against ``config``."""
        loading.check_checkpoint_keys(self.param_shapes(config), shapes, layout, f"a {self.what} with {config}", self.misfit_hint)

    def load(self, source: Source, config=None, *, dtype: torch.dtype | None = None, device="cpu"):
        """``(model, params)`` from a checkpoint in any of the layouts, a :class:`dsf.files.hub.ModelSource`, or a
        diffusers pipeline folder; the config is: defaults < the checkpoint's shapes < the ``config.json`` beside the
        weights < ``config`` (diffusers config keys, or a whole config object)."""
        source = local_source(source)
        source = self.locate(source) if self.locate is not None else loading.pipeline_subfolder(source, self.folder)
        layouts = []  # the layout the conversion found, kept for messages

        def converted(stored):
            ours, found = self.to_ours(stored)
            layouts.append(found)
            return ours

        flat = load_in_layout(source, converted, dtype=dtype, device=device)
        layout = layouts[0]
        flagged = {name: value for key in self.config_flags if flat.pop(key, None) is not None
                   for name, value in self.config_flags[key].items()}
        shapes = loading.tensor_shapes(flat)
        config_json = loading.config_of_kind(source, "_class_name", self.class_name, absent_ok=True)
        if flagged:
            config_json = (config_json or {}) | flagged
        resolved = self.resolve_config(shapes, config_json, config)
        self.check_keys(shapes, resolved, layout)
        return self.build(resolved), unflatten_dict(flat)


@dataclass(frozen=True)
class Component:
    """A file-borne component of a family, for recognizing model files by their key names: its name in messages,
    whether a file's keys hold it, and the file that usually holds it (for hints).

    >>> Component("VAE", lambda keys: any(k.startswith("encoder.") for k in keys), "ae.safetensors").holds(["encoder.x"])
    True
    """

    name: str
    holds: Callable[[list[str]], bool]
    usual_file: str


@dataclass(frozen=True, eq=False)  # one record per family, compared and hashed by identity
class Family:
    """What a model family provides (see the module docstring for the checklist of adding one).

    ``signature``: weight paths (ours, "/"-joined) that only this family's DiT has, by which a params tree is
    recognized as this family's. ``native_layout``: the DiT layout whose module names kohya and ComfyUI LoRA files
    use (``None``: ours); the fused-weight splits of LoRA files are read off its ``from_ours``. ``components``:
    ``{key: Component}`` of the files a training recipe is given, in the order they are reported.
    ``lora_text_encoders``: ``{LoRA key prefix: component of the pipeline's params}`` for text-encoder keys
    (kohya's ``lora_te1_`` ...); the names after the prefix are the component's own, ``_``-joined after a prefix
    ending in ``_``. ``diffsynth_module``: DiffSynth-Studio's module name of a native module name (``None`` where
    the names are not its; the field ``None``: DiffSynth-Studio uses the native names, or ours with
    ``diffsynth_uses_ours``, as for Z-Image, whose DiffSynth module names are diffusers').
    """

    name: str
    dit: Checkpoint
    vae: Checkpoint
    config_type: type
    config_from_diffusers: Callable[[Mapping, bool], dict]
    config_from_shapes: Callable[[Mapping[str, tuple]], dict]
    init: Callable
    apply: Callable
    signature: tuple[str, ...]
    native_layout: str | None
    lora_targets: str
    components: Mapping[str, Component]
    load_pipeline: Callable
    sample_encoder: type
    losses: Mapping[str, Callable]
    tiny_pipeline: Callable[[], Any]
    lora_text_encoders: Mapping[str, str] = field(default_factory=dict)
    diffsynth_module: Callable[[str], str | None] | None = None
    diffsynth_uses_ours: bool = False

    def shape_free_fields(self) -> list[str]:
        """The config fields a checkpoint's shapes cannot tell (they come from its config.json, or ``config=``)."""
        told = self.config_from_shapes(self.dit.param_shapes(self.config_type()))
        return [f.name for f in dataclasses.fields(self.config_type) if f.name not in told]

    def owns(self, paths: Iterable[str]) -> bool:
        """Whether a params tree with these weight paths is this family's DiT."""
        paths = set(paths)
        return all(path in paths for path in self.signature)


_registered: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to generic code (LoRA files, model-file recognition); registering again replaces it."""
    _registered[family.name] = family
    return family


def registered() -> tuple[Family, ...]:
    """The families whose packages have been imported.

    >>> import dsf.models.flux
    >>> "FLUX.1" in [family.name for family in registered()]
    True
    """
    return tuple(_registered.values())


def family_of(paths: Iterable[str]) -> Family | None:
    """The registered family whose DiT has these weight paths ("/"-joined, ours), or ``None``; where the signatures of
    several fit (one family's DiT names may include another's), the one whose signature has the most paths.

    >>> from dsf.models import flux
    >>> family_of(["proj/weight"]) is None
    True
    """
    paths = list(paths)
    owners = [family for family in registered() if family.owns(paths)]
    return max(owners, key=lambda family: len(family.signature), default=None)
