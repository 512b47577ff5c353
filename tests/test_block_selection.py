"""Block hooks select blocks by path: ``checkpoint(blocks=...)`` recomputes only the selected blocks."""

import pytest
import torch

import dsf
from dsf.transform import BlockHook, Transform
from dsf.transforms import checkpoint
from dsf.weight import Cast, Weight, count_materializations


def _block(p, h):
    return torch.tanh(h @ p["w"])


def _record(w):
    """A weight stored in bf16 and decoded at use: each use is one materialization."""
    return Weight(w.to(torch.bfloat16)).with_stage(Cast(torch.float32))


def make_params():
    keys = dsf.random.split(dsf.random.key(0), 5)
    w = [_record(dsf.random.normal(k, (4, 4)) * 0.5) for k in keys]
    return {"transformer_blocks": [{"w": w[0]}, {"w": w[1]}], "single_transformer_blocks": [{"w": w[i]} for i in (2, 3, 4)]}


def model(params, x):
    x = dsf.run_blocks(_block, params["transformer_blocks"], x)
    return dsf.run_blocks(_block, params["single_transformer_blocks"], x).square().sum()


def pipeline(params, x):
    return model(params["transformer"], x)


X = torch.randn(2, 4)


def materializations_with_gradients(f, params):
    with count_materializations() as counter:
        value, grads = dsf.value_and_grad(f)(params, X)
    return counter[0], value, grads


def test_checkpoint_recomputes_only_the_selected_blocks():
    params = make_params()
    plain, value, grads = materializations_with_gradients(model, params)
    assert plain == 5
    only_single, value_single, grads_single = materializations_with_gradients(
        checkpoint(blocks="single_transformer_blocks")(model), params)
    every, value_every, _ = materializations_with_gradients(checkpoint()(model), params)
    assert (only_single, every) == (5 + 3, 5 + 5)
    assert torch.equal(value_single, value) and torch.equal(value_every, value)
    assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(grads_single), dsf.tree.tensors(grads)))


def paths_seen(pattern, f, params):
    seen = []

    def wrap(call, site):
        seen.append(site.path)
        return call

    dsf.chain(Transform("log", hooks=(BlockHook(rank=5, wrap=wrap, name="log", blocks=pattern),)))(f)(params, X)
    return seen


def test_patterns_match_block_paths_inside_the_params_of_the_call():
    params = make_params()
    assert paths_seen("single_transformer_blocks", model, params) == [f"single_transformer_blocks/{i}" for i in range(3)]
    assert paths_seen("^transformer_blocks/1$", model, params) == ["transformer_blocks/1"]
    assert paths_seen(r"(^|/)transformer_blocks/", pipeline, {"transformer": params}) == [
        "transformer/transformer_blocks/0", "transformer/transformer_blocks/1"]
    assert len(paths_seen(None, model, params)) == 5


def test_a_block_list_outside_the_params_is_an_error_naming_the_fix():
    def sliced(params, x):
        return dsf.run_blocks(_block, params["transformer_blocks"][:1], x).sum()

    with pytest.raises(ValueError, match=r"checkpoint\(blocks='transformer'\) cannot tell.*not a slice or a copy"):
        dsf.grad(checkpoint(blocks="transformer")(sliced))(make_params(), X)
    assert dsf.grad(checkpoint()(sliced))(make_params(), X)["transformer_blocks"][0]["w"] is not None
