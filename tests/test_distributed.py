"""dsf.training.distributed: the single-process world, rank shares of a batch stream, and data parallelism on 2 gloo ranks.

The multi-rank test spawns 2 processes (tests/distributed_worker.py) that join a job as torchrun's
would; it is skipped where torch.distributed is unavailable.
"""

import csv
import os
from itertools import islice

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
import dsf
from dsf.training import distributed
from dsf.training.data import batches
from dsf.transforms import lora_trainable
from updates import assert_same_updates

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")


def test_a_process_outside_torchrun_is_a_world_of_one(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    world = distributed.init()
    assert (world.rank, world.size) == (0, 1) and distributed.is_main() and not dist.is_initialized()


def test_half_a_torchrun_environment_is_refused(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: launch with torchrun"):
        distributed.init()


def test_ranks_share_a_stream_and_resume_where_the_group_ends():
    def stream():
        return ((position, f"batch {position - 1}") for position in range(1, 8))

    shares = [list(distributed.rank_batches(stream(), distributed.World(rank=r, size=3))) for r in range(3)]
    assert [batch for share in shares for _, batch in share] == [f"batch {i}" for i in (0, 3, 1, 4, 2, 5)]
    assert [[position for position, _ in share] for share in shares] == [[3, 6]] * 3
    assert list(distributed.rank_batches(stream(), distributed.World())) == list(stream())


class RecordingDataset(list):
    """A list of items that records which indices were loaded."""

    def __init__(self, items):
        super().__init__(items)
        self.loaded = []

    def __getitem__(self, index):
        self.loaded.append(index)
        return super().__getitem__(index)


def test_a_rank_loads_only_its_own_batches_of_a_dataset():
    items = [{"x": torch.tensor(i)} for i in range(6)]
    everything = [(p, b["x"].tolist()) for p, b in islice(batches(items, 2, dsf.random.key(0)), 4)]
    dataset = RecordingDataset(items)
    share = islice(distributed.rank_batches(batches(dataset, 2, dsf.random.key(0)), distributed.World(rank=1, size=2)), 2)
    assert [(p, b["x"].tolist()) for p, b in share] == [everything[1], everything[3]]
    assert sorted(dataset.loaded) == sorted(everything[1][1] + everything[3][1])  # item i holds x = i


def test_micro_batches_are_numbered_across_ranks():
    indices = sorted(distributed.World(rank=r, size=2).micro_batch_index(m) for r in range(2) for m in range(3))
    assert indices == list(range(6))


def test_two_ranks_equal_one_rank_accumulating_two(tmp_path):
    ranks = worker.launch("data_parallel_lora", tmp_path)
    losses = []
    single = worker.train(worker.flux_loss, worker.lora_params(), worker.flux_data,
                          worker.train_config(gradient_accumulation_steps=2), key=worker.TRAIN_KEY, where=lora_trainable,
                          callback=lambda step, params, loss: losses.append(loss))
    single = dsf.tree.select(single, lora_trainable)
    initial = dsf.tree.select(worker.lora_params(), lora_trainable)
    assert max((single[path] - initial[path]).abs().max() for path in single) > 1e-3
    for rank in ranks:
        assert rank["losses"] == pytest.approx(losses, rel=1e-6)
        assert sorted(rank["lora"]) == sorted(single)
        assert_same_updates(rank["lora"], single, initial)
    assert all(torch.equal(ranks[0]["lora"][path], ranks[1]["lora"][path]) for path in single)
    with open(tmp_path / "run" / "log.csv", newline="") as file:
        assert [int(row["step"]) for row in csv.DictReader(file)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "run")) == ["log.csv", "step-3.safetensors"]
