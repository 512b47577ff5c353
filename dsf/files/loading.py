"""Checkpoint-loading helpers shared by the model families: layouts, encoder tensors, key checks, configs, pipeline
folders, tokenizers.

Nothing here knows a model: each family passes its names, expected shapes, config classes and the
hint its errors end with.

Example:
    >>> merged_config({"width": 8, "depth": 2}, {"depth": 4}, {"width": 16})
    {'width': 16, 'depth': 4}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

import torch

from dsf.files.hub import ModelSource, resolve
from dsf.files.io import Source, read_json
from dsf.files.quantized import load_in_layout
from dsf.tree import unflatten_dict
from dsf.weight import as_weight

EXAMPLES = 5  # keys shown per kind of mismatch in errors
ENCODER_HINT = "If its sizes differ, put its config.json beside the weights or pass config= (transformers config keys)."


def key_problems(expected: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> list[str]:
    """The missing, unexpected and wrongly shaped keys of ``shapes`` against ``expected``: a count and examples per kind,
    led by the numbered blocks (``blocks.3``) missing entirely.

    >>> key_problems({"a": (2,), "b": (3,)}, {"a": (4,), "c": (1,)})  # doctest: +NORMALIZE_WHITESPACE
    ["1 missing keys, e.g. ['b']", "1 unexpected keys, e.g. ['c']",
     "1 shape mismatches (checkpoint != config), e.g. ['a: (4,) != (2,)']"]
    >>> key_problems({"blocks.0.w": (2, 3), "blocks.1.w": (2, 3)}, {"blocks.0.w": (3, 2)})  # doctest: +NORMALIZE_WHITESPACE
    ["1 blocks missing entirely, e.g. ['blocks.1']", "1 missing keys, e.g. ['blocks.1.w']",
     "1 shape mismatches (checkpoint != config), e.g. ['blocks.0.w: (3, 2) != (2, 3) (transposed?)']"]
    """
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [_mismatch(k, tuple(shapes[k]), tuple(expected[k])) for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    kinds = (
        ("blocks missing entirely", _whole_blocks(missing, expected)),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint != config)", wrong),
    )
    return [f"{len(keys)} {kind}, e.g. {keys[:EXAMPLES]}" for kind, keys in kinds if keys]


def _mismatch(key: str, found: tuple, wanted: tuple) -> str:
    transposed = len(found) == 2 and found[::-1] == wanted
    return f"{key}: {found} != {wanted}" + (" (transposed?)" if transposed else "")


def _whole_blocks(missing: list[str], expected: Iterable[str]) -> list[str]:
    """The numbered blocks (the key up to its first ``.N``) all of whose expected keys are ``missing``."""
    def block(key: str) -> str | None:
        match = re.match(r"(.+?\.\d+)\.", key)
        return match.group(1) if match else None

    absent = set(missing)
    keys_of: dict[str, list[str]] = {}
    for key in expected:
        if (name := block(key)) is not None:
            keys_of.setdefault(name, []).append(key)
    return [name for name, keys in keys_of.items() if all(key in absent for key in keys)]


def check_keys(expected: Mapping[str, tuple], shapes: Mapping[str, tuple], subject: str, hint: str) -> None:
    """Raise ``ValueError("{subject}: {problems}. {hint}")`` unless ``shapes`` has exactly the ``expected`` keys and shapes.

    >>> check_keys({"a": (2,)}, {"a": (2,), "b": (1,)}, "checkpoint does not fit a toy", "Pass config=.")
    Traceback (most recent call last):
    ...
    ValueError: checkpoint does not fit a toy: 1 unexpected keys, e.g. ['b']. Pass config=.
    """
    problems = key_problems(expected, shapes)
    if problems:
        raise ValueError(f"{subject}: " + "; ".join(problems) + ". " + hint)


def check_encoder_keys(family: str, name: str, expected: Mapping[str, tuple], found: Mapping[str, torch.Tensor], weights) -> None:
    """:func:`check_keys` of a text or image encoder's tensors read from ``weights`` (a state dict or files).

    >>> check_encoder_keys("Toy", "T5", {"a": (2,)}, {"a": torch.zeros(3)}, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the state dict does not fit Toy's T5 encoder: 1 shape mismatches ... ['a: (3,) != (2,)']. If its sizes differ, ...
    """
    where = "the state dict" if isinstance(weights, Mapping) else str(weights)
    shapes = {key: tuple(tensor.shape) for key, tensor in found.items()}
    check_keys(expected, shapes, f"{where} does not fit {family}'s {name} encoder", ENCODER_HINT)


def encoder_prefix(flat: Mapping[str, Any], marker: str, name: str, skip: str = "") -> str:
    """The one prefix (``""`` or ending in ``.``) before ``marker`` in the keys, except prefixes ending in ``skip``.

    >>> encoder_prefix({"text.block.0.q": 0, "decoder.block.0.q": 0}, "block.0.q", "T5", skip="decoder.")
    'text.'
    """
    prefixes = sorted(
        prefix
        for key in flat
        if key.endswith(marker)
        and ((prefix := key[: -len(marker)]) == "" or prefix.endswith("."))
        and not (skip and prefix.endswith(skip))
    )
    if not prefixes:
        examples = sorted(flat)[:EXAMPLES]
        raise ValueError(f"no {name} weights in the checkpoint: no key ends in {marker!r}; its keys look like {examples}")
    if len(prefixes) > 1:
        raise ValueError(f"the checkpoint holds several {name} encoders, under {prefixes}; pass a state dict holding one")
    return prefixes[0]


def encoder_tensors(
    flat: Mapping[str, Any], prefix: str, parts: tuple[str, ...], renamed: str, dropped: Collection[str] = ()
) -> dict[str, Any]:
    """The tensors under ``prefix`` whose names within it start with one of ``parts``, are not ``dropped``, and
    are renamed ``renamed + name``.

    >>> encoder_tensors({"m.text.layers.0": 1, "m.text.ids": 2, "m.head": 3}, "m.text.", ("layers.", "ids"), "t.", {"ids"})
    {'t.layers.0': 1}
    """
    return {
        renamed + key[len(prefix) :]: tensor
        for key, tensor in flat.items()
        if key.startswith(prefix) and key[len(prefix) :].startswith(parts) and key[len(prefix) :] not in dropped
    }


def encoder_params(
    family: str,
    name: str,
    weights: Source,
    to_ours: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
    expected: Mapping[str, tuple],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """The params tree of an encoder: ``weights`` read (cast to ``dtype``, on ``device``; float8 tensors as fp8
    records, :mod:`dsf.files.quantized`), renamed by ``to_ours``, checked against the ``expected`` shapes
    (:func:`check_encoder_keys`).

    >>> encoder_params("Toy", "T5", {"w": torch.zeros(2)}, lambda flat: {"enc.w": flat["w"]}, {"enc.w": (2,)}, torch.half)
    {'enc': {'w': tensor([0., 0.], dtype=torch.float16)}}
    """
    params = load_in_layout(weights, to_ours, dtype=dtype, device=device)
    check_encoder_keys(family, name, expected, params, weights)
    return unflatten_dict(params)


def merged_config(defaults: Mapping, found: Mapping | None, override: Any) -> dict:
    """``defaults`` < ``found`` < ``override`` (a mapping, an object with ``to_dict()``, or None).

    >>> merged_config({"a": 1, "b": 1}, None, {"b": 2})
    {'a': 1, 'b': 2}
    """
    override = override.to_dict() if hasattr(override, "to_dict") else dict(override or {})
    return {**defaults, **(found or {}), **override}


def config_json_beside(weights: Source) -> dict | None:
    """The ``config.json`` in the weights' folder (or beside the first weights file), if any; None for a state dict.

    >>> config_json_beside({"w": torch.zeros(1)}) is None
    True
    """
    if isinstance(weights, Mapping):
        return None
    first = Path(weights) if isinstance(weights, (str, os.PathLike)) else Path(next(iter(weights)))
    path = (first if first.is_dir() else first.parent) / "config.json"
    return read_json(path) if path.is_file() else None


def config_of_kind(weights: Source, key: str, kind: str, *, absent_ok: bool = False) -> dict | None:
    """The ``config.json`` beside the weights when its ``key`` is ``kind`` (or absent, with ``absent_ok``), else None.

    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    >>> config_of_kind(folder, "model_type", "t5"), config_of_kind(folder, "model_type", "umt5")
    ({'model_type': 't5', 'd_model': 8}, None)
    """
    found = config_json_beside(weights)
    return found if found is not None and found.get(key, kind if absent_ok else None) == kind else None


def pipeline_subfolder(source: Source, name: str) -> Source:
    """A diffusers pipeline folder stands for its ``name/`` subfolder; other sources for themselves.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "vae").mkdir()
    >>> pipeline_subfolder(folder, "vae") == folder / "vae", pipeline_subfolder(folder, "transformer") == folder
    (True, True)
    """
    if isinstance(source, (str, os.PathLike)) and (Path(source) / name).is_dir():
        return Path(source) / name
    return source


def is_pipeline(root, encoder_folder: str) -> bool:
    """Whether ``root`` is a diffusers pipeline folder: it has ``encoder_folder/`` or ``model_index.json``.

    >>> is_pipeline({"w": torch.zeros(1)}, "text_encoder")
    False
    """
    return isinstance(root, Path) and ((root / encoder_folder).is_dir() or (root / "model_index.json").is_file())


def pipeline_component(root, encoder_folder: str, name: str):
    """A diffusers pipeline folder stands for its encoder subfolder (an error if it lacks one); other sources for themselves.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "model_index.json").write_text("{}")
    >>> pipeline_component(folder, "text_encoder", "T5")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... is a diffusers pipeline folder (it has model_index.json) but has no text_encoder/ with the T5 encoder; ...
    """
    if not is_pipeline(root, encoder_folder):
        return root
    folder = root / encoder_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{root} is a diffusers pipeline folder (it has model_index.json) but has no {encoder_folder}/ with "
            f"the {name} encoder; download {encoder_folder}/ into it, or pass the encoder's own files"
        )
    return folder


def pipeline_part(root, encoder_folder: str, part: str) -> Path | None:
    """``root/part`` when ``root`` is a diffusers pipeline folder, else ``None``.

    >>> pipeline_part({}, "text_encoder", "tokenizer") is None
    True
    """
    return root / part if is_pipeline(root, encoder_folder) else None


def local_folder(source, what: str) -> Path:
    """The local folder of a path or a :class:`ModelSource`; an error naming ``what`` if there is none.

    >>> local_folder("/no/such/folder", "T5 tokenizer")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no T5 tokenizer folder at /no/such/folder; pass a local folder holding its files
    """
    folder = Path(resolve(source)) if isinstance(source, ModelSource) else Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"no {what} folder at {folder}; pass a local folder holding its files")
    return folder


def load_tokenizer(tokenizer, default_folder: Path | None, tokenizer_class, name: str, where: str):
    """A tokenizer object as is; otherwise ``tokenizer_class`` from a local folder (``default_folder`` if None).

    ``where`` says where the ``name`` encoder's tokenizer files are found, for the error when there is no folder.

    >>> from transformers import T5TokenizerFast
    >>> load_tokenizer(None, None, T5TokenizerFast, "T5", "the pipeline's tokenizer/")
    Traceback (most recent call last):
    ...
    ValueError: pass tokenizer= for the T5 encoder: a local folder holding its tokenizer files (the pipeline's tokenizer/), a ModelSource, or a tokenizer object
    """
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is None:
        if default_folder is None:
            raise ValueError(
                f"pass tokenizer= for the {name} encoder: a local folder holding its tokenizer files ({where}), "
                "a ModelSource, or a tokenizer object"
            )
        tokenizer = default_folder
    folder = local_folder(tokenizer, f"{name} tokenizer")
    wanted = sorted(tokenizer_class.vocab_files_names.values())
    if not any((folder / file).is_file() for file in wanted):
        raise FileNotFoundError(f"{folder} holds none of the {name} tokenizer files {wanted}")
    return tokenizer_class.from_pretrained(str(folder), local_files_only=True)


def tensor_shapes(flat: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: shape}`` of a model checkpoint's flat state dict, each shape a tuple; every tensor must hold floating-point
    numbers (float8 included): integer or boolean weights are an error naming the key.

    >>> tensor_shapes({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
    {'w': (2, 3), 'b': (2,)}
    >>> tensor_shapes({"w": torch.zeros(2, dtype=torch.int32)})
    Traceback (most recent call last):
    ...
    ValueError: checkpoint key 'w' holds torch.int32 numbers, but model weights are floating point (float32, bfloat16, float16 or float8); was the file written from another kind of tensor?
    """
    for key, tensor in flat.items():
        dtype = as_weight(tensor).data.dtype  # an fp8 record holds float8 data
        if not dtype.is_floating_point:
            raise ValueError(
                f"checkpoint key {key!r} holds {dtype} numbers, but model weights are floating point (float32, "
                "bfloat16, float16 or float8); was the file written from another kind of tensor?"
            )
    return {key: tuple(tensor.shape) for key, tensor in flat.items()}


def strip_wrapper_prefix(
    flat: Mapping[str, Any], prefixes: tuple[str, ...], parts: tuple[str, ...] = ("",)
) -> tuple[dict[str, Any], str]:
    """``(entries under the prefix, prefix)`` for the first of ``prefixes`` that some key starts with, followed by one
    of ``parts`` (a model inside a larger file); ``(all entries, "")`` when none does.

    >>> strip_wrapper_prefix({"vae.encoder.w": 1, "cond.w": 2}, ("first_stage_model.", "vae."), ("encoder.", "decoder."))
    ({'encoder.w': 1}, 'vae.')
    >>> strip_wrapper_prefix({"model.diffusion_model.w": 1, "vae.w": 2}, ("model.diffusion_model.",))
    ({'w': 1}, 'model.diffusion_model.')
    >>> strip_wrapper_prefix({"w": 1}, ("model.",))
    ({'w': 1}, '')
    """
    for prefix in prefixes:
        if any(key.startswith(tuple(prefix + part for part in parts)) for key in flat):
            return {key[len(prefix) :]: value for key, value in flat.items() if key.startswith(prefix)}, prefix
    return dict(flat), ""


def check_checkpoint_keys(expected: Mapping[str, tuple], shapes: Mapping[str, tuple], layout: str, model: str, hint: str) -> None:
    """:func:`check_keys` of a checkpoint put in our layout from ``layout``, against the ``model`` it should fit.

    >>> check_checkpoint_keys({"a": (2,)}, {}, "ldm", "a toy VAE", "Pass config=.")
    Traceback (most recent call last):
    ...
    ValueError: checkpoint (ldm layout) does not fit a toy VAE: 1 missing keys, e.g. ['a']. Pass config=.
    """
    check_keys(expected, shapes, f"checkpoint ({layout} layout) does not fit {model}", hint)


def numbered_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest number that follows ``prefix`` (up to the next ``.``) in the keys; 0 when none does.

    >>> numbered_count(["blocks.0.w", "blocks.11.w", "blocks.head.w", "proj.w"], "blocks."), numbered_count([], "blocks.")
    (12, 0)
    """
    indices = {key[len(prefix) :].split(".", 1)[0] for key in keys if key.startswith(prefix)}
    return max((int(i) for i in indices if i.isdigit()), default=-1) + 1


def sizes_from_shapes(shapes: Mapping[str, tuple], readings: Mapping[str, tuple[str, int]]) -> dict:
    """``{field: shapes[key][axis]}`` for each ``field: (key, axis)`` of ``readings`` whose key is in ``shapes``.

    >>> sizes_from_shapes({"conv_in.weight": (64, 3, 3, 3)}, {"in_channels": ("conv_in.weight", 1), "out": ("conv_out.weight", 0)})
    {'in_channels': 3}
    """
    return {field: shapes[key][axis] for field, (key, axis) in readings.items() if key in shapes}


def check_known_config_keys(config: Mapping, accepted: Collection[str], known: Collection[str], kind: str) -> None:
    """Raise a ValueError listing the keys of ``config`` not ``accepted`` (keys starting with ``_`` pass), and the ``known`` ones.

    >>> check_known_config_keys({"depth": 2, "sample_size": 8, "_class_name": "Toy", "dpeth": 3}, {"depth", "sample_size"},
    ...                         {"depth"}, "Toy")
    Traceback (most recent call last):
    ...
    ValueError: unknown Toy config keys ['dpeth']; known keys are ['depth']
    """
    unknown = [key for key in config if key not in accepted and not key.startswith("_")]
    if unknown:
        raise ValueError(f"unknown {kind} config keys {unknown}; known keys are {sorted(known)}")


def check_supported_values(config: Mapping, required: Mapping[str, tuple[Callable[[Any], bool], str]], kind: str, model: str) -> None:
    """Raise a ValueError for the first key of ``required`` (``{key: (supported, what it must be)}``) whose value in
    ``config`` the ``model`` does not support.

    >>> check_supported_values({"act_fn": "gelu"}, {"act_fn": (lambda v: v == "silu", "'silu'")}, "Toy", "toy VAE")
    Traceback (most recent call last):
    ...
    ValueError: Toy config act_fn='gelu' is not supported by the toy VAE: it must be 'silu'
    """
    for key, (supported, expected) in required.items():
        if key in config and not supported(config[key]):
            raise ValueError(f"{kind} config {key}={config[key]!r} is not supported by the {model}: it must be {expected}")


def config_fields(base: Mapping, config_json: Mapping | None, config: Mapping | None, from_diffusers: Callable[..., dict]) -> dict:
    """A config's fields: ``base`` (what the checkpoint's shapes say, over any defaults) < those of ``config_json`` <
    those of ``config``, each read by ``from_diffusers(mapping, strict)``, strictly for ``config`` (the caller's).

    >>> read = lambda mapping, strict: {"depth": mapping["num_layers"]} if "num_layers" in mapping else {}
    >>> config_fields({"width": 8, "depth": 1}, {"num_layers": 2}, {"num_layers": 4}, read)
    {'width': 8, 'depth': 4}
    """
    fields = dict(base)
    fields.update(from_diffusers(config_json or {}, strict=False))
    fields.update(from_diffusers(config or {}, strict=True))
    return fields
