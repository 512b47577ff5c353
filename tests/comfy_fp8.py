"""ComfyUI's quantized checkpoints, written as ComfyUI's tools write them, for the loading tests: each chosen weight
in float8 with a per-tensor scale, the layers named in one of ComfyUI's three ways."""

from __future__ import annotations

import json
from typing import Callable

import torch

from dsf.files.quantized import comfy_quant_tensor
from dsf.float8 import dequantize
from dsf.transforms.fp8 import quantize

STYLES = ("layer", "header", "scaled_fp8")


def comfy_fp8(flat: dict, chosen: Callable[[str, torch.Tensor], bool], style: str) -> tuple[dict, dict, dict]:
    """``(tensors, header metadata, dequantized)``: ``flat`` with its ``chosen`` weights quantized in ``style``
    (``layer``: a ``.comfy_quant`` per layer; ``header``: ``_quantization_metadata``; ``scaled_fp8``: the older
    marker and ``scale_weight``/``scale_input``), and the float32 values the file stands for."""
    tensors, layers, dequantized = {}, {}, {}
    for key, tensor in flat.items():
        if not (key.endswith(".weight") and chosen(key, tensor)):
            tensors[key] = dequantized[key] = tensor
            continue
        layer = key.removesuffix(".weight")
        data, scale = quantize(tensor)
        tensors[key], dequantized[key] = data, dequantize(data, scale, torch.float32)
        layers[layer] = {"format": "float8_e4m3fn"}
        if style == "scaled_fp8":
            tensors[f"{layer}.scale_weight"], tensors[f"{layer}.scale_input"] = scale.reshape(1), torch.ones(1)
            continue
        tensors[f"{layer}.weight_scale"] = scale
        tensors[f"{layer}.input_scale"] = torch.tensor(0.25)  # an activation scale: not a weight's
        if style == "layer":
            tensors[f"{layer}.comfy_quant"] = comfy_quant_tensor(layers[layer])
    if style == "scaled_fp8":
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if style == "header" else {}
    return tensors, metadata, dequantized
