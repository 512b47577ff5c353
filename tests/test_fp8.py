"""fp8 storage: output error on the tiny FLUX DiT, bytes, the trainable guard, LoRA-style adapt over fp8."""

import pytest
import torch

import dsf
import dsf.transforms
from dsf.models.flux import FluxConfig, FluxDiT, init_dit
from dsf.training.paradigm import Paradigm
from dsf.transforms import checkpoint
from dsf.float8 import FP8, Dequantize, dequantize
from dsf.transforms.fp8 import fp8, quantize
from dsf.weight import Stage, Weight, as_weight, map_weights, stage

CFG = FluxConfig(
    num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2, num_single_blocks=2, context_dim=32, pooled_dim=16
)


def flux_inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g).to(dtype)
    return latents, torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g), torch.full((2,), 3.5)


def relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def matrices(params):
    return {p: x for p, x in dsf.tree.leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight)) if len(x.shape) >= 2}


def test_fp8_output_error_on_tiny_flux():
    params = init_dit(CFG, dsf.random.key(0), dtype=torch.bfloat16)
    dit, inputs = FluxDiT(CFG), flux_inputs()
    reference = dit(params, *inputs)
    errors = {g: relative_error(dit(fp8(granularity=g).init(params), *inputs), reference) for g in ("tensor", "channel")}
    print(f"fp8 vs bf16 relative error of the tiny FLUX DiT output: {errors}")
    assert 0 < errors["channel"] <= errors["tensor"] < 5e-2


def test_fp8_stores_float8_and_halves_bytes():
    params = init_dit(CFG, dsf.random.key(0), dtype=torch.bfloat16)
    stored = fp8(granularity="channel").init(params)
    bf16, quantized = matrices(params), matrices(stored)
    assert quantized.keys() == bf16.keys() and len(quantized) > 0
    assert all(isinstance(w, Weight) and w.data.dtype == FP8 for w in quantized.values())
    data_bytes = sum(w.data.numel() * w.data.element_size() for w in quantized.values())
    assert data_bytes * 2 == dsf.tree.nbytes(list(bf16.values()))
    scale_bytes = sum(w.stages["decode"].scale.numel() * 4 for w in quantized.values())
    assert scale_bytes == 4 * sum(w.shape[0] for w in bf16.values())
    vectors_untouched = [x for p, x in dsf.tree.leaves_with_paths(stored) if p.endswith("bias")]
    assert all(x.dtype == torch.bfloat16 for x in vectors_untouched)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_dequantize_quantize_error_bound(granularity):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows over four decades
    data, scale = quantize(w, granularity)
    error = (dequantize(data, scale, torch.float32) - w).abs()
    # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; subnormals are spaced 2^-9 · scale
    bound = w.abs() * 2**-4 + scale * 2**-10
    assert bool((error <= bound * (1 + 1e-6)).all())
    assert scale.shape == ((64, 1) if granularity == "channel" else ())


def test_zero_tensors_and_rows_give_finite_scales():
    w = torch.zeros(4, 3)
    w[1] = torch.tensor([1.0, -2.0, 0.5])
    for granularity in ("tensor", "channel"):
        for tensor in (w, torch.zeros(4, 3)):
            data, scale = quantize(tensor, granularity)
            assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
            assert torch.equal(dequantize(data, scale, torch.float32), tensor)


def test_fp8_on_trained_weights_fails_at_init_in_any_order():
    """What trains is said once, by the paradigm's where=: no second mark can fall out of sync with it."""
    params = {"blocks": [{"w": torch.randn(4, 4)}], "head": torch.randn(2, 4)}
    for transforms in ((fp8(), checkpoint()), (checkpoint(), fp8())):
        with pytest.raises(ValueError, match=r"full fine-tuning cannot train 'blocks/0/w/data'.*float8.*fp8's"):
            Paradigm("full fine-tuning", dsf.chain(*transforms), r"^blocks/").init(params)
    frozen_head = Paradigm("full fine-tuning", dsf.chain(fp8(where=r"^head$")), r"^blocks/").init(params)
    assert frozen_head["blocks"][0]["w"].dtype == torch.float32 and frozen_head["head"].data.dtype == FP8
    assert not hasattr(dsf.transforms, "trainable") and "trainable" not in Weight.__slots__


