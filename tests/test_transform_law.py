"""The transform law for a transform written outside dsf: a test-only int8 storage transform, written by the guide
in dsf.weight, composes with every transform of dsf in every chain order (the same numbers, the same bytes held by
the params tree) or is refused at init with the guide's error where the pair is meaningless (two storages of one
weight). Shard runs on two gloo ranks, where it splits what it stores, and composes there with offload, fp8 and
lora in all 24 orders."""

from __future__ import annotations

import itertools
import os

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsf
from dsf import ops
from dsf.transforms import checkpoint, compile, fp8, lora, lora_trainable, offload, shard
from dsf.tree import NAMESPACE
from dsf.weight import Stage, Weight, as_weight, check_slot_free, is_float_weight, map_weights, materialize, stage


# ----------------------------------------------------------------------------- the outsider's transform


@stage("decode")
class Int8(Stage):
    scale: torch.Tensor
    dtype: torch.dtype = optree.dataclasses.field(pytree_node=False)

    def apply(self, value):
        return (value.to(torch.float32) * self.scale).to(self.dtype)


def int8(where=None) -> dsf.Transform:
    keep = dsf.tree.as_predicate(where)

    def selected(path, param):
        return keep(path, param) and is_float_weight(param) and len(param.shape) >= 2

    def stored(path, param):
        check_slot_free("int8", path, param, "decode")
        record = as_weight(param)
        scale = record.data.detach().abs().amax().float().clamp(min=1e-12) / 127
        data = (record.data.detach().float() / scale).round().to(torch.int8)
        data = data.pin_memory() if type(data) is torch.Tensor and record.data.is_pinned() else data
        return Weight(data, record.stages).with_stage(Int8(scale, record.data.dtype))

    return dsf.Transform("int8", init_fn=lambda params, key=None: map_weights(stored, params, selected))


# ----------------------------------------------------------------------------- a tiny model


def tiny_params() -> dict:
    draw = lambda i, shape: dsf.random.normal(dsf.random.key(i), shape)
    blocks = [{"q": {"weight": draw(2 * i, (8, 8))}, "mlp": {"weight": draw(2 * i + 1, (8, 8))}, "norm": {"weight": torch.ones(8)}}
              for i in range(2)]
    return {"blocks": blocks, "head": {"weight": draw(9, (4, 8))}, "positions": torch.arange(8).reshape(2, 4)}


def model(params, x):
    def block(p, h):
        return h + torch.tanh(ops.linear(h, p["q"]["weight"])) * ops.linear(h, p["mlp"]["weight"]) * p["norm"]["weight"]

    h = dsf.run_blocks(block, params["blocks"], x + materialize(params["positions"]).float().sum())
    return ops.linear(h, params["head"]["weight"])


def with_trained_lora(params):
    """Non-zero LoRA up factors, as after training, the same in every order (drawn from the path)."""
    def trained(path, leaf):
        return dsf.random.normal(dsf.random.key(len(path)), leaf.shape) if path.endswith("/up") else leaf

    return dsf.tree.map_with_path(trained, params)


X = dsf.random.normal(dsf.random.key(20), (3, 8))


