"""Moving digits: the videos, the tiny Wan DiT learning them, sampling, saving and the recipe (smoke run)."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsf
from dsf.models.digits.training import digit_images
from dsf.models.moving_digits import (
    DIRECTIONS, MovingDigitsConfig, build_tokenizer, center_of_mass, generate_tensors, load_model, motion_direction,
    moving_digits_loss, new_model, prompt_for, render_video, save_model, start_range, to_gray, video_stream,
)
from dsf.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=32, num_layers=1, freq_dim=16, text_dim=8, text_layers=1)
SPRITES, LABELS = digit_images(TINY.digit_size)


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_moving_digits", ROOT / "recipes" / "train_moving_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_the_digit_moves_speed_pixels_per_frame_in_its_direction(direction):
    config = MovingDigitsConfig(frames=9, image_size=20, digit_size=10, speed=1)
    (row, _), (col, _) = start_range(config, direction)
    video = to_gray(render_video(digit_images(10)[0][7], direction, (row, col), config))
    steps = center_of_mass(video).diff(dim=0)  # (frames - 1, 2): (row, column) per frame
    expected = torch.tensor(DIRECTIONS[direction], dtype=steps.dtype).expand_as(steps)
    assert video.shape == (9, 20, 20)
    assert torch.allclose(steps, expected, atol=1e-4), steps
    assert motion_direction(video) == direction
    assert motion_direction(video.flip(0)) != direction


def test_frames_count_is_one_plus_four_k():
    for frames in (2, 4, 6, 8):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            MovingDigitsConfig(frames=frames)
    configs = [MovingDigitsConfig(frames=frames, image_size=24) for frames in (1, 5, 9)]
    assert [render_video(SPRITES[0], "up", (16, 0), config).shape[1] for config in configs] == [1, 5, 9]


def test_digits_that_would_leave_the_frame_are_refused():
    with pytest.raises(ValueError, match="needs 20 pixels, more than image_size 16"):
        MovingDigitsConfig(digit_size=12, speed=1, frames=9)
    with pytest.raises(ValueError, match="leaves the frame"):
        render_video(SPRITES[0], "left", (0, 0), MovingDigitsConfig())
    with pytest.raises(ValueError, match=r"sprite has shape \(10, 10\); this config draws \(8, 8\)"):
        render_video(np.zeros((10, 10), np.uint8), "left", (0, 8), MovingDigitsConfig())


def test_batches_match_their_prompts_and_resume():
    data = video_stream(SPRITES, LABELS, 16, dsf.random.key(3), TINY)
    stream = data(0)
    (_, first), (position, second) = next(stream), next(stream)
    assert first["video"].shape == (16, 3, 5, 16, 16)
    assert first["video"].min() == -1 and first["video"].max() == 1
    assert first["prompt"] == [prompt_for(label, d) for label, d in zip(first["label"], first["direction"])]
    assert [motion_direction(v) for v in to_gray(first["video"])] == first["direction"]
    assert len(set(first["direction"])) > 1 and len(set(first["label"])) > 1
    assert torch.equal(next(data(position - 1))[1]["video"], second["video"])
    ids = build_tokenizer()(first["prompt"][0])["input_ids"]
    assert len(ids) == 6 and 1 not in ids  # no [UNK]: the motion words are in the vocabulary


def test_loss_decreases_over_a_few_steps():
    model = new_model(TINY, dsf.random.key(0))
    loss = moving_digits_loss(model, prompt_dropout=0.0)
    _, batch = next(video_stream(SPRITES, LABELS, 8, dsf.random.key(1), TINY)(0))

    def fixed(position):
        while True:
            position += 1
            yield position, batch

    config = TrainConfig(learning_rate=3e-3, weight_decay=0.0, max_steps=10, progress=False)
    trained = train(loss, model.params, fixed, config, where=r"^dit/", key=dsf.random.key(2))
    key = dsf.random.key(4)
    with torch.no_grad():
        before, after = loss(model.params, batch, key).item(), loss(trained, batch, key).item()
    assert after < 0.7 * before, (before, after)


def perturbed(model):
    """Output layers with some weight, so samples depend on the prompt and the seed."""
    def perturb(path, x):
        return x + 0.05 * dsf.random.normal(dsf.random.key(len(path)), x.shape) if path.startswith("dit/") else x

    return dataclasses.replace(model, params=dsf.tree.map_with_path(perturb, model.params))


def test_sampling_is_deterministic_and_round_trips_through_a_saved_folder(tmp_path):
    model = perturbed(new_model(TINY, dsf.random.key(0)))
    prompts = [prompt_for(7, "left"), prompt_for(7, "right")]
    kwargs = dict(num_inference_steps=3, progress=False)
    a, b = (generate_tensors(model, prompts, seed=5, **kwargs) for _ in range(2))
    c = generate_tensors(model, prompts, seed=6, **kwargs)
    assert a.shape == (2, 3, 5, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])
    loaded = load_model(save_model(model, tmp_path / "model"))
    assert loaded.config == model.config
    assert torch.equal(generate_tensors(loaded, prompts, seed=5, **kwargs), a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recipe_trains_saves_samples_and_resumes(tmp_path):
    recipe = load_recipe()
    common = ["--output_path", str(tmp_path), "--batch_size", "4", "--checkpoint_steps", "2", "--num_layers", "1",
              "--num_heads", "1", "--num_inference_steps", "2", "--warmup_steps", "1"]
    recipe.main([*common, "--max_steps", "2"])
    recipe.main([*common, "--max_steps", "3", "--resume"])
    rows = [row.split(",") for row in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3"] and all(np.isfinite([float(row[1]) for row in rows]))
    strip = Image.open(tmp_path / "samples.png")
    video_width = 5 * 17 - 1
    assert strip.size == ((4 * (video_width + 4) - 4) * 4, (10 * 17 - 1) * 4)

    out = tmp_path / "sevens"
    recipe.main(["sample", "--model", str(tmp_path / "model"), "--prompt", prompt_for(7, "down"), "--num", "2",
                 "--seed", "1", "--out", str(out), "--num_inference_steps", "2"])
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (video_width * 4, 16 * 4)
