"""shard × offload (× fp8) as a CUDA job would run them, on 2 gloo ranks (issue 19, item 7).

No GPU here: a mesh whose device type reads ``meta`` stands in for an NCCL mesh on the GPUs, ``offload("meta")``
for a fetch to the GPU, mocked page-locking (``_register``) and a ``torch.empty_like`` that logs ``pin_memory``
for pinned host memory, and a ``world()`` whose device is ``meta`` for the GPU an all-reduce must run on. What
each rank saw is written to ``rank{r}.pt`` and compared here with one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsf
from dsf.training import distributed
from dsf.transforms import fp8, offload, shard
from dsf.transforms.fp8 import FP8, quantize
from dsf.transforms.offload import count_transfers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

WORLD_SIZE = 2
ROWS = (1, 3, 4, 5)  # 1 row: rank 1 holds none; 3 and 5: uneven


def weights(rows: int = 5) -> dict:
    """Two blocks of an uneven first dimension and a head, the same on every rank."""
    draw = lambda i, shape: dsf.random.normal(dsf.random.key(i), shape)
    return {"blocks": [{"w": draw(i, (rows, rows)), "b": draw(10 + i, (rows,))} for i in range(2)], "head": draw(20, (3, rows))}


def test_rows_of_rank_split_like_torch_shard_0():
    from torch.distributed.tensor import Shard

    for rows in range(10):
        for ranks in range(1, 6):
            tensor = torch.arange(rows * 2).reshape(rows, 2)
            expected, _ = Shard(0)._split_tensor(tensor, ranks, with_padding=False)
            got = [distributed.rows_of_rank(tensor, ranks, rank) for rank in range(ranks)]
            assert [g.tolist() for g in got] == [e.tolist() for e in expected], (rows, ranks)


def test_quantize_scales_a_shard_by_the_whole_tensors_amax_per_tensor_only():
    shard_rows = weights(4)["blocks"][0]["w"][:2]
    whole = torch.cat([shard_rows, 4 * shard_rows])  # its largest magnitude in the other rank's rows
    data, scale = quantize(shard_rows, amax=whole.abs().max())
    expected_data, expected_scale = quantize(whole)
    assert torch.equal(scale, expected_scale) and torch.equal(data.view(torch.uint8), expected_data[:2].view(torch.uint8))
    assert not torch.equal(quantize(shard_rows)[1], expected_scale)  # its own amax would scale it otherwise
    with pytest.raises(ValueError, match="amax is the largest magnitude of the whole tensor: it scales granularity='tensor'"):
        quantize(shard_rows, "channel", amax=whole.abs().max())


# ----------------------------------------------------------------------------- on every rank


@contextlib.contextmanager
def patched(target, name, value):
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def like_distribute_tensor() -> dict:
    """Each rank's shard from distribute() against torch's distribute_tensor, for even, uneven and empty shards."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = distributed.mesh()
    seen = {}
    for shape in [(rows, 3) for rows in ROWS] + [()]:
        whole = dsf.random.normal(dsf.random.key(len(shape) + sum(shape)), shape)
        ours = distributed.distribute(whole, mesh)
        torchs = distribute_tensor(whole, mesh, [Shard(0)] if shape else [Replicate()], src_data_rank=None)
        seen[shape] = {
            "same local": torch.equal(ours.to_local(), torchs.to_local()),
            "local rows": tuple(ours.to_local().shape),
            "same layout": (ours.placements, ours.shape, ours.stride()) == (torchs.placements, torchs.shape, torchs.stride()),
            "gathers whole": torch.equal(distributed.gathered(ours), whole),
        }
    return seen


