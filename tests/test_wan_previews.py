"""--validation_prompts in recipes/wan_lora.py on a tiny Wan pipeline: first frames at the right steps, the training
unchanged; refused where previews cannot be sampled."""

from __future__ import annotations

import pytest
from PIL import Image

pytest.importorskip("diffusers")
from test_wan_recipes import SIZE, dataset, folders, log_rows, lora_run, one_thread, trained_lora  # noqa: E402, F401


def test_wan_lora_previews_are_first_frames_and_leave_the_training_alone(folders, dataset, trained_lora, tmp_path):  # noqa: F811
    lora_run(folders("t2v"), dataset, tmp_path, "--max_steps", "2", "--lora_layout", "diffusers",
             "--validation_prompts", "a bar moves", "a red square", "--validation_steps", "1",
             "--validation_num_inference_steps", "2")
    folder = tmp_path / "validation"
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png")) == [
        "step-1/0.png", "step-1/1.png", "step-2/0.png", "step-2/1.png"]
    assert Image.open(folder / "step-2" / "0.png").size == (SIZE, SIZE)
    assert [row["loss"] for row in log_rows(tmp_path)] == [row["loss"] for row in log_rows(trained_lora)]


@pytest.mark.parametrize("variant, flags, message", [
    ("i2v", [], "image-to-video"),
    ("t2v", ["--task", "sft:train"], "--task sft:train does not run"),
])
def test_wan_previews_are_refused_where_they_cannot_be_sampled(folders, dataset, tmp_path, variant, flags, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        lora_run(folders(variant), dataset, tmp_path, "--max_steps", "1", "--validation_prompts", "a bar moves", *flags)