def bytes_held(tree) -> int:
    """Bytes of every tensor in the tree (local shards for DTensors), stages included."""
    leaves = optree.tree_leaves(tree, namespace=NAMESPACE)
    local = [leaf.to_local() if hasattr(leaf, "to_local") else leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return sum(leaf.numel() * leaf.element_size() for leaf in local)


def outcome(transforms) -> dict:
    """Output, loss gradients of the LoRA factors (if any) and bytes held of ``chain(*transforms)`` on the tiny model."""
    stack = dsf.chain(*transforms)
    params = with_trained_lora(stack.init(tiny_params(), dsf.random.key(1)))
    out = stack(model)(params, X)
    grads = {}
    if dsf.tree.select(params, lora_trainable):
        _, found = dsf.value_and_grad(lambda p, x: stack(model)(p, x).square().sum(), where=lora_trainable)(params, X)
        grads = dsf.tree.select(found, None)
    return {"out": out, "grads": grads, "bytes": bytes_held(params)}


def assert_same(a: dict, b: dict, order) -> None:
    assert torch.equal(a["out"], b["out"]), order
    assert sorted(a["grads"]) == sorted(b["grads"]) and all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"]), order
    assert a["bytes"] == b["bytes"], order


# ----------------------------------------------------------------------------- the law


def composable():
    return {"int8": int8(where="^blocks/"), "lora": lora(rank=2, targets="q,mlp"), "offload": offload("cpu"),
            "checkpoint": checkpoint(), "shard": shard()}


def test_int8_stores_what_its_doctest_says_and_only_the_float_matrices():
    stored = int8().init(tiny_params())
    assert stored["blocks"][0]["q"]["weight"].data.dtype == torch.int8
    assert isinstance(stored["blocks"][0]["norm"]["weight"], torch.Tensor)  # 1-D: not a matrix
    assert stored["positions"].dtype == torch.int64 and not isinstance(stored["positions"], Weight)  # no weight


def test_int8_composes_with_lora_offload_checkpoint_and_shard_in_all_120_orders():
    transforms = composable()
    reference = outcome(transforms.values())
    for order in itertools.permutations(transforms):
        assert_same(outcome([transforms[name] for name in order]), reference, order)
    # the orders all stored int8 and trained a LoRA: the reference is not the plain model
    assert reference["grads"] and reference["bytes"] < bytes_held(lora(rank=2, targets="q,mlp").init(tiny_params(),
                                                                                                      dsf.random.key(1)))
    by_hand = {**tiny_params(), "blocks": materialize_tree_of(int8(where="^blocks/").init(tiny_params()))["blocks"]}
    assert torch.allclose(outcome([int8(where="^blocks/")])["out"], model(by_hand, X))


def materialize_tree_of(params):
    return dsf.tree.map_with_path(lambda _, p: materialize(p), params, is_leaf=lambda x: isinstance(x, Weight))


def test_int8_composes_with_compile_and_with_fp8_on_other_weights_in_both_orders():
    for others in ([compile(backend="eager")], [fp8(where="^head/", compute_dtype=torch.float32)]):
        first, second = outcome([int8(where="^blocks/"), *others]), outcome([*others, int8(where="^blocks/")])
        assert_same(first, second, others)


def test_int8_and_fp8_on_one_weight_are_refused_at_init_in_both_orders():
    with pytest.raises(ValueError, match="fp8 cannot store 'blocks/0/mlp/weight': its decode slot already holds Int8 "
                                         r"\(int8 storage\) from another transform"):
        dsf.chain(int8(), fp8()).init(tiny_params())
    with pytest.raises(ValueError, match="int8 cannot store 'blocks/0/mlp/weight': its decode slot already holds "
                                         r"Dequantize \(float8_e4m3fn storage\) from another transform"):
        dsf.chain(fp8(), int8()).init(tiny_params())


# ----------------------------------------------------------------------------- shard on two ranks

WORLD_SIZE = 2


def _sharded_orders(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dsf.training.distributed.init(backend="gloo")
    try:
        seen = {}
        for name, transforms in {"int8, shard": [int8(), shard()], "shard, int8": [shard(), int8()]}.items():
            stack = dsf.chain(*transforms)
            params = stack.init(tiny_params(), dsf.random.key(1))
            kinds = sorted({type(params["blocks"][0]["q"]["weight"].data).__name__})
            seen[name] = {"out": stack(model)(params, X), "bytes": bytes_held(params), "kinds": kinds,
                          "dtype": params["blocks"][0]["q"]["weight"].data.dtype}
        stored = {"offload": offload("cpu"), "fp8": fp8(where="^blocks/", compute_dtype=torch.float32),
                  "lora": lora(rank=2, targets="q,mlp")}
        seen["unsharded"] = outcome(stored.values())
        seen["offload, shard, fp8, lora"] = {order: outcome([{**stored, "shard": shard()}[name] for name in order])
                                             for order in itertools.permutations([*stored, "shard"])}
        torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down (a rank left alone mid-teardown can abort)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    import socket

    folder = tmp_path_factory.mktemp("sharded_orders")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_orders, args=(port, str(folder)), nprocs=WORLD_SIZE)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_int8_and_shard_split_the_same_int8_bytes_in_both_orders(two_ranks):
    whole = bytes_held(int8().init(tiny_params()))
    single = model(materialize_tree_of(int8().init(tiny_params())), X)
    for seen in two_ranks:
        first, second = seen["int8, shard"], seen["shard, int8"]
        assert first["kinds"] == second["kinds"] == ["DTensor"] and first["dtype"] == second["dtype"] == torch.int8
        assert first["bytes"] == second["bytes"] < whole
        assert torch.equal(first["out"], second["out"]) and torch.equal(first["out"], single)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_offload_shard_fp8_and_lora_compose_in_all_24_orders_on_two_ranks(two_ranks):
    for seen in two_ranks:
        orders = seen["offload, shard, fp8, lora"]
        assert len(orders) == 24 and len({outcome["bytes"] for outcome in orders.values()}) == 1
        assert next(iter(orders.values()))["bytes"] < seen["unsharded"]["bytes"] and seen["unsharded"]["grads"]
        for order, outcome_of_order in orders.items():  # on each rank the same output and LoRA gradients as without shard
            assert_same({**outcome_of_order, "bytes": None}, {**seen["unsharded"], "bytes": None}, order)
