"""LoRA transform and data functions: identity, gradients, factored = merged, hot load/clear/merge laws."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsf
from dsf import ops
from dsf.models import flux
from dsf.model_parts.modules import pure_module
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX1
from dsf.transforms.checkpoint import checkpoint
from dsf.transforms.lora import (
    FactoredLinear,
    LoraStage,
    clear_lora,
    load_lora,
    lora,
    lora_leaves,
    lora_trainable,
    merge_lora,
    save_lora,
)
from dsf.weight import Cast, Stage, Weight, dense, materialize, stage

CFG = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
                      num_single_blocks=1, context_dim=32, pooled_dim=16)
DIT = flux.FluxDiT(CFG)


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(2, 16, 4, 6, generator=gen), timestep=torch.tensor([0.3, 0.8]),
                text_embeds=torch.randn(2, 3, 32, generator=gen), pooled_embeds=torch.randn(2, 16, generator=gen),
                guidance=torch.tensor([3.5, 2.0]))


def _loss(params, batch):
    return DIT(params, **batch).square().mean()


def _linear_shapes() -> list[tuple]:
    return [shape for shape in flux.param_shapes(CFG).values() if len(shape) == 2]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _randomize_up(params, seed: int):
    """Every ``up`` factor random, so the adapters change the function."""
    gen = torch.Generator().manual_seed(seed)

    def fill(path, leaf):
        return torch.randn(leaf.shape, generator=gen) * 0.1 if path.endswith("/up") else leaf

    return dsf.tree.map_with_path(fill, params)


def _random_file(params, seed: int) -> dict:
    """A diffusers-layout LoRA dict on every 2-D weight of params, with random factors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in dsf.tree.flatten_dict(params).items():
        if weight.ndim == 2:
            module = key.removesuffix(".weight")
            tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(3, weight.shape[1], generator=gen) * 0.1
            tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(weight.shape[0], 3, generator=gen) * 0.1
    return tensors


@pytest.fixture(scope="module")
def base():
    return flux.init_dit(CFG, dsf.random.key(0))


def test_zero_up_is_the_plain_function_exactly(base):
    batch = _inputs()
    t = lora(rank=4, alpha=8)
    adapted = t.init(base, dsf.random.key(1))
    assert torch.equal(t(_loss)(adapted, batch), _loss(base, batch))

    def sampler(params, x, sigma):
        return DIT(params, x, sigma, batch["text_embeds"], batch["pooled_embeds"], batch["guidance"])

    noise, sigmas = batch["latents"], FLUX1.sigmas(3)
    with torch.no_grad():
        plain = sample(sampler, base, noise, sigmas, progress=False)
        assert torch.equal(sample(t(sampler), adapted, noise, sigmas, progress=False), plain)
        merged_at_use = lora(rank=4, merge_when_sampling=True).init(base, dsf.random.key(1))
        assert torch.equal(sample(sampler, merged_at_use, noise, sigmas, progress=False), plain)


def test_gradients_reach_only_the_factors(base):
    adapted = _randomize_up(lora(rank=2).init(base, dsf.random.key(1)), seed=0)
    _, grads = dsf.value_and_grad(_loss, where=lora_trainable)(adapted, _inputs())
    with_grad = {path for path, g in dsf.tree.leaves_with_paths(grads) if g is not None}
    factors = set(dsf.tree.select(adapted, lora_leaves()))
    assert with_grad == factors and len(factors) == 2 * len(_linear_shapes())
    assert all(bool(g.abs().sum() > 0) for path, g in dsf.tree.leaves_with_paths(grads) if g is not None)
    assert all(not p.endswith(("/data", "/bias")) for p in with_grad)


def test_backward_never_builds_a_full_weight_gradient():
    out_dim, in_dim, rank = 24, 40, 2
    params = _randomize_up(lora(rank=rank).init({"proj": {"weight": torch.randn(out_dim, in_dim)}}, dsf.random.key(0)), 1)

    def loss(p, x):
        return ops.linear(x, p["proj"]["weight"]).square().sum()

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.seen += [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]
            return out

    with Shapes() as shapes:
        _, grads = dsf.value_and_grad(loss, where=lora_trainable)(params, torch.randn(5, in_dim))
    assert grads["proj"]["weight"].stages["adapt"].adapters["lora"].down.shape == (rank, in_dim)
    assert (rank, in_dim) in shapes.seen and (out_dim, in_dim) not in shapes.seen


