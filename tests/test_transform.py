"""Transform laws: chain equals nesting, order does not matter, identities are exact; hooks are scoped."""

import itertools

import pytest
import torch

import dsf
from dsf.transform import BlockHook, Transform, active_hooks
from dsf.transforms import checkpoint
from dsf.weight import Cast, Stage, Weight, map_weights, materialize, stage


def block(p, h):
    return torch.tanh(h @ p["w"] + p["b"])


def loss_fn(params, x):
    return dsf.run_blocks(block, params["blocks"], x).square().mean()


def make_params(n=3, dim=4):
    keys = dsf.random.split(dsf.random.key(0), n)
    return {"blocks": [{"w": dsf.random.normal(k, (dim, dim)) * 0.5, "b": torch.zeros(dim)} for k in keys]}


def recording_transform(name, log):
    """A transform with a block hook that records when it runs, and an init drawing from its key."""

    def wrap(call, site):
        def run(p, carry, *a, **kw):
            log.append((name, site.index))
            return call(p, carry, *a, **kw)

        return run

    def init(params, key):
        noise = dsf.random.normal(key, (1,)).item() if key is not None else 0.0
        return {**params, f"seen_{name}": torch.tensor([noise])}

    return Transform(name=name, init_fn=init, hooks=(BlockHook(rank=50, wrap=wrap, name=name),))


X = torch.randn(2, 4)


def test_identity_chain_equals_plain_function_exactly():
    params = make_params()
    assert torch.equal(dsf.chain()(loss_fn)(params, X), loss_fn(params, X))


def test_chain_equals_applying_both_by_hand():
    log_chain, log_nested = [], []
    a, b = recording_transform("a", log_chain), recording_transform("b", log_chain)
    a2, b2 = recording_transform("a", log_nested), recording_transform("b", log_nested)
    params = make_params()
    out_chain = dsf.chain(a, b)(loss_fn)(params, X)
    out_nested = a2(b2(loss_fn))(params, X)
    assert torch.equal(out_chain, out_nested)
    assert log_chain == log_nested and len(log_chain) == 6


def test_chain_order_changes_neither_init_nor_result():
    base = make_params()
    results = []
    for order in itertools.permutations(["a", "b", "c"]):
        log = []
        t = dsf.chain(*(recording_transform(n, log) for n in order), checkpoint())
        params = t.init(base, dsf.random.key(7))
        value, grads = dsf.value_and_grad(t(loss_fn), where=r"^blocks/")(params, X)
        results.append((params["seen_a"], params["seen_b"], params["seen_c"], value, grads["blocks"][0]["w"]))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_nested_chains_flatten():
    log = []
    a, b, c = (recording_transform(n, log) for n in "abc")
    p1 = dsf.chain(a, dsf.chain(b, c)).init({}, dsf.random.key(1))
    p2 = dsf.chain(a, b, c).init({}, dsf.random.key(1))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_single_transform_init_equals_its_chain_init():
    t = recording_transform("a", [])
    assert torch.equal(t.init({}, dsf.random.key(3))["seen_a"], dsf.chain(t).init({}, dsf.random.key(3))["seen_a"])


def test_hooks_are_scoped_to_the_transformed_call():
    log = []
    t = recording_transform("a", log)
    params = make_params()
    t(loss_fn)(params, X)
    assert active_hooks() == ()
    loss_fn(params, X)
    assert len(log) == 3


def test_hooks_run_by_rank_whatever_the_chain_order():
    order = []

    def hook(rank):
        def wrap(call, site):
            def run(*a, **kw):
                order.append(rank)
                return call(*a, **kw)

            return run

        return Transform(name=f"r{rank}", hooks=(BlockHook(rank=rank, wrap=wrap),))

    dsf.chain(hook(30), hook(5), hook(12))(loss_fn)(make_params(n=1), X)
    assert order == [5, 12, 30]


@stage("decode")
class Negate(Stage):
    def apply(self, value):
        return -value


def test_two_transforms_claiming_one_slot_fail_at_init():
    def claim(s):
        return Transform(name=type(s).__name__, init_fn=lambda p, k: map_weights(lambda _, w: Weight(w).with_stage(s) if not isinstance(w, Weight) else w.with_stage(s), p))

    t = dsf.chain(claim(Cast(torch.float32)), claim(Negate()))
    with pytest.raises(ValueError, match="two transforms claim the 'decode' slot"):
        t.init({"w": torch.ones(2)}, None)


def test_materialize_runs_record_phases_before_value_phases():
    @stage("fetch")
    class Double(Stage):
        def apply(self, record):
            return Weight(record.data * 2, record.stages).without_stage("fetch")

    w = Weight(torch.ones(1)).with_stage(Negate()).with_stage(Double())
    assert materialize(w).tolist() == [-2.0]
