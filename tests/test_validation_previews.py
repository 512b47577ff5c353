"""Validation previews while training: where they go, that they repeat, resume, and cost no training randomness."""

import dataclasses
import os

import pytest
import torch

import dsf
from dsf.models.digits import DigitsConfig, generate, new_model
from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
from dsf.training.train import TrainConfig, train

TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)
PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    items = load_training_set(write_digits_folder(tmp_path_factory.mktemp("digits"), image_size=16, limit=16), image_size=16)
    return new_model(TINY, dsf.random.key(0)), items


def previewer(model, calls: list):
    """Two prompts at seed 0, two sampling steps; records the steps it ran at through ``calls``."""

    def validate(params):
        calls.append(None)
        return generate(dataclasses.replace(model, params=params), PROMPTS, seed=0, num_inference_steps=2, progress=False)

    return validate


def run(digits, output_path, calls=None, callback=None, loss=None, validate=True, **overrides):
    model, items = digits
    config = TrainConfig(learning_rate=1e-2, max_steps=6, checkpoint_steps=3, output_path=str(output_path), progress=False)
    previews = {"validate": previewer(model, [] if calls is None else calls), "validate_every": 2} if validate else {}
    return train(loss or digits_loss(model), model.params, data_stream(items, 4, dsf.random.key(1)),
                 dataclasses.replace(config, **overrides), key=dsf.random.key(2), where="^dit/", callback=callback, **previews)


def preview_files(output_path) -> dict[str, bytes]:
    folder = output_path / "validation"
    return {f"{step}/{name}": (folder / step / name).read_bytes()
            for step in sorted(os.listdir(folder)) for name in sorted(os.listdir(folder / step))}


def test_previews_appear_every_n_steps_and_at_the_end_with_the_same_bytes_in_two_runs(digits, tmp_path):
    run(digits, tmp_path / "a", max_steps=5)
    run(digits, tmp_path / "b", max_steps=5)
    files = preview_files(tmp_path / "a")
    assert sorted(files) == ["step-2/0.png", "step-2/1.png", "step-4/0.png", "step-4/1.png", "step-5/0.png", "step-5/1.png"]
    assert files == preview_files(tmp_path / "b")
    assert files["step-2/0.png"] != files["step-4/0.png"]  # the previews follow the training
    assert files["step-2/0.png"] != files["step-2/1.png"]


def interrupt_at(step):
    def callback(current, params, loss):
        if current == step:
            raise KeyboardInterrupt

    return callback


def test_resume_neither_repeats_nor_skips_a_preview(digits, tmp_path):
    full_calls, first_calls, resumed_calls = [], [], []
    run(digits, tmp_path / "full", full_calls)
    with pytest.raises(KeyboardInterrupt):  # after step 4's preview; the newest checkpoint is step 3's
        run(digits, tmp_path / "resumed", first_calls, callback=interrupt_at(4))
    assert sorted(os.listdir(tmp_path / "resumed" / "validation")) == ["step-2", "step-4"]
    run(digits, tmp_path / "resumed", resumed_calls, resume=True)
    assert (len(full_calls), len(first_calls), len(resumed_calls)) == (3, 2, 1)  # steps 2, 4, 6; then 2, 4; then 6
    assert preview_files(tmp_path / "full") == preview_files(tmp_path / "resumed")


def noisy_loss(model):
    """The digits loss plus a term drawn from torch's global generator, as a dropout would draw."""
    loss = digits_loss(model)

    def loss_with_global_noise(params, batch, key):
        return loss(params, batch, key) + 1e-3 * (torch.rand(()) * params["dit"]["proj_out"]["weight"].sum())

    return loss_with_global_noise


def test_previews_take_nothing_from_the_training_randomness(digits, tmp_path):
    def global_noise_preview(params):
        torch.rand(100)  # a sampler drawing from torch's global generator
        return previewer(digits[0], [])(params)

    model, items = digits
    torch.manual_seed(0)
    plain = run(digits, tmp_path / "plain", loss=noisy_loss(model), validate=False)
    torch.manual_seed(0)
    config = TrainConfig(learning_rate=1e-2, max_steps=6, output_path=str(tmp_path / "previewed"), progress=False)
    previewed = train(noisy_loss(model), model.params, data_stream(items, 4, dsf.random.key(1)), config,
                      key=dsf.random.key(2), where="^dit/", validate=global_noise_preview, validate_every=1)
    assert len(os.listdir(tmp_path / "previewed" / "validation")) == 6
    for path, leaf in dsf.tree.select(plain, "^dit/").items():
        assert torch.equal(leaf, dsf.tree.select(previewed, "^dit/")[path]), path


def test_previews_go_to_tensorboard(digits, tmp_path, monkeypatch):
    import dsf.training.train

    logged = []

    class Recorder:
        def __init__(self, log_dir, purge_step):
            pass

        def add_scalar(self, *args):
            pass

        def add_image(self, tag, image, step, dataformats):
            logged.append((tag, image.shape, step, dataformats))

        def close(self):
            pass

    monkeypatch.setattr(dsf.training.train, "_tensorboard_writer", lambda log_dir, purge_step: Recorder(log_dir, purge_step))
    run(digits, tmp_path, max_steps=2, checkpoint_steps=None)
    assert logged == [("validation/0", (16, 16, 3), 2, "HWC"), ("validation/1", (16, 16, 3), 2, "HWC")]


@pytest.mark.parametrize(("options", "message"), [
    ({"validate": lambda params: []}, "validate was given without validate_every"),
    ({"validate_every": 2}, "validate_every was given without validate"),
    ({"validate": lambda params: [], "validate_every": 0}, "validate_every must be a positive int"),
    ({"validate": lambda params: [torch.zeros(3, 4, 4)], "validate_every": 1}, "must return PIL images"),
])
def test_bad_previews_are_named(options, message, tmp_path):
    def data(position):
        while True:
            yield position + 1, torch.ones(1)

    config = TrainConfig(max_steps=1, output_path=str(tmp_path), progress=False)
    with pytest.raises((ValueError, TypeError), match=message):
        train(lambda p, x, k: (p["w"] * x).sum(), {"w": torch.zeros(1)}, data, config, key=dsf.random.key(0), **options)


def test_previews_need_an_output_path():
    with pytest.raises(ValueError, match="set output_path"):
        train(lambda p, x, k: p["w"].sum(), {"w": torch.zeros(1)}, lambda position: iter(()),
              TrainConfig(max_steps=1, progress=False), key=dsf.random.key(0), validate=lambda params: [], validate_every=1)


def test_recipe_flags_need_prompts_for_a_preview_frequency():
    import argparse

    from dsf.cli.training_flags import add_training_flags, validation_options

    parser = argparse.ArgumentParser()
    add_training_flags(parser, output_path="out", lora_targets="q", lora_layouts=("dsf",))
    config = TrainConfig(max_steps=10, save_steps=4, output_path="out")
    assert validation_options(parser.parse_args([]), config, lambda params, prompts: []) == {}
    assert validation_options(parser.parse_args(["--validation_prompts", "a cat"]), config,
                              lambda params, prompts: [])["validate_every"] == 4
    with pytest.raises(ValueError, match="pass the prompts too"):
        validation_options(parser.parse_args(["--validation_steps", "2"]), config, lambda params, prompts: [])