def test_value_and_grad_refuses_fp8_leaves():
    stored = fp8(compute_dtype=torch.float32).init({"w": torch.randn(3, 3)})
    loss = lambda p: dsf.materialize(p["w"]).sum()
    with pytest.raises(ValueError, match="float8"):
        dsf.grad(loss, where="w")(stored)


@stage("adapt")
class LowRank(Stage):
    """A LoRA-like adapt stage for the test: ``w + up @ down``."""

    down: torch.Tensor
    up: torch.Tensor

    def apply(self, value):
        return value + (self.up @ self.down).to(value.dtype)


def add_low_rank(params, rank=2):
    g = torch.Generator().manual_seed(3)

    def adapt(_, param):
        out_dim, in_dim = as_weight(param).shape
        factors = LowRank(torch.randn(rank, in_dim, generator=g) * 0.1, torch.randn(out_dim, rank, generator=g) * 0.1)
        return as_weight(param).with_stage(factors)

    return map_weights(adapt, params)


def test_low_rank_adapt_over_fp8_trains_and_commutes():
    params = {"w": torch.randn(6, 5)}
    quantize_first = add_low_rank(fp8(compute_dtype=torch.float32).init(params))
    adapt_first = fp8(compute_dtype=torch.float32).init(add_low_rank(params))
    assert quantize_first["w"].slot_names() == ["decode", "adapt"] == adapt_first["w"].slot_names()
    assert torch.equal(dsf.materialize(quantize_first["w"]), dsf.materialize(adapt_first["w"]))
    x = torch.randn(3, 5)
    loss = lambda p: (x @ dsf.materialize(p["w"]).T).square().mean()
    grads = dsf.grad(loss, where="adapt")(adapt_first)
    factors = grads["w"].stages["adapt"]
    assert factors.down.abs().sum() > 0 and factors.up.abs().sum() > 0
    assert grads["w"].data is None and adapt_first["w"].data.dtype == FP8
    assert isinstance(adapt_first["w"].stages["decode"], Dequantize)


def test_a_bf16_dequantize_rounds_once():
    """bf16 and float32 dequantization differ by the final rounding only (the scale is not rounded to bf16 first)."""

    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) * 0.02
    for granularity in ("tensor", "channel"):
        data, scale = quantize(weight, granularity)
        assert torch.equal(dequantize(data, scale, torch.bfloat16), dequantize(data, scale, torch.float32).to(torch.bfloat16))


def test_a_checkpoint_published_in_fp8_becomes_the_storage_as_it_is():
    params = init_dit(CFG, dsf.random.key(0), dtype=torch.bfloat16)
    published = dsf.tree.map_with_path(lambda _, x: x.to(FP8), params)  # every tensor float8, vectors included
    dit, inputs = FluxDiT(CFG), flux_inputs()
    with pytest.raises(TypeError, match=r"stored as torch.float8_e4m3fn .* wrap the model with dsf.transforms.fp8\(\)"):
        dit(published, *inputs)
    stored = fp8(compute_dtype=torch.bfloat16).init(published)
    records = dict(dsf.tree.leaves_with_paths(stored, is_leaf=lambda x: isinstance(x, Weight)))
    originals = dict(dsf.tree.leaves_with_paths(published))
    assert records.keys() == originals.keys()
    assert all(records[p].data is originals[p] and records[p].stages["decode"].scale.item() == 1.0 for p in records)
    upcast = dsf.tree.map_with_path(lambda _, x: x.to(torch.bfloat16), published)  # the same numbers, upcast
    assert torch.equal(dit(stored, *inputs), dit(upcast, *inputs))
