"""dsf.files.io: safetensors sources (file, sharded folder, shard list, dict), dtype cast while reading, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dsf.files.disk import lazy_load
from dsf.files.io import ALLOCATOR_ALIGNMENT, load_state_dict, read_json, safetensors_files


@pytest.fixture
def sharded(tmp_path):
    """A folder with two shards, an index naming them, and a stray file the index does not name."""
    first = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    second = {"b.weight": torch.randn(2, 3, dtype=torch.float64), "b.steps": torch.arange(4)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    save_file({"stray": torch.zeros(1)}, tmp_path / "other.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path, first | second


def test_folder_with_index_reads_the_named_shards(sharded):
    folder, expected = sharded
    state = load_state_dict(folder)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_folder_without_index_reads_every_shard(sharded):
    folder, expected = sharded
    (folder / "model.safetensors.index.json").unlink()
    assert set(load_state_dict(folder)) == set(expected) | {"stray"}


def test_list_of_shards(sharded):
    folder, expected = sharded
    files = sorted(folder.glob("model-*.safetensors"))
    assert [p.name for p in safetensors_files(files)] == [p.name for p in files]
    state = load_state_dict([str(f) for f in files])
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_dtype_cast_while_loading_keeps_integers(sharded):
    folder, expected = sharded
    state = load_state_dict(folder, dtype=torch.bfloat16)
    assert state["a.weight"].dtype == state["b.weight"].dtype == torch.bfloat16
    assert torch.equal(state["b.weight"], expected["b.weight"].to(torch.bfloat16))
    assert state["b.steps"].dtype == torch.int64


def test_dict_source_is_cast_tensor_by_tensor():
    state = load_state_dict({"w": torch.ones(2), "n": torch.ones(2, dtype=torch.int32)}, dtype=torch.float16)
    assert (state["w"].dtype, state["n"].dtype) == (torch.float16, torch.int32)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file: .*absent.safetensors"):
        load_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(ValueError, match=rf"refusing to load .*model\{suffix}.*convert it to safetensors"):
        load_state_dict(path)


def test_folder_of_pickles_says_to_convert(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files in folder .*pytorch_model.bin.*convert"):
        load_state_dict(tmp_path)


def test_duplicate_keys_across_shards(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"'w' appears in two shards: .*a.safetensors and .*b.safetensors"):
        load_state_dict(tmp_path)


def test_index_naming_a_missing_shard(sharded):
    folder, _ = sharded
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_state_dict(folder)


def test_corrupt_safetensors_is_named(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        load_state_dict(path)


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_json(tmp_path / "config.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_loaded_cpu_tensors_start_where_torch_allocates_them(tmp_path):
    # safetensors hands out tensors at any 4-byte offset; BLAS rounds differently at another alignment, so a loaded
    # weight and a copy of it (e.g. gathered from shards) would compute different last bits
    save_file({f"w{i}": torch.randn(3 + i, 5) for i in range(6)}, tmp_path / "model.safetensors")
    loaded = load_state_dict(tmp_path / "model.safetensors", None)
    assert [t.data_ptr() % ALLOCATOR_ALIGNMENT for t in loaded.values()] == [0] * 6
    assert torch.empty(7).data_ptr() % ALLOCATOR_ALIGNMENT == 0


def test_tensors_streamed_from_disk_start_where_torch_allocates_them(tmp_path):
    save_file({f"w{i}": torch.randn(3 + i, 5) for i in range(6)}, tmp_path / "model.safetensors")
    lazy = lazy_load(tmp_path / "model.safetensors")
    assert [lazy[f"w{i}"].read("cpu").data_ptr() % ALLOCATOR_ALIGNMENT for i in range(6)] == [0] * 6
