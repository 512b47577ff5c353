"""Diffusion-DPO: the loss against hand-computed errors, and a few steps on the tiny digits model."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import dsf
from dsf.diffusion.losses import noised
from dsf.diffusion.preference import diffusion_dpo_loss, dpo_loss_from_errors
from dsf.models.digits import DigitsConfig, new_model
from dsf.models.digits.paradigms import dpo_loss, lora_sft, preference_pairs, thickened
from dsf.models.digits.training import data_stream, digit_images
from dsf.training.paradigm import fit
from dsf.training.train import TrainConfig

TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)


def scaled(params, x, sigma):
    return params * x


def test_dpo_loss_is_minus_logsigmoid_of_the_hand_computed_margin():
    key = dsf.random.key(3)
    preferred = dsf.random.normal(dsf.random.key(1), (3, 4))
    rejected = dsf.random.normal(dsf.random.key(2), (3, 4))
    policy, reference, beta = torch.tensor(0.7), torch.tensor(1.2), 5.0

    def errors(params, x0):  # by hand: the same key gives both samples of a pair one σ and one noise
        x_t, _, target, _ = noised(key, x0)
        return (params * x_t - target).square().mean(dim=1)

    margin = -beta * ((errors(policy, preferred) - errors(reference, preferred))
                      - (errors(policy, rejected) - errors(reference, rejected)))
    loss, metrics = diffusion_dpo_loss(scaled, policy, reference, preferred, rejected, key, beta=beta)
    torch.testing.assert_close(loss, -F.logsigmoid(margin).mean())
    torch.testing.assert_close(metrics["reward_margin"], margin.mean())
    assert metrics["preference_accuracy"].item() == (margin > 0).float().mean().item()
    assert len(set(margin.tolist())) == 3  # three distinct pairs: the check above is not of one repeated number


def test_the_policy_at_the_reference_has_zero_margin_and_loss_log_2():
    preferred, rejected = torch.randn(4, 6), torch.randn(4, 6)
    loss, metrics = diffusion_dpo_loss(scaled, torch.tensor(0.3), torch.tensor(0.3), preferred, rejected,
                                       dsf.random.key(0), beta=1000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["reward_margin"].item() == 0.0 and metrics["preference_accuracy"].item() == 0.0


def test_only_the_policy_gets_gradients():
    policy = torch.tensor(0.5, requires_grad=True)
    reference = torch.tensor(0.9, requires_grad=True)
    loss, _ = diffusion_dpo_loss(scaled, policy, reference, torch.ones(2, 4), torch.zeros(2, 4), dsf.random.key(0), beta=10.0)
    policy_grad, reference_grad = torch.autograd.grad(loss, (policy, reference), allow_unused=True)
    assert reference_grad is None and policy_grad.item() != 0.0


@pytest.mark.parametrize(("bad", "message"), [
    (dict(beta=0.0), "beta must be positive"),
    (dict(beta=1.0, rejected=torch.zeros(3, 5)), "must pair up"),
])
def test_bad_dpo_inputs_are_named(bad, message):
    arguments = {"preferred": torch.zeros(3, 4), "rejected": torch.zeros(3, 4), **bad}
    with pytest.raises(ValueError, match=message):
        diffusion_dpo_loss(scaled, torch.tensor(1.0), torch.tensor(1.0), key=dsf.random.key(0), **arguments)


def test_errors_must_be_one_per_pair():
    with pytest.raises(ValueError, match="one per pair"):
        dpo_loss_from_errors(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


def test_preference_pairs_need_one_prompt_per_pair():
    with pytest.raises(ValueError, match="two prompts"):
        preference_pairs([{"image": torch.zeros(1), "prompt": "a"}], [{"image": torch.zeros(1), "prompt": "b"}])


def test_a_few_lora_steps_of_dpo_on_the_digits_model_move_the_margin(tmp_path):
    model = new_model(TINY, dsf.random.key(0))
    images, labels = digit_images(16)
    as_tensor = lambda image: torch.from_numpy(image.copy()).float().div(127.5).sub(1).expand(3, -1, -1)
    prompts = [f"a handwritten digit {int(label)}" for label in labels[:8]]
    pairs = preference_pairs([{"image": as_tensor(thickened(i)), "prompt": p} for i, p in zip(images, prompts)],
                             [{"image": as_tensor(i), "prompt": p} for i, p in zip(images, prompts)])
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.0, max_steps=6, progress=False, output_path=str(tmp_path))
    fit(lora_sft(rank=2), dpo_loss(model, model.params, beta=100.0), model.params, data_stream(pairs, 8, dsf.random.key(1)),
        config, key=dsf.random.key(2), has_aux=True)
    with open(tmp_path / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    margins = [float(row["reward_margin"]) for row in rows]
    assert margins[0] == 0.0 and float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at zero
    assert margins[-1] > 0.0 and float(rows[-1]["loss"]) < math.log(2)
