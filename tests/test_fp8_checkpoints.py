"""fp8 checkpoints (dsf.files.quantized): float8 tensors load as fp8 records at the scales the file gives, the scales
follow their weights through a layout conversion, and what dsf cannot read is an error naming it. The families'
parity on ComfyUI's files is tested with each family (test_flux2_dit, test_flux2_text, test_flux_text)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.files.quantized import comfy_quant_tensor, load_in_layout, scales_through, split_scales
from dsf.float8 import FP8, dequantize
from dsf.transforms.fp8 import fp8, quantize

from comfy_fp8 import STYLES, comfy_fp8


def _weights(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=gen), "b.weight": torch.randn(2, 3, generator=gen) * 5,
            "a.bias": torch.randn(4, generator=gen)}


def _joined(flat):
    """A layout conversion that joins a and b along the rows and transposes a copy of b."""
    return {"ab.weight": torch.cat([flat["a.weight"], flat["b.weight"]]), "bt.weight": flat["b.weight"].T,
            "a.bias": flat["a.bias"]}


@pytest.mark.parametrize("style", STYLES)
def test_each_comfyui_style_loads_the_same_records(style, tmp_path):
    tensors, metadata, dequantized = comfy_fp8(_weights(), lambda key, t: t.ndim == 2, style)
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    loaded = load_in_layout(tmp_path / "model.safetensors", dict)
    assert sorted(loaded) == ["a.bias", "a.weight", "b.weight"]  # scales, activation scales and markers are gone
    for key in ("a.weight", "b.weight"):
        assert loaded[key].data.dtype == FP8 and torch.equal(dsf.materialize(loaded[key]).float(), dequantized[key])
    assert loaded["a.bias"].dtype == torch.float32
    assert loaded["a.weight"].stages["decode"].dtype == torch.float32  # the file's other weights' dtype


def test_scales_follow_the_rows_through_a_conversion():
    tensors, _, dequantized = comfy_fp8(_weights(), lambda key, t: t.ndim == 2, "layer")
    loaded = load_in_layout(tensors, _joined, dtype=torch.float32)
    joined = loaded["ab.weight"]
    assert joined.stages["decode"].scale.shape == (6, 1)  # a's scale on four rows, b's on two
    assert torch.equal(dsf.materialize(joined), torch.cat([dequantized["a.weight"], dequantized["b.weight"]]))
    assert loaded["bt.weight"].stages["decode"].scale.shape == ()  # a view of one tensor keeps its one scale
    assert torch.equal(dsf.materialize(loaded["bt.weight"]), dequantized["b.weight"].T)


def test_a_join_along_the_columns_of_different_scales_is_refused():
    weights = {"a.weight": torch.zeros(2, 2).to(FP8), "b.weight": torch.zeros(2, 2).to(FP8)}
    scales = {"a.weight": torch.tensor(1.0), "b.weight": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="joins float8 tensors with different scales along the columns of 'ab'"):
        scales_through(lambda f: {"ab": torch.cat([f["a.weight"], f["b.weight"]], dim=1)}, weights, scales)


def test_a_scale_per_output_row_and_a_uint8_container_are_read():
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    data, scale = quantize(weight, "channel")
    flat = {"w.weight": data.view(torch.uint8), "w.weight_scale": scale.flatten(),
            "w.comfy_quant": comfy_quant_tensor({"format": "float8_e4m3fn"})}
    loaded = load_in_layout(flat, dict, dtype=torch.float32)["w.weight"]
    assert loaded.data.dtype == FP8 and loaded.stages["decode"].scale.shape == (3, 1)
    assert torch.equal(dsf.materialize(loaded), dequantize(data, scale, torch.float32))


@pytest.mark.parametrize("spelling", ["weight_scale", "scale_weight"])
def test_a_scale_beside_a_float8_weight_counts_without_a_marker(spelling):
    data, scale = quantize(torch.randn(3, 2, generator=torch.Generator().manual_seed(2)))
    loaded = load_in_layout({"w.weight": data, f"w.{spelling}": scale, "w.input_scale": torch.tensor(1.0)}, dict,
                            dtype=torch.float32)
    assert sorted(loaded) == ["w.weight"] and torch.equal(dsf.materialize(loaded["w.weight"]), dequantize(data, scale, torch.float32))


def test_plain_float8_tensors_load_at_scale_one_and_are_never_upcast():
    flat = {"w": torch.tensor([[1.5, -2.0]]).to(FP8), "n": torch.ones(2, dtype=torch.float64)}
    loaded = load_in_layout(flat, dict, dtype=torch.bfloat16)
    assert loaded["w"].data is flat["w"] and loaded["w"].stages["decode"].scale.item() == 1.0
    assert dsf.materialize(loaded["w"]).dtype == torch.bfloat16 and loaded["n"].dtype == torch.bfloat16
    assert load_in_layout({"w": flat["w"]}, dict)["w"].stages["decode"].dtype == torch.bfloat16  # nothing else to follow


def test_fp8_keeps_a_loaded_record_and_only_sets_its_compute_dtype():
    tensors, _, _ = comfy_fp8(_weights(), lambda key, t: key == "a.weight", "layer")
    loaded = load_in_layout(tensors, dict, dtype=torch.float32)
    stored = fp8(compute_dtype=torch.bfloat16).init(loaded)
    assert stored["a.weight"].data is loaded["a.weight"].data
    assert stored["a.weight"].stages["decode"].scale is loaded["a.weight"].stages["decode"].scale
    assert stored["a.weight"].stages["decode"].dtype == torch.bfloat16
    assert stored["b.weight"].data.dtype == FP8  # the file's float32 matrix: quantized by fp8() as any other


def test_the_meta_device_reads_shapes_only(tmp_path):
    tensors, metadata, _ = comfy_fp8(_weights(), lambda key, t: t.ndim == 2, "header")
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    loaded = load_in_layout(tmp_path / "model.safetensors", dict, device="meta")
    assert loaded["a.weight"].data.is_meta and loaded["a.weight"].shape == (4, 3)


@pytest.mark.parametrize("problem, error", [
    ({"a.comfy_quant": comfy_quant_tensor({"format": "mxfp8"})}, r"layer 'a' is quantized as 'mxfp8', which dsf does not read"),
    ({"a.weight_scale": None}, r"ComfyUI marks layer 'a' as quantized, but the checkpoint has no a.weight_scale"),
    ({"a.weight_scale": torch.ones(1, 3)}, r"weight_scale of shape \(1, 3\) for a weight of shape \(4, 3\): .*not block-wise"),
    ({"a.weight": torch.zeros(4, 3)}, r"layer 'a' is marked as fp8-quantized, but a.weight holds torch.float32 numbers"),
    ({"a.comfy_quant": torch.tensor([1, 2], dtype=torch.uint8)}, r"'a.comfy_quant' should hold a ComfyUI layer config"),
    ({"c.comfy_quant": comfy_quant_tensor({"format": "float8_e4m3fn"})}, r"marks layer 'c' as quantized, but the checkpoint has no c.weight"),
])
def test_what_dsf_cannot_read_is_named(problem, error):
    tensors, _, _ = comfy_fp8(_weights(), lambda key, t: key == "a.weight", "layer")
    tensors = {k: v for k, v in (tensors | problem).items() if v is not None}
    with pytest.raises(ValueError, match=error):
        split_scales(tensors)