def test_factored_equals_merged(base):
    adapted = _randomize_up(lora(rank=3, alpha=6).init(base, dsf.random.key(2)), seed=1)
    weight = materialize(adapted["transformer_blocks"][0]["ff"]["net"]["0"]["proj"]["weight"])
    assert isinstance(weight, FactoredLinear)
    x = torch.randn(2, 5, CFG.hidden_size)
    assert _relative(weight.linear(x), torch.nn.functional.linear(x, weight.merge())) <= 1e-5
    batch = _inputs()
    with torch.no_grad():
        factored = DIT(adapted, **batch)
        merged = DIT(merge_lora(adapted), **batch)
        assert _relative(factored, merged) <= 1e-5
        assert not torch.allclose(factored, DIT(base, **batch))


def test_merge_when_sampling_merges_only_without_grad():
    params = lora(rank=1, merge_when_sampling=True).init({"q": {"weight": torch.ones(2, 2)}}, dsf.random.key(0))
    assert isinstance(materialize(params["q"]["weight"]), FactoredLinear)
    with torch.no_grad():
        assert isinstance(materialize(params["q"]["weight"]), torch.Tensor)


def test_clear_after_load_is_bit_identical(base):
    trained = lora(rank=2, targets="to_q").init(base, dsf.random.key(3))
    loaded = load_lora(load_lora(trained, _random_file(base, 0), name="a"), _random_file(base, 1), scale=0.5, name="b")
    assert sorted(loaded["transformer_blocks"][0]["attn"]["to_q"]["weight"].stages["adapt"].adapters) == ["a", "b", "lora"]
    for original in (base, trained):
        cleared = clear_lora(load_lora(original, _random_file(base, 0)))
        assert dsf.tree.paths(cleared) == dsf.tree.paths(original)
        assert all(a is b for a, b in zip(dsf.tree.tensors(cleared), dsf.tree.tensors(original)))
    assert dsf.tree.paths(clear_lora(loaded, ["a", "b", "lora"])) == dsf.tree.paths(base)


def test_merge_equals_hot(base):
    hot = load_lora(base, _random_file(base, 0), scale=0.7)
    cold = merge_lora(hot)
    assert dsf.tree.paths(cold) == dsf.tree.paths(base)
    batch = _inputs()
    with torch.no_grad():
        assert _relative(DIT(cold, **batch), DIT(hot, **batch)) <= 1e-5


def test_two_hot_loras_add_linearly(base):
    first, second = _random_file(base, 0), _random_file(base, 1)
    both = load_lora(load_lora(base, first, scale=0.5), second, scale=-2.0)
    one = merge_lora(load_lora(base, first, scale=0.5))
    other_delta = dsf.tree.map_with_path(lambda p, w, m: w - m, merge_lora(load_lora(base, second, scale=-2.0)), base)
    by_hand = dsf.tree.map_with_path(lambda p, a, d: a + d, one, other_delta)
    batch = _inputs()
    with torch.no_grad():
        assert _relative(DIT(both, **batch), DIT(by_hand, **batch)) <= 1e-5
        assert _relative(DIT(both, **batch), DIT(one, **batch)) > 1e-3


def test_targets_accept_diffusers_and_bfl_names(base):
    def adapted_paths(**kw):
        params = lora(rank=1, **kw).init(base, dsf.random.key(0))
        return sorted(p.removesuffix("/adapt/adapters/lora/down") for p in dsf.tree.select(params, r"/down$"))

    attn = "transformer_blocks/0/attn/"
    assert adapted_paths(targets="to_q,to_out.0") == [
        "single_transformer_blocks/0/attn/to_q/weight", attn + "to_out/0/weight", attn + "to_q/weight"]
    assert adapted_paths(targets="img_attn.qkv") == [attn + "to_k/weight", attn + "to_q/weight", attn + "to_v/weight"]
    assert adapted_paths(targets=["linear1"]) == [
        f"single_transformer_blocks/0/{m}/weight" for m in ("attn/to_k", "attn/to_q", "attn/to_v", "proj_mlp")]
    assert adapted_paths(where=r"^transformer_blocks/.*/ff/") == [
        "transformer_blocks/0/ff/net/0/proj/weight", "transformer_blocks/0/ff/net/2/weight"]
    assert len(adapted_paths()) == len(_linear_shapes())


