"""Training paradigms on the digits model: direct distillation, differential LoRA, split training, SFT."""

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

import dsf
from dsf.training.cache import write_cache
from dsf.training.data import collate
from dsf.models.digits import DigitsConfig, dit_apply, generate_tensors, load_model, new_model, prompt_for, save_model
from dsf.models.digits.paradigms import (
    distill_items, distill_loss, encode_text_once, full_sft, load_cached, lora_sft, split_loss, teacher_cache,
    with_merged_lora, with_preset_lora, write_teacher_folder,
)
from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
from dsf.training.paradigm import fit
from dsf.training.train import TrainConfig, train
from dsf.transforms import lora_trainable, save_lora
from dsf.weight import Weight

ROOT = Path(__file__).resolve().parents[1]
TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)


@pytest.fixture(scope="module")
def model():
    """A tiny model whose zero-initialized gates and output carry some weight, so every DiT leaf gets gradients."""
    fresh = new_model(TINY, dsf.random.key(0))

    def perturb(path, x):
        return x + 0.05 * dsf.random.normal(dsf.random.key(len(path)), x.shape) if path.startswith("dit/") else x

    return dataclasses.replace(fresh, params=dsf.tree.map_with_path(perturb, fresh.params))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return load_training_set(write_digits_folder(tmp_path_factory.mktemp("digits"), limit=8), image_size=16)


def quick(max_steps: int, learning_rate: float = 1e-2) -> TrainConfig:
    return TrainConfig(learning_rate=learning_rate, weight_decay=0.0, max_steps=max_steps, progress=False)


def dit_grads(grads) -> dict:
    return dsf.tree.select(grads["dit"], None)


# ----------------------------------------------------------------------------- direct distillation


def test_distill_loss_differentiates_through_the_sampler_like_an_unrolled_loop(model):
    prompts, seeds = [prompt_for(1), prompt_for(2)], [0, 1]
    target = dsf.random.uniform(dsf.random.key(9), (2, 3, 16, 16), -1, 1)
    batch = {**collate(distill_items(prompts, seeds, num_inference_steps=3)), "image": target}
    value, grads = dsf.value_and_grad(distill_loss(model), where=r"^dit/")(model.params, batch, dsf.random.key(0))

    def unrolled(params):
        text = model.text_embeds(params, prompts)
        x = torch.stack([dsf.random.normal(dsf.random.fold_in(dsf.random.key(s), 0), (3, 16, 16)) for s in seeds])
        levels = [1.0, 2 / 3, 1 / 3, 0.0]
        for sigma, sigma_next in itertools.pairwise(levels):
            x = x + (sigma_next - sigma) * dit_apply(params["dit"], x, torch.full((2,), sigma), text, config=TINY)
        return (x - target).square().mean()

    expected_value, expected = dsf.value_and_grad(unrolled, where=r"^dit/")(model.params)
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(dit_grads(grads), dit_grads(expected))
    assert all(g.abs().sum() > 0 for g in dit_grads(grads).values())


def test_teacher_targets_from_dataset_columns_and_on_the_fly_agree(model, tmp_path):
    prompts, seeds = [prompt_for(3), prompt_for(3), prompt_for(8)], [0, 1, 0]
    teacher = teacher_cache(model, num_inference_steps=6, cfg_scale=3.0)
    rows = distill_items(prompts, seeds, num_inference_steps=2)
    dataset = collate(load_training_set(write_teacher_folder(tmp_path, rows, teacher), image_size=16))
    assert teacher.computed == 3
    on_the_fly = collate(rows)

    targets = teacher(list(zip(prompts, seeds)))
    assert teacher.computed == 3  # cached: the teacher did not run again
    assert (dataset["image"] - targets).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG rounding only
    reference = generate_tensors(model, [prompts[1]], seed=1, num_inference_steps=6, cfg_scale=3.0, progress=False)
    torch.testing.assert_close(targets[1], reference[0].clamp(-1, 1))

    key = dsf.random.key(0)
    from_dataset = distill_loss(model)(model.params, dataset, key)
    from_teacher = distill_loss(model, teacher)(model.params, on_the_fly, key)
    assert from_teacher > 0
    torch.testing.assert_close(from_dataset, from_teacher, atol=2e-3, rtol=0)


def test_distill_batch_with_mixed_schedules_is_refused(model):
    batch = collate(distill_items([prompt_for(1)], [0], num_inference_steps=2) + distill_items([prompt_for(1)], [1], num_inference_steps=4))
    with pytest.raises(ValueError, match="num_inference_steps.*one schedule per batch"):
        distill_loss(model, teacher_cache(model, 2))(model.params, batch, dsf.random.key(0))


# ----------------------------------------------------------------------------- differential LoRA