def offload_then_shard_on_a_gpu_mesh() -> dict:
    """offload("cuda") then shard() with the mesh's device type standing in for cuda: where each rank's rows land."""
    offload_module = sys.modules["dsf.transforms.offload"]
    mesh = distributed.mesh()
    asked = []
    real_empty_like = torch.empty_like

    def logged_empty_like(tensor, *args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real_empty_like(tensor, *args, **kwargs)

    stack = dsf.chain(offload("cuda", where="^blocks/"), shard())
    with (patched(offload_module, "_register", lambda pointer, size: True),
          patched(offload_module, "_unregister", lambda pointer: None),
          patched(mesh, "_device_type", "meta"),  # stands in for "cuda": where distribute_tensor moves the shards
          patched(distributed, "mesh", lambda: mesh),
          patched(torch.Tensor, "is_pinned", lambda self, *a: self.device.type == "cpu"),  # the host buffers are pinned
          patched(torch, "empty_like", logged_empty_like)):
        params = stack.init(weights())
        mesh_device = params["blocks"][0]["w"].data.device_mesh.device_type
    w = params["blocks"][0]["w"]
    local = w.data.to_local()
    return {
        "block devices": sorted({leaf.data.to_local().device.type for b in params["blocks"] for leaf in b.values()}),
        "head device": params["head"].data.to_local().device.type,
        "slots": w.slot_names(),
        "mesh device": mesh_device,
        "local rows": local.shape[0],
        "own storage": local.untyped_storage().nbytes() == local.nbytes,  # a copy of its rows, not a view of the whole block
        "pinned asked": asked,  # per distribute: 4 block tensors (pinned storage), then the head (to the GPU)
    }


def shard_then_offload_fetches_before_gathering() -> dict:
    """shard() then offload("meta"): the gather must see the local shards on the fetch's device, on the same mesh."""
    gathered_locals = []
    real = distributed.gathered

    def watched(value):
        if distributed.is_sharded(value):
            gathered_locals.append((value.to_local().device.type, value.device_mesh is mesh))
            return torch.zeros(value.shape, dtype=value.dtype, device=value.to_local().device)
        return real(value)

    stack = dsf.chain(shard(), offload("meta"))
    params = stack.init(weights())
    mesh = params["head"].data.device_mesh
    f = lambda p, x: dsf.run_blocks(lambda b, h: h @ b["w"] + b["b"], p["blocks"], x) @ dsf.materialize(p["head"]).T
    with patched(distributed, "gathered", watched), count_transfers() as moved:
        out = stack(f)(params, torch.ones(2, 5, device="meta"))
    return {
        "stored": sorted({(leaf.data.to_local().device.type, leaf.data.device_mesh is mesh)
                          for leaf in [*params["blocks"][0].values(), *params["blocks"][1].values(), params["head"]]}),
        "gathered": sorted(set(gathered_locals)),
        "gathers": len(gathered_locals),
        "out": (out.device.type, tuple(out.shape)),
        "moved bytes": moved.bytes,
        "local bytes": sum(t.nbytes for t in dsf.tree.tensors(distributed.local_shards(params))),
    }


def shards_pinned_into_the_block_buffer() -> dict:
    """shard() then offload("cuda") with mocked page-locking: each block's local shards are views of one buffer."""
    offload_module = sys.modules["dsf.transforms.offload"]
    plain = weights()
    sharded = shard().init(plain)
    with patched(offload_module, "_register", lambda pointer, size: True), \
         patched(offload_module, "_unregister", lambda pointer: None):
        stored = offload("cuda").init(sharded)
        seen = {
            "buffers per block": [len({w.data.to_local().untyped_storage().data_ptr() for w in block.values()})
                                  for block in stored["blocks"]],
            "kinds": sorted({type(w.data).__name__ for block in stored["blocks"] for w in block.values()}),
            "same layout": all(
                (w.data.device_mesh, w.data.placements, w.data.shape, w.data.stride())
                == (s.data.device_mesh, s.data.placements, s.data.shape, s.data.stride())
                for block, before in zip(stored["blocks"], sharded["blocks"]) for w, s in zip(block.values(), before.values())
            ),
            "gather whole": all(torch.equal(distributed.gathered(w.data), plain["blocks"][i][name])
                                for i, block in enumerate(stored["blocks"]) for name, w in block.items()),
        }
        del stored
    return seen


def quantized_over_shards() -> dict:
    """fp8 over shards in the orders that leave CPU shards on a GPU job, gathered back whole, per granularity."""
    offload_module = sys.modules["dsf.transforms.offload"]
    seen = {}
    with patched(offload_module, "_register", lambda pointer, size: True), \
         patched(offload_module, "_unregister", lambda pointer: None):
        for rows in ROWS:
            for granularity in ("tensor", "channel"):
                quantized = fp8(granularity=granularity, compute_dtype=torch.float32)
                for order in ("shard, fp8", "shard, offload, fp8", "offload, shard, fp8"):
                    parts = {"shard": shard(), "offload": offload("cuda"), "fp8": quantized}
                    params = dsf.chain(*(parts[name] for name in order.split(", "))).init(weights(rows))
                    w = params["blocks"][1]["w"]
                    scale = w.stages["decode"].scale
                    seen[rows, granularity, order] = {
                        "data": distributed.gathered(w.data), "local rows": w.data.to_local().shape[0],
                        "scale": distributed.gathered(scale), "scale placements": [str(p) for p in scale.placements],
                    }
    return seen


def all_reduced_on_the_world_device() -> dict:
    """The one collective of a per-tensor quantization over CPU shards, with the world's device reading meta (a GPU)."""
    class Issued(Exception):
        pass

    issued = []

    def all_reduce(tensor, op=None, group=None, **kwargs):
        issued.append((tensor.device.type, tuple(tensor.shape), op == dist.ReduceOp.MAX))
        raise Issued

    sharded = shard().init(weights())
    on_gpu = distributed.World(distributed.world().rank, WORLD_SIZE, distributed.world().rank, torch.device("meta"))
    with patched(distributed, "world", lambda: on_gpu), patched(dist, "all_reduce", all_reduce):
        with contextlib.suppress(Issued):
            fp8().init(sharded)
    return {"issued": issued, "local device": sharded["blocks"][0]["w"].data.to_local().device.type}


CHECKS = (like_distribute_tensor, offload_then_shard_on_a_gpu_mesh, shard_then_offload_fetches_before_gathering,
          shards_pinned_into_the_block_buffer, quantized_over_shards, all_reduced_on_the_world_device)


def _outcome(check):
    """What ``check`` saw, or the error it raised (each check is reported by its own test)."""
    try:
        return check()
    except Exception as error:
        return Failed(f"{type(error).__name__}: {error}")


class Failed(str):
    pass


def _rank_main(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(backend="gloo", timeout=datetime.timedelta(seconds=60))
    try:
        torch.save({check.__name__: _outcome(check) for check in CHECKS}, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("shard_offload")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(folder)), nprocs=WORLD_SIZE)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def saw(ranks: list[dict], check: str) -> list:
    """What each rank saw in ``check`` (a check that raised fails here, with its error)."""
    seen = [rank[check] for rank in ranks]
    failed = [f"rank {r}: {s}" for r, s in enumerate(seen) if isinstance(s, Failed)]
    assert not failed, f"{check} raised on " + "; ".join(failed)
    return seen


# ----------------------------------------------------------------------------- what the ranks saw


def test_distribute_keeps_the_rows_distribute_tensor_keeps(ranks):
    seen = saw(ranks, "like_distribute_tensor")
    for rank, checks in enumerate(seen):
        assert all(c["same local"] and c["same layout"] and c["gathers whole"] for c in checks.values()), rank
    assert [checks[(1, 3)]["local rows"] for checks in seen] == [(1, 3), (0, 3)]
    assert [checks[(5, 3)]["local rows"] for checks in seen] == [(3, 3), (2, 3)]


def test_offload_then_shard_keeps_the_rows_in_pinned_host_memory_on_a_gpu_mesh(ranks):
    for rank, stored in enumerate(saw(ranks, "offload_then_shard_on_a_gpu_mesh")):
        assert stored["mesh device"] == "meta" and stored["slots"] == ["fetch", "gather"]
        assert stored["block devices"] == ["cpu"]  # distribute_tensor moved them to the mesh's device
        assert stored["head device"] == "meta"  # not offloaded: on the GPU, as before
        assert stored["local rows"] == (3, 2)[rank] and stored["own storage"]  # 1/n of the host memory
        assert stored["pinned asked"] == [True] * 4 + [False]


def test_shard_then_offload_fetches_the_local_shards_before_the_gather(ranks):
    runs = saw(ranks, "shard_then_offload_fetches_before_gathering")
    for run in runs:
        assert run["stored"] == [("cpu", True)]  # storage in host memory, the mesh kept
        assert run["gathered"] == [("meta", True)] and run["gathers"] == 5  # every local shard fetched first
        assert run["out"] == ("meta", (2, 3))
        assert run["moved bytes"] == run["local bytes"]  # each rank moves its shards, not the whole tensors
    assert [run["local bytes"] for run in runs] == [
        4 * (3 * 5 + 3) * 2 + 4 * 2 * 5, 4 * (2 * 5 + 2) * 2 + 4 * 1 * 5]


def test_dtensor_shards_are_pinned_as_views_of_the_block_buffer(ranks):
    for pinned in saw(ranks, "shards_pinned_into_the_block_buffer"):
        assert pinned["buffers per block"] == [1, 1] and pinned["kinds"] == ["DTensor"]
        assert pinned["same layout"] and pinned["gather whole"]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_over_shards_gives_the_bytes_and_scale_of_the_whole_tensor(ranks, granularity):
    quantized = saw(ranks, "quantized_over_shards")
    for rows in ROWS:
        data, scale = quantize(weights(rows)["blocks"][1]["w"], granularity)
        for order in ("shard, fp8", "shard, offload, fp8", "offload, shard, fp8"):
            for rank, seen in enumerate(quantized):
                got = seen[rows, granularity, order]
                assert got["data"].dtype == FP8 and torch.equal(got["data"].view(torch.uint8), data.view(torch.uint8))
                assert torch.equal(got["scale"], scale), (rows, order, rank)
                assert got["scale placements"] == (["R"] if granularity == "tensor" else ["S(0)"])
            assert [seen[rows, granularity, order]["local rows"] for seen in quantized] == [
                -(-rows // 2), rows - -(-rows // 2)]


def test_the_amax_of_cpu_shards_is_all_reduced_on_the_world_device(ranks):
    for reduced in saw(ranks, "all_reduced_on_the_world_device"):
        assert reduced["local device"] == "cpu"
        assert reduced["issued"] == [("meta", (), True)]  # one element, MAX, on the GPU: NCCL reduces GPU memory only
