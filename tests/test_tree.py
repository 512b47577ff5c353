import pytest
import torch

from dsf import tree
from dsf.weight import Cast, Weight


def make_params():
    return {
        "blocks": [{"q": {"weight": torch.ones(2, 2)}, "norm": torch.ones(2)} for _ in range(2)],
        "head": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)},
    }


def test_paths_are_slash_joined_in_flatten_order():
    assert tree.paths(make_params()) == [
        "blocks/0/norm", "blocks/0/q/weight", "blocks/1/norm", "blocks/1/q/weight", "head/bias", "head/weight",
    ]


def test_map_with_path_sees_paths_and_keeps_structure():
    out = tree.map_with_path(lambda p, x: (p, x.shape), make_params())
    assert out["blocks"][1]["q"]["weight"] == ("blocks/1/q/weight", torch.Size([2, 2]))


def test_select_by_regex_list_and_callable():
    params = make_params()
    assert sorted(tree.select(params, r"q/weight$")) == ["blocks/0/q/weight", "blocks/1/q/weight"]
    assert sorted(tree.select(params, [r"^head/bias$", r"^blocks/1/norm$"])) == ["blocks/1/norm", "head/bias"]
    assert sorted(tree.select(params, lambda p, x: x.ndim == 1)) == ["blocks/0/norm", "blocks/1/norm", "head/bias"]


def test_partition_and_combine_round_trip():
    params = make_params()
    picked, rest = tree.partition(params, r"^blocks/")
    assert picked["head"]["weight"] is None and rest["blocks"][0]["norm"] is None
    merged = tree.combine(picked, rest)
    assert tree.paths(merged) == tree.paths(params)
    assert all(a is b for a, b in zip(tree.tensors(merged), tree.tensors(params)))


def test_flatten_and_unflatten_dict_mirror_checkpoint_keys():
    flat = tree.flatten_dict(make_params())
    assert "blocks.1.q.weight" in flat
    back = tree.unflatten_dict(flat)
    assert isinstance(back["blocks"], list) and len(back["blocks"]) == 2
    assert tree.paths(back) == tree.paths(make_params())


def test_unflatten_keeps_non_contiguous_integer_keys_as_dict():
    assert tree.unflatten_dict({"a.0": 1, "a.2": 2}) == {"a": {"0": 1, "2": 2}}


def test_unflatten_rejects_colliding_keys():
    with pytest.raises(ValueError, match="nests below a tensor"):
        tree.unflatten_dict({"a": 1, "a.b": 2})


def test_weight_records_are_tree_nodes_with_slot_paths():
    w = Weight(torch.ones(2, dtype=torch.bfloat16)).with_stage(Cast(torch.float32))
    params = {"layer": {"weight": w}}
    assert tree.paths(params) == ["layer/weight/data"]
    mapped = tree.map_with_path(lambda p, x: x * 2, params)
    assert isinstance(mapped["layer"]["weight"], Weight)
    assert mapped["layer"]["weight"].slot_names() == ["decode"]


def test_summary_lists_path_shape_dtype_device_bytes_and_slots():
    params = {"a": Weight(torch.ones(4, dtype=torch.bfloat16)).with_stage(Cast(torch.float32)), "b": torch.zeros(2, 3)}
    text = tree.summary(params)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "device", "bytes", "slots"]
    assert lines[1].split() == ["a", "(4,)", "bfloat16", "cpu", "8", "decode"]
    assert lines[2].split() == ["b", "(2,", "3)", "float32", "cpu", "24", "-"]
    assert lines[-1] == "total 10 parameters, 32 bytes"


def test_summary_counts_meta_tensors_without_memory():
    assert "4000000 bytes" in tree.summary({"w": torch.empty(1000, 1000, device="meta")})
