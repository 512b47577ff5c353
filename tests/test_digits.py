"""The embedded default: the digits model, its pipeline and the from-scratch recipe (smoke run)."""

import dataclasses
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import dsf
from dsf.models.digits import (
    DigitsConfig, build_tokenizer, dit_apply, generate_tensors, init_dit, load_model, new_model, save_model,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_from_scratch", ROOT / "recipes" / "train_from_scratch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fresh_dit_is_the_zero_velocity_field():
    params = init_dit(TINY, dsf.random.key(0))
    out = dit_apply(params, torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 6, 8), config=TINY)
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_inputs_name_the_problem():
    params = init_dit(TINY, dsf.random.key(0))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        dit_apply(params, torch.randn(1, 1, 16, 16), torch.rand(1), torch.randn(1, 6, 8), config=TINY)
    with pytest.raises(ValueError, match="batch sizes differ"):
        dit_apply(params, torch.randn(2, 3, 16, 16), torch.rand(1), torch.randn(2, 6, 8), config=TINY)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ROOT / "no-such-model")


def test_long_prompt_is_truncated_with_a_warning():
    with pytest.warns(UserWarning, match="has 9 tokens; the text encoder takes 6"):
        ids = tokenize(build_tokenizer(), ["a handwritten digit seven with thick bold inverted strokes"], 6)
    assert ids.shape == (1, 6)


def test_short_prompt_is_padded_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(build_tokenizer(), ["a digit seven", ""], 6)
    assert ids[0, 3:].eq(0).all() and ids[1].eq(0).all()


def test_same_seed_same_images_and_save_load_round_trip(tmp_path):
    model = dsf_perturbed(new_model(TINY, dsf.random.key(0)))
    a = generate_tensors(model, ["a handwritten digit one"] * 2, seed=5, num_inference_steps=3, progress=False)
    b = generate_tensors(model, ["a handwritten digit one"] * 2, seed=5, num_inference_steps=3, progress=False)
    c = generate_tensors(model, ["a handwritten digit one"] * 2, seed=6, num_inference_steps=3, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])
    loaded = load_model(save_model(model, tmp_path / "model"))
    assert torch.equal(generate_tensors(loaded, ["a handwritten digit one"] * 2, seed=5, num_inference_steps=3, progress=False), a)


def dsf_perturbed(model):
    """Give the zero-initialized output layers some weight so samples depend on the prompt."""
    def perturb(path, x):
        return x + 0.05 * dsf.random.normal(dsf.random.key(len(path)), x.shape) if path.startswith("dit/") else x

    return dataclasses.replace(model, params=dsf.tree.map_with_path(perturb, model.params))


def test_recipe_trains_saves_samples_and_resumes(tmp_path):
    recipe = load_recipe()
    common = ["--output_path", str(tmp_path), "--batch_size", "8", "--checkpoint_steps", "2", "--dim", "32",
              "--depth", "1", "--samples_per_digit", "1", "--num_inference_steps", "2", "--warmup_steps", "1"]
    recipe.main([*common, "--max_steps", "2"])
    recipe.main([*common, "--max_steps", "4", "--resume"])
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]
    losses = [float(row.split(",")[1]) for row in log[1:]]
    assert all(torch.isfinite(torch.tensor(losses)))
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (16 * 4, (17 * 10 - 1) * 4)

    out = tmp_path / "samples"
    recipe.main(["sample", "--model", str(tmp_path / "model"), "--prompt", "a handwritten digit two", "--num", "3",
                 "--seed", "1", "--out", str(out), "--num_inference_steps", "2"])
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and Image.open(files[0]).size == (16, 16)