def test_differential_lora_merges_the_preset_delta_and_trains_lora_2_on_top(model, items, tmp_path):
    lora_1 = lora_sft(rank=2).transforms.init(model.params, dsf.random.key(1))
    lora_1 = dsf.tree.map_with_path(lambda p, x: x + 0.1 if p.endswith("/up") else x, lora_1)  # up starts at zero
    save_lora(lora_1["dit"], tmp_path / "lora_1.safetensors")
    preset = with_preset_lora(model.params, tmp_path / "lora_1.safetensors")

    qkv = "blocks/0/qkv/weight"
    adapter = dsf.tree.select(lora_1["dit"], None)
    delta_1 = adapter[f"{qkv}/adapt/adapters/lora/up"] @ adapter[f"{qkv}/adapt/adapters/lora/down"]
    base_qkv, preset_qkv = model.params["dit"]["blocks"][0]["qkv"]["weight"], preset["dit"]["blocks"][0]["qkv"]["weight"]
    torch.testing.assert_close(preset_qkv - base_qkv, delta_1)
    assert preset["dit"]["pos_embed"] is model.params["dit"]["pos_embed"]

    trained = fit(lora_sft(rank=2), digits_loss(model), preset, data_stream(items, 4, dsf.random.key(2)), quick(3),
                  key=dsf.random.key(3))
    trained_qkv = trained["dit"]["blocks"][0]["qkv"]["weight"]
    assert isinstance(trained_qkv, Weight) and list(trained_qkv.stages["adapt"].adapters) == ["lora"]
    assert torch.equal(trained_qkv.data, preset_qkv)  # LoRA 1 stays merged, untouched
    up_2 = trained_qkv.stages["adapt"].adapters["lora"].up
    assert up_2.abs().sum() > 0

    save_lora(trained["dit"], tmp_path / "lora_2.safetensors")
    alone = with_preset_lora(model.params, tmp_path / "lora_2.safetensors")["dit"]["blocks"][0]["qkv"]["weight"]
    torch.testing.assert_close(alone - base_qkv, up_2 @ trained_qkv.stages["adapt"].adapters["lora"].down)


# ----------------------------------------------------------------------------- split training


def test_split_training_gives_the_losses_and_gradients_of_the_unsplit_run(model, items, tmp_path):
    cached = load_cached(write_cache(tmp_path / "cache", encode_text_once(model, items)).parent)
    dit_only = {"dit": model.params["dit"]}
    key = dsf.random.key(4)
    assert (dsf.random.uniform(dsf.random.split(key)[0], (8,)) < 0.5).any()  # some prompts are dropped
    unsplit_value, unsplit_grads = dsf.value_and_grad(digits_loss(model, 0.5), where=r"^dit/")(model.params, collate(items), key)
    split_value, split_grads = dsf.value_and_grad(split_loss(model, 0.5), where=r"^dit/")(dit_only, collate(cached), key)
    torch.testing.assert_close(split_value, unsplit_value)
    torch.testing.assert_close(dit_grads(split_grads), dit_grads(unsplit_grads))

    losses = {"unsplit": [], "split": []}
    for name, loss, params, data in (("unsplit", digits_loss(model), model.params, items), ("split", split_loss(model), dit_only, cached)):
        train(full_sft().transforms(loss), params, data_stream(data, 4, dsf.random.key(5)), quick(3), where=r"^dit/",
              key=dsf.random.key(6), callback=lambda step, p, value, name=name: losses[name].append(value))
    assert losses["split"] == pytest.approx(losses["unsplit"], rel=1e-5) and len(losses["split"]) == 3


# ----------------------------------------------------------------------------- supervised fine-tuning


def test_lora_fine_tuning_lowers_the_loss_on_a_tiny_problem(model, items):
    batch = collate(items)
    keys = [dsf.random.key(100 + i) for i in range(8)]

    def mean_loss(params):
        with torch.no_grad():
            return sum(digits_loss(model, prompt_dropout=0.0)(params, batch, k).item() for k in keys) / len(keys)

    trained = fit(lora_sft(rank=4), digits_loss(model, prompt_dropout=0.0), model.params, data_stream(items, 8, dsf.random.key(7)),
                  quick(40), key=dsf.random.key(8))
    assert mean_loss(trained) < 0.8 * mean_loss(model.params)
    assert mean_loss(with_merged_lora(model, trained).params) == pytest.approx(mean_loss(trained), rel=1e-4)
    assert len(dsf.tree.select(trained, lora_trainable)) == 12  # down and up on qkv, out, mlp_up, mlp_down, modulation, proj_out


def test_full_fine_tuning_updates_every_dit_leaf_and_only_those(model, items):
    trained = fit(full_sft(), digits_loss(model), model.params, data_stream(items, 4, dsf.random.key(9)), quick(2, 1e-3),
                  key=dsf.random.key(10))
    before, after = dsf.tree.select(model.params, None), dsf.tree.select(trained, None)
    changed = {path for path in before if not torch.equal(before[path], after[path])}
    assert changed == {path for path in before if path.startswith("dit/")}


# ----------------------------------------------------------------------------- the recipe


def test_recipe_runs_the_paradigms_on_a_model_folder(model, tmp_path):
    spec = importlib.util.spec_from_file_location("digits_paradigms", ROOT / "recipes" / "digits_paradigms.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    common = ["--model", str(save_model(model, tmp_path / "model")), "--max_steps", "1", "--batch_size", "4",
              "--output_path", str(tmp_path / "out")]  # one output folder: the runs share its dataset folders
    recipe.main(["differential", *common])
    recipe.main(["distill", *common, "--seeds_per_digit", "1", "--teacher_steps", "2", "--teacher_data", str(tmp_path / "teacher")])
    recipe.main(["split", *common, "--lora_rank", "0"])

    qkv = model.params["dit"]["blocks"][0]["qkv"]["weight"]
    lora_2 = with_preset_lora(model.params, tmp_path / "out" / "lora_2.safetensors")
    assert not torch.equal(lora_2["dit"]["blocks"][0]["qkv"]["weight"], qkv)
    assert len(load_training_set(tmp_path / "teacher" / "metadata.csv", image_size=16)) == 10
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    split = load_model(tmp_path / "out" / "model").params
    assert not torch.equal(split["dit"]["blocks"][0]["qkv"]["weight"], qkv)
    assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(split["text_encoder"]), dsf.tree.tensors(model.params["text_encoder"])))
