"""dsf.training.checkpoint: lossless round trips, retention, partial checkpoints, atomic safetensors, no jax on import."""

import os

import pytest
import torch
from safetensors.torch import load_file

from damage import DAMAGES
from dsf.training import checkpoint


def sample_state() -> dict:
    return {
        "trainable": {
            "blocks/0/w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
            "blocks/1/w": torch.tensor([1.0 + 2**-7, -3.5e38, 1e-40], dtype=torch.bfloat16),
        },
        "optimizer": {"step": 7, "exp_avg": {"half": torch.tensor([0.1, 65504.0], dtype=torch.float16)}, "empty": {}},
        "counts": torch.tensor([2**62 + 1, -5], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "fp8": torch.tensor([0.5, -448.0]).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.25),
        "no_elements": torch.zeros(0, 5, dtype=torch.bfloat16),
        "key": 2**64 - 1,
        "elapsed_seconds": 12.5,
        "name": "run/1",
        "flag": True,
        "nothing": None,
    }


def assert_same_state(restored, expected, path=""):
    if isinstance(expected, dict):
        assert isinstance(restored, dict) and list(restored) == list(expected), path
        for key in expected:
            assert_same_state(restored[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, torch.Tensor):
        assert restored.dtype == expected.dtype and restored.shape == expected.shape, path
        assert restored.reshape(-1).view(torch.uint8).tolist() == expected.reshape(-1).view(torch.uint8).tolist(), path
    else:
        assert type(restored) is type(expected) and restored == expected, path


def test_state_round_trips_exactly(tmp_path):
    state = sample_state()
    checkpoint.save_state(tmp_path, 3, state)
    assert checkpoint.latest_step(tmp_path) == 3
    assert_same_state(checkpoint.restore_state(tmp_path), state)


def test_keep_last_deletes_old_checkpoints(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_state(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    assert checkpoint.restore_state(tmp_path, 2)["step"] == 2
    with pytest.raises(FileNotFoundError, match=r"step 1 .* holds steps \[2, 3\]"):
        checkpoint.restore_state(tmp_path, 1)


def test_partial_checkpoint_is_ignored_then_cleaned_up(tmp_path):
    checkpoint.save_state(tmp_path, 4, {"step": 4})
    leftover = tmp_path / "8.orbax-checkpoint-tmp-1700000000"
    (leftover / "arrays").mkdir(parents=True)
    (leftover / "arrays" / "half_written").write_bytes(b"\0" * 10)
    assert checkpoint.latest_step(tmp_path) == 4
    assert checkpoint.restore_state(tmp_path) == {"step": 4}
    checkpoint.save_state(tmp_path, 5, {"step": 5})
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_saving_an_old_step_is_refused(tmp_path):
    checkpoint.save_state(tmp_path, 4, {"step": 4})
    with pytest.raises(ValueError, match="cannot save step 4 .* already holds checkpoint 4"):
        checkpoint.save_state(tmp_path, 4, {"step": 4})


def test_restore_without_checkpoints_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {tmp_path}"):
        checkpoint.restore_state(tmp_path)
    assert checkpoint.latest_step(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "state, message",
    [({"params": {"w": [torch.ones(1)]}}, "'/params/w' is a list"), ({1: torch.ones(1)}, "has key 1")],
)
def test_unsupported_state_is_refused_before_writing(tmp_path, state, message):
    with pytest.raises(TypeError, match=message):
        checkpoint.save_state(tmp_path, 1, state)
    assert checkpoint.all_steps(tmp_path) == []


def test_save_safetensors_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "weights.safetensors"
    checkpoint.save_safetensors(path, {"a.w": torch.ones(2, dtype=torch.bfloat16)})
    checkpoint.save_safetensors(path, {"a.w": torch.zeros(3)}, metadata={"step": "2"})
    assert torch.equal(load_file(path)["a.w"], torch.zeros(3))
    with pytest.raises(Exception):
        checkpoint.save_safetensors(path, {"a.w": "not a tensor"})
    assert os.listdir(tmp_path) == ["weights.safetensors"]
    assert torch.equal(load_file(path)["a.w"], torch.zeros(3))


def test_save_safetensors_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="'step': 2"):
        checkpoint.save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(1)}, metadata={"step": 2})
    assert os.listdir(tmp_path) == []


def two_checkpoints(folder) -> None:
    for step in (10, 20):
        checkpoint.save_state(folder, step, {"w": torch.randn(500, generator=torch.Generator().manual_seed(step)), "step": step})


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_refused_and_resume_falls_back_to_the_previous_one(tmp_path, damage):
    two_checkpoints(tmp_path)
    DAMAGES[damage](tmp_path / "20")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"checkpoint {tmp_path / '20'}"):
        checkpoint.restore_state(tmp_path)
    assert checkpoint.newest_good_step(tmp_path) == 10
    reports = []
    step, state = checkpoint.restore_newest_good(tmp_path, report=reports.append)
    assert step == 10 and torch.equal(state["w"], torch.randn(500, generator=torch.Generator().manual_seed(10)))
    assert len(reports) == 1 and f"{tmp_path / '20'}" in reports[0] and "resuming from step 10" in reports[0]
    assert sorted(os.listdir(tmp_path)) == ["10", "20.damaged"]
    checkpoint.save_state(tmp_path, 20, {"step": 20}, keep_last=2)  # the damaged one neither blocks nor outlives saves
    assert checkpoint.all_steps(tmp_path) == [10, 20]


def test_with_every_checkpoint_damaged_restore_says_so(tmp_path):
    two_checkpoints(tmp_path)
    for step in ("10", "20"):
        DAMAGES["zeroed structure"](tmp_path / step)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="no checkpoint in .* reads back as written"):
        checkpoint.restore_newest_good(tmp_path, report=lambda message: None)
    assert sorted(os.listdir(tmp_path)) == ["10.damaged", "20.damaged"]


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_state(tmp_path, step, {"step": step})
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()  # what orbax 0.12 stages a save in
    (tmp_path / "5.orbax-checkpoint-tmp-1700000000").mkdir()  # and older orbax
    checkpoint.remove_leftovers(tmp_path, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
