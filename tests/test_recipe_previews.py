"""--validation_prompts in the recipes: recipes/train_from_scratch.py on the digits model and recipes/flux_lora.py on the
tiny FLUX.1 write their previews at the right steps, of the trained params, without changing the training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dsf.models.digits import generate, load_model
from test_digits import load_recipe
from test_flux_lora_recipe import SIZE, assert_same_file, digits, hub, losses, one_thread, run, sft_run, tiny  # noqa: F401


def test_train_from_scratch_previews_the_validation_prompts_with_the_trained_params(tmp_path):
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    load_recipe().main(["--output_path", str(tmp_path), "--batch_size", "8", "--dim", "32", "--depth", "1", "--max_steps", "2",
                        "--samples_per_digit", "1", "--num_inference_steps", "2", "--validation_prompts", *prompts,
                        "--validation_steps", "1", "--validation_num_inference_steps", "3"])
    assert sorted(path.name for path in (tmp_path / "validation").iterdir()) == ["step-1", "step-2"]
    expected = generate(load_model(tmp_path / "model"), prompts, seed=0, num_inference_steps=3, progress=False)
    for index, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "validation" / "step-2" / f"{index}.png")), np.asarray(image))


def test_flux_lora_previews_are_written_and_leave_the_training_alone(tiny, digits, sft_run, tmp_path):  # noqa: F811
    run(tiny, digits, tmp_path, "--lora_layout", "diffusers", "--validation_prompts", "a digit one", "a digit two",
        "--validation_steps", "2", "--validation_num_inference_steps", "2")
    folder = tmp_path / "validation"
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png")) == [
        "step-2/0.png", "step-2/1.png", "step-3/0.png", "step-3/1.png"]
    assert Image.open(folder / "step-3" / "1.png").size == (SIZE, SIZE)
    assert losses(tmp_path) == losses(sft_run[0])
    assert_same_file(tmp_path / "step-3.safetensors", sft_run[0] / "step-3.safetensors")
    with pytest.raises(ValueError, match="--task sft:train does not train with"):
        run(tiny, digits, tmp_path / "cached", "--task", "sft:train", "--validation_prompts", "a digit one")