def test_targeting_a_non_2d_weight_is_an_error(base):
    with pytest.raises(ValueError, match=r"2-D.*norm_q/weight \(16,\)"):
        lora(rank=1, targets="norm_q").init(base, dsf.random.key(0))
    with pytest.raises(ValueError, match="select no linear weight; linear weights look like"):
        lora(rank=1, targets="no_such_layer").init(base, dsf.random.key(0))
    with pytest.raises(ValueError, match="call init\\(params, key\\)"):
        lora(rank=1).init(base)


def test_another_adapt_stage_is_an_error():
    @stage("adapt")
    class Other(Stage):
        def apply(self, value):
            return value

    params = {"q": {"weight": Weight(torch.ones(2, 2)).with_stage(Other())}}
    with pytest.raises(ValueError, match="two transforms claim the 'adapt' slot"):
        lora(rank=1).init(params, dsf.random.key(0))
    with pytest.raises(ValueError, match="already on this weight"):
        Weight(torch.ones(2, 2)).with_stage(LoraStage({"x": None})).with_stage(LoraStage({"x": None}))


def test_dense_forms_for_functional_call_and_other_ops():
    module = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3))
    apply, params = pure_module(module)
    adapted = _randomize_up(lora(rank=2).init(params, dsf.random.key(0)), 0)
    ids = torch.tensor([[1, 4]])
    merged = merge_lora(adapted)
    assert _relative(apply(adapted, ids), apply(merged, ids)) <= 1e-6
    form = materialize(adapted[0]["weight"])
    assert isinstance(form, FactoredLinear)
    assert torch.equal(ops.embedding(ids, form), torch.nn.functional.embedding(ids, dense(adapted[0]["weight"])))
    assert not torch.equal(dense(adapted[0]["weight"]), params[0]["weight"])


def test_merge_into_cast_storage_and_refusal_of_fp8():
    file = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.full((3, 1), 0.5)}
    stored = Weight(torch.zeros(3, 2, dtype=torch.bfloat16)).with_stage(Cast(torch.float32))
    merged = merge_lora(load_lora({"q": {"weight": stored}}, file))["q"]["weight"]
    assert merged.data.dtype == torch.bfloat16 and merged.slot_names() == ["decode"]
    assert torch.equal(materialize(merged), torch.full((3, 2), 0.5))
    fp8 = Weight(torch.zeros(3, 2).to(torch.float8_e4m3fn)).with_stage(Cast(torch.float32))
    with pytest.raises(ValueError, match="float8_e4m3fn.*requantizing.*Merge before quantizing"):
        merge_lora(load_lora({"q": {"weight": fp8}}, file))


def test_training_step_with_checkpoint_matches(base):
    t = lora(rank=2)
    adapted = _randomize_up(t.init(base, dsf.random.key(0)), 0)
    batch = _inputs()
    plain = dsf.value_and_grad(t(_loss), where=lora_trainable)(adapted, batch)
    checkpointed = dsf.value_and_grad(dsf.chain(t, checkpoint())(_loss), where=lora_trainable)(adapted, batch)
    assert torch.equal(plain[0], checkpointed[0])
    for a, b in zip(dsf.tree.tensors(plain[1]), dsf.tree.tensors(checkpointed[1])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_names_and_save_need_a_choice(base, tmp_path):
    file = _random_file(base, 0)
    params = load_lora(load_lora(base, file), file)
    names = sorted(params["x_embedder"]["weight"].stages["adapt"].adapters)
    assert names == ["loaded", "loaded_2"]
    with pytest.raises(ValueError, match="pass save_lora\\(..., name=\\)"):
        save_lora(params, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="cannot name the LoRA 'loaded'"):
        load_lora(params, file, name="loaded")
    save_lora(params, tmp_path / "x.safetensors", name="loaded_2")
    assert (tmp_path / "x.safetensors").is_file() and not list(tmp_path.glob(".*tmp"))


def test_clear_and_merge_leave_plain_data():
    file = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    hot = load_lora({"q": {"weight": Weight(torch.zeros(3, 2))}}, file)
    for result in (clear_lora(hot), merge_lora(hot)):
        assert isinstance(result["q"]["weight"], torch.Tensor)
    assert torch.equal(merge_lora(hot)["q"]["weight"].data, torch.ones(3, 2))
