"""dsf.training.cache: exact round trips, sharding, batching, atomic writes and clear errors on damaged caches."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

import dsf
from dsf.files.io import ALLOCATOR_ALIGNMENT
from dsf.training.cache import INDEX_NAME, CachedDataset, write_cache
from dsf.training.data import batches


def samples(count: int = 5):
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(4, 2, 2, generator=gen),
            "text_embeds": torch.randn(3, 8, generator=gen).to(torch.bfloat16),
            "ids": torch.arange(i, i + 3),
            "prompt": f"prompt {i}",
            "seed": i,
            "cfg_scale": 1.5,
            "mask": None,
            "flag": i % 2 == 0,
        }
        for i in range(count)
    ]


def test_round_trip_is_exact_in_every_dtype(tmp_path):
    written = samples()
    write_cache(tmp_path / "cache", iter(written))
    dataset = CachedDataset(tmp_path / "cache")
    assert len(dataset) == len(written)
    for original, back in zip(written, (dataset[i] for i in range(len(dataset)))):
        assert sorted(back) == sorted(original)
        for key, value in original.items():
            if isinstance(value, torch.Tensor):
                assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
            else:
                assert back[key] == value and type(back[key]) is type(value), key


def test_shards_hold_at_most_shard_size_bytes(tmp_path):
    per_sample = 4 * 2 * 2 * 4 + 3 * 8 * 2 + 3 * 8  # latents float32, text bf16, ids int64
    index = write_cache(tmp_path / "cache", samples(5), shard_size=2 * per_sample)
    shards = json.loads(index.read_text())["shards"]
    assert len(shards) == 3
    assert [entry["shard"] for entry in json.loads(index.read_text())["samples"]] == [0, 0, 1, 1, 2]
    dataset = CachedDataset(tmp_path / "cache")
    assert torch.equal(dataset[4]["latents"], samples(5)[4]["latents"])


def test_repeat_and_resumable_batches(tmp_path):
    write_cache(tmp_path / "cache", samples(3))
    dataset = CachedDataset(tmp_path / "cache", repeat=2)
    assert len(dataset) == 6 and dataset[5]["seed"] == 2 and dataset[-1]["seed"] == 2
    run = list(islice(batches(dataset, 2, dsf.random.key(0)), 3))
    resumed = list(islice(batches(dataset, 2, dsf.random.key(0), start=run[1][0]), 1))
    assert resumed[0][1]["seed"] == run[2][1]["seed"]
    assert tuple(run[0][1]["latents"].shape) == (2, 4, 2, 2) and len(run[0][1]["prompt"]) == 2
    with pytest.raises(IndexError, match="out of range for a cache of 6 items"):
        dataset[6]


def test_writing_is_atomic_and_refuses_a_used_folder(tmp_path):
    def failing():
        yield samples(1)[0]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_cache(tmp_path / "cache", failing())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        write_cache(tmp_path / "used", samples(1))
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


def test_values_a_cache_cannot_hold_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"sample 1, key 'boxes' is a list"):
        write_cache(tmp_path / "a", [{"x": torch.ones(1)}, {"x": torch.ones(1), "boxes": [1, 2]}])
    with pytest.raises(ValueError, match="keys are non-empty strings without '/'"):
        write_cache(tmp_path / "b", [{"a/b": torch.ones(1)}])
    with pytest.raises(ValueError, match="no samples to cache"):
        write_cache(tmp_path / "c", [])
    assert list(tmp_path.iterdir()) == []


def test_damaged_caches_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        CachedDataset(tmp_path)
    index = write_cache(tmp_path / "cache", samples(2))
    content = json.loads(index.read_text())

    content["shards"] = ["../outside.safetensors"]
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"shard '\.\./outside\.safetensors'.*leaves the dataset folder"):
        CachedDataset(tmp_path / "cache")

    content["shards"] = ["shard-00007.safetensors"]
    index.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match="names the shard shard-00007.safetensors, which is missing"):
        CachedDataset(tmp_path / "cache")

    index.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a dsf cache index"):
        CachedDataset(tmp_path / "cache")
    (tmp_path / "cache" / INDEX_NAME).write_text("{")
    with pytest.raises(ValueError, match="is not valid json"):
        CachedDataset(tmp_path / "cache")


def test_cached_tensors_start_where_torch_allocates_them(tmp_path):
    # read at the file's offsets they would compute other last bits than the tensors that were cached (dsf.files.io.aligned)
    write_cache(tmp_path / "cache", iter(samples()))
    dataset = CachedDataset(tmp_path / "cache")
    offsets = [dataset[i][key].data_ptr() % ALLOCATOR_ALIGNMENT for i in range(len(dataset)) for key in ("latents", "text_embeds")]
    assert offsets == [0] * 2 * len(dataset)


def test_lists_of_tensors_round_trip_in_order(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = [{"latents": torch.randn(2, generator=generator),
                "references": [torch.randn(3, 2, generator=generator) for _ in range(count)]} for count in (1, 3)]
    write_cache(tmp_path / "cache", samples)
    dataset = CachedDataset(tmp_path / "cache")
    for sample, read in zip(samples, (dataset[0], dataset[1])):
        assert torch.equal(read["latents"], sample["latents"])
        assert len(read["references"]) == len(sample["references"])
        assert all(torch.equal(a, b) for a, b in zip(read["references"], sample["references"]))
