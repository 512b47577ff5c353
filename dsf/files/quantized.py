"""Checkpoints published in fp8: their float8 tensors load as fp8 records, at the scales the file gives.

Every float8 tensor of a checkpoint becomes a :mod:`dsf.float8` record: its data as stored (never upcast, whatever
``dtype`` the load asks for) and a decode stage with its scale, dequantized to the compute dtype at use (``dtype``,
or else the dtype of the file's other floating weights, or bfloat16). Without ``fp8()`` such a model computes as
it is; ``fp8()`` keeps the records (:mod:`dsf.transforms.fp8`); ``dsf.materialize_tree(params)`` gives plain
tensors (e.g. to fine-tune every weight).

The scale of a float8 tensor is 1 (plain fp8 files), unless the file is one of ComfyUI's quantized checkpoints,
which name the layers they quantize in one of three ways (a float8 ``<layer>.weight`` with a ``weight_scale`` or
``scale_weight`` beside it counts as quantized even where none names it):

- a ``<layer>.comfy_quant`` tensor per layer: the bytes (uint8) of a JSON object ``{"format": "float8_e4m3fn"}``;
- the safetensors header's ``_quantization_metadata``: ``{"format_version": "1.0", "layers": {<layer>: {"format":
  ...}}}``;
- the older "scaled fp8" files: a ``scaled_fp8`` marker tensor (its dtype the float8 format) and a
  ``<layer>.scale_weight`` per quantized layer.

A quantized layer's ``<layer>.weight`` is float8 (or a uint8 container of it) and ``<layer>.weight_scale`` (or
``.scale_weight``) its float32 scale: one number, or one per output row. ``input_scale`` / ``scale_input`` (the
activation scales of fp8 matrix multiplication) are dropped: dsf multiplies in the compute dtype, what ComfyUI
calls full-precision matrix multiplication. Formats other than ``float8_e4m3fn`` and ``float8_e5m2`` (nvfp4,
mxfp8, int8) are an error naming the layer.

The scales follow their weights through the family's layout conversion (:func:`scales_through`): a fused BFL
projection split into q, k and v gives each part the scale of the whole; parts with different scales joined
along the rows get a scale per row.

Example:
    >>> import torch
    >>> from dsf.float8 import FP8
    >>> flat = {"blocks.0.qkv.weight": torch.ones(6, 2).to(FP8), "blocks.0.qkv.weight_scale": torch.tensor(0.5),
    ...         "blocks.0.qkv.comfy_quant": comfy_quant_tensor({"format": "float8_e4m3fn"})}
    >>> split = lambda flat: {f"{p}.weight": t for p, t in zip("qkv", flat["blocks.0.qkv.weight"].chunk(3))}
    >>> ours = load_in_layout(flat, split, dtype=torch.float32)
    >>> sorted(ours), ours["k.weight"].data.dtype, ours["k.weight"].stages["decode"].scale.item()
    (['k.weight', 'q.weight', 'v.weight'], torch.float8_e4m3fn, 0.5)
    >>> import dsf
    >>> dsf.materialize(ours["k.weight"]).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable, Mapping

import torch

from dsf.files.io import Source, load_state_dict, safetensors_metadata
from dsf.float8 import FLOAT8_DTYPES, fp8_record, is_float8

Flat = Mapping[str, Any]
FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
LAYER_MARK = ".comfy_quant"
OLD_MARK = "scaled_fp8"
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
DROPPED_SUFFIXES = (".input_scale", ".scale_input", LAYER_MARK)
DEFAULT_DECODE_DTYPE = torch.bfloat16


def comfy_quant_tensor(config: dict) -> torch.Tensor:
    """A layer's ``.comfy_quant`` tensor as ComfyUI writes it: the UTF-8 bytes of its JSON config.

    >>> comfy_quant_tensor({"format": "float8_e4m3fn"})[:4].tolist()
    [123, 34, 102, 111]
    """
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def _layer_config(tensor: torch.Tensor, key: str) -> dict | None:
    """The JSON config a ``.comfy_quant`` tensor holds (``None`` on the meta device, which holds no bytes)."""
    if tensor.is_meta:
        return None
    try:
        config = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint key {key!r} should hold a ComfyUI layer config (JSON bytes): {error}") from None
    return config if isinstance(config, dict) else {"format": config}


def quantized_layers(flat: Flat, metadata: Mapping[str, str]) -> dict[str, str | None]:
    """``{layer: format}`` of the layers a ComfyUI checkpoint quantizes (format ``None``: unreadable on ``meta``).

    >>> quantized_layers({"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn), "a.scale_weight": torch.ones(())}, {})
    {'a': 'float8_e4m3fn'}
    >>> quantized_layers({}, {"_quantization_metadata": '{"layers": {"b": {"format": "float8_e5m2"}}}'})
    {'b': 'float8_e5m2'}
    """
    layers: dict[str, str | None] = {}
    if "_quantization_metadata" in metadata:
        try:
            described = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            raise ValueError("the checkpoint's _quantization_metadata is not a JSON object with 'layers'") from None
        layers |= {layer: config["format"] if isinstance(config, dict) else config for layer, config in described.items()}
    for key, tensor in flat.items():
        if key.endswith(LAYER_MARK):
            config = _layer_config(tensor, key)
            layers[key.removesuffix(LAYER_MARK)] = None if config is None else config.get("format")
    old_marks = [key for key in flat if key == OLD_MARK or key.endswith("." + OLD_MARK)]
    if old_marks:
        marker_dtype = flat[old_marks[0]].dtype
        old_format = str(marker_dtype if marker_dtype in FLOAT8_DTYPES else torch.float8_e4m3fn).removeprefix("torch.")
        layers |= {key.removesuffix(".scale_weight"): old_format for key in flat if key.endswith(".scale_weight")}
    for key in flat:  # a float8 weight with a scale beside it, whatever names the layer (or nothing does)
        layer = next((key.removesuffix(suffix) for suffix in SCALE_SUFFIXES if key.endswith(suffix)), None)
        weight = flat.get(f"{layer}.weight") if layer is not None else None
        if layer not in layers and weight is not None and weight.dtype in FLOAT8_DTYPES:
            layers[layer] = str(weight.dtype).removeprefix("torch.")
    return layers


def _scale_of(flat: Flat, layer: str, weight: torch.Tensor) -> torch.Tensor:
    """A quantized layer's scale as an fp8 record keeps it: shape () per tensor, (rows, 1, ...) per output row."""
    found = [flat[layer + suffix] for suffix in SCALE_SUFFIXES if layer + suffix in flat]
    if not found:
        raise ValueError(f"ComfyUI marks layer {layer!r} as quantized, but the checkpoint has no {layer}.weight_scale")
    scale = found[0].to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if weight.ndim and scale.numel() == weight.shape[0]:
        return scale.reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    raise ValueError(f"layer {layer!r} has a weight_scale of shape {tuple(scale.shape)} for a weight of shape "
                     f"{tuple(weight.shape)}: dsf reads one scale per tensor or per output row, not block-wise scales")


def _quantized_weight(flat: Flat, layer: str, fmt: str | None) -> torch.Tensor:
    key = f"{layer}.weight"
    if key not in flat:
        raise ValueError(f"ComfyUI marks layer {layer!r} as quantized, but the checkpoint has no {key}")
    weight = flat[key]
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"layer {layer!r} is quantized as {fmt!r}, which dsf does not read (it reads "
                         f"{', '.join(FORMATS)}); load the model's bf16 or fp8 checkpoint instead")
    if weight.dtype == torch.uint8 and fmt is not None:
        return weight.view(FORMATS[fmt])
    if weight.dtype not in FLOAT8_DTYPES:
        raise ValueError(f"layer {layer!r} is marked as fp8-quantized, but {key} holds {weight.dtype} numbers")
    return weight


def split_scales(flat: Flat, metadata: Mapping[str, str] = {}) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(weights, scales)`` of a checkpoint: its tensors without ComfyUI's quantization entries, and the scale of
    each quantized weight by its key.

    >>> weights, scales = split_scales({"a.weight": torch.ones(2, 2).to(torch.float8_e4m3fn),
    ...                                 "a.scale_weight": torch.tensor([2.0]), "a.scale_input": torch.tensor([1.0]),
    ...                                 "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    >>> sorted(weights), scales
    (['a.weight'], {'a.weight': tensor(2.)})
    """
    layers = quantized_layers(flat, metadata)
    scale_keys = {layer + suffix for layer in layers for suffix in SCALE_SUFFIXES}
    weights = {
        key: tensor for key, tensor in flat.items()
        if key not in scale_keys and not key.endswith(DROPPED_SUFFIXES) and key != OLD_MARK and not key.endswith("." + OLD_MARK)
    }
    scales = {}
    for layer, fmt in layers.items():
        weight = weights[f"{layer}.weight"] = _quantized_weight(flat, layer, fmt)
        scales[f"{layer}.weight"] = _scale_of(flat, layer, weight)
    return weights, scales


def scales_through(convert: Callable[[Flat], Flat], weights: Flat, scales: Mapping[str, torch.Tensor]) -> dict:
    """The scale of each converted tensor: ``convert`` run on markers (each weight's scale, or 1, expanded to its
    shape without memory), whose rows come out as the weights' did.

    A marker still a pure expansion gives one scale; one a join made gives a scale per row, which must be constant
    along each row (a join along the columns of tensors with different scales has no fp8 record).

    >>> flat = {"a": torch.zeros(2, 3), "b": torch.zeros(1, 3)}
    >>> joined = scales_through(lambda f: {"ab": torch.cat([f["a"], f["b"]])}, flat, {"a": torch.tensor(0.5)})
    >>> joined["ab"].flatten().tolist()
    [0.5, 0.5, 1.0]
    """
    one = torch.ones((), dtype=torch.float32)
    markers = {key: scales.get(key, one).to(torch.float32).to(tensor.device).expand(tensor.shape)
               for key, tensor in weights.items()}
    return {key: _record_scale(key, marker) for key, marker in convert(markers).items()}


def _record_scale(key: str, marker: torch.Tensor) -> torch.Tensor:
    if all(stride == 0 for stride in marker.stride()):  # still an expansion of one number
        return marker.reshape(-1)[0].clone() if marker.numel() else torch.ones((), device=marker.device)
    rows = marker.reshape(marker.shape[0], -1)
    if not marker.is_meta and not torch.equal(rows, rows[:, :1].expand_as(rows)):
        raise ValueError(f"the conversion to dsf's layout joins float8 tensors with different scales along the columns "
                         f"of {key!r}; load a bf16 checkpoint, or dequantize it first")
    return rows[:, :1].reshape(marker.shape[0], *[1] * (marker.ndim - 1)).clone()


def _decode_dtype(weights: Flat, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, else the most common dtype of the other floating tensors, else bfloat16."""
    if dtype is not None:
        return dtype
    others = Counter(t.dtype for t in weights.values() if t.dtype.is_floating_point and t.dtype not in FLOAT8_DTYPES)
    return others.most_common(1)[0][0] if others else DEFAULT_DECODE_DTYPE


def load_in_layout(source: Source, convert: Callable[[Flat], Flat], dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> dict:
    """The flat state dict of ``source`` converted by ``convert`` to dsf's layout, floating tensors in ``dtype``
    (as stored when ``None``) and float8 tensors as fp8 records (see the module docstring).

    >>> load_in_layout({"w": torch.ones(2, dtype=torch.float64)}, dict, torch.float32)
    {'w': tensor([1., 1.])}
    """
    weights, scales = split_scales(load_state_dict(source, device=device), safetensors_metadata(source))
    if dtype is not None:
        for key, tensor in weights.items():  # one at a time, each stored tensor freed as its cast replaces it
            if tensor.is_floating_point() and not is_float8(tensor):
                weights[key] = tensor.to(dtype)
    converted = convert(weights)
    if not any(is_float8(tensor) for tensor in converted.values()):
        return dict(converted)
    record_scales = scales_through(convert, weights, scales) if scales else {}
    decoded = _decode_dtype(weights, dtype)
    one = torch.ones((), dtype=torch.float32, device=device)
    return {key: fp8_record(tensor, record_scales.get(key, one), decoded) if is_float8(tensor) else tensor
            for key, tensor in converted.items()}
