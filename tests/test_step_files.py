"""Step files round-trip: what training writes, load_lora and load_trainable read, and save_lora writes in every layout."""


import pytest
import torch

import dsf
from dsf.model_parts.lora_files import LAYOUTS, detect_lora_layout
from dsf.models.digits import DigitsConfig, new_model
from dsf.models.digits.paradigms import lora_sft
from dsf.training.paradigm import fit
from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
from dsf.training.step_files import load_trainable
from dsf.training.train import TrainConfig
from dsf.transforms import load_lora, save_lora
from dsf.transforms.lora import lora

TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)
STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits LoRA (alpha = rank, the default) trained a few steps, with its step file."""
    model = new_model(TINY, dsf.random.key(0))
    items = load_training_set(write_digits_folder(tmp_path_factory.mktemp("digits"), limit=8), image_size=16)
    output = tmp_path_factory.mktemp("run")
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.0, max_steps=STEPS, save_steps=STEPS, progress=False,
                         output_path=str(output))
    paradigm = lora_sft(rank=2)
    trained = fit(paradigm, digits_loss(model), model.params, data_stream(items, 4, dsf.random.key(2)), config,
                  key=dsf.random.key(3))
    return model, paradigm, trained, output / f"step-{STEPS}.safetensors"


def outputs(model, params) -> torch.Tensor:
    """The DiT's velocity on fixed inputs (the LoRA's factors applied as the model uses them)."""
    x = dsf.random.normal(dsf.random.key(5), (2, TINY.channels, 16, 16))
    sigma = torch.tensor([0.3, 0.8])
    embeds = model.text_embeds(model.params, ["a handwritten digit three", ""])
    with torch.no_grad():
        return model.velocity(params, x, sigma, embeds)


def test_the_step_file_holds_the_trained_factors_and_is_recognized(run):
    from safetensors.torch import load_file

    keys = list(load_file(str(run[3])))
    assert keys and all(".adapt.adapters.lora." in key for key in keys)
    assert detect_lora_layout(keys) == "step file"


def test_load_lora_of_a_step_file_gives_the_trained_outputs_exactly(run):
    model, _, trained, step_file = run
    expected = outputs(model, trained)
    assert not torch.equal(expected, outputs(model, model.params))  # training changed the outputs
    assert torch.equal(outputs(model, load_lora(model.params, step_file)), expected)


def test_load_lora_of_a_step_file_reads_into_the_dit_alone(run):
    model, _, trained, step_file = run
    adapted = load_lora(model.params["dit"], step_file)
    assert torch.equal(outputs(model, {**model.params, "dit": adapted}), outputs(model, trained))


def test_load_trainable_puts_the_trained_leaves_into_the_paradigms_init(run):
    model, paradigm, trained, step_file = run
    fresh = paradigm.transforms.init(model.params, dsf.random.key(99))  # other factors than the trained ones
    assert not torch.equal(outputs(model, fresh), outputs(model, trained))
    assert torch.equal(outputs(model, load_trainable(fresh, step_file)), outputs(model, trained))


def test_load_trainable_names_leaves_the_tree_does_not_hold(run):
    model, _, _, step_file = run
    with pytest.raises(ValueError, match="not in params.*transforms' init"):
        load_trainable(model.params, step_file)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_lora_of_a_trained_tree_reads_back_in_every_layout(run, layout, tmp_path):
    model, _, trained, _ = run
    file = tmp_path / f"{layout}.safetensors"
    save_lora(trained, file, layout)
    assert torch.allclose(outputs(model, load_lora(model.params, file)), outputs(model, trained), rtol=0, atol=1e-6)


def test_a_step_file_of_several_adapters_is_refused_with_the_way_out(tmp_path):
    params = {"q": {"weight": torch.zeros(3, 2)}}
    two = lora(1, name="b").init(lora(1, name="a").init(params, dsf.random.key(0)), dsf.random.key(1))
    file = tmp_path / "step-1.safetensors"
    dsf.training.checkpoint.save_safetensors(file, dsf.tree.flatten_dict(two))
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\].*load_trainable"):
        load_lora(params, file)
