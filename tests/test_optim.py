"""dsf.training.optim: AdamW against torch.optim.AdamW, schedules, global-norm clipping."""

import pytest
import torch

from dsf.training import optim

SHAPES = {"blocks/0/w": (4, 3), "blocks/1/w": (3,), "head": (2, 2, 2)}


def random_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {path: torch.randn(shape, generator=generator) for path, shape in SHAPES.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_adamw_matches_torch_adamw(weight_decay, warmup_steps):
    generator = torch.Generator().manual_seed(0)
    trainable = random_tensors(generator)
    initial = dict(trainable)
    torch_params = {path: torch.nn.Parameter(x.clone()) for path, x in trainable.items()}
    schedule = optim.constant_with_warmup(1e-2, warmup_steps)
    torch_optimizer = torch.optim.AdamW(torch_params.values(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ours = optim.adamw(schedule, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    state = ours.init(trainable)
    for step in range(1, 7):
        grads = random_tensors(generator)
        for path, parameter in torch_params.items():
            parameter.grad = grads[path].clone()
        torch_optimizer.param_groups[0]["lr"] = schedule(step)
        torch_optimizer.step()
        trainable, state = ours.update(grads, state, trainable)
        assert state["step"] == step
        for path, parameter in torch_params.items():
            torch.testing.assert_close(trainable[path], parameter.detach(), rtol=0, atol=1e-6)
            torch.testing.assert_close(state["exp_avg_sq"][path], torch_optimizer.state[parameter]["exp_avg_sq"], rtol=0, atol=1e-6)
    assert all(not torch.equal(trainable[path], initial[path]) for path in SHAPES)


def test_update_leaves_its_inputs_unchanged():
    trainable = {"w": torch.ones(3)}
    opt = optim.adamw(0.1)
    state = opt.init(trainable)
    new_trainable, new_state = opt.update({"w": torch.full((3,), 2.0)}, state, trainable)
    assert torch.equal(trainable["w"], torch.ones(3)) and torch.equal(state["exp_avg"]["w"], torch.zeros(3))
    assert state["step"] == 0 and new_state["step"] == 1
    assert not torch.equal(new_trainable["w"], trainable["w"])


def test_update_names_mismatched_paths():
    opt = optim.adamw(0.1)
    trainable = {"w": torch.ones(1), "b": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing grads for \['b'\], grads without a leaf for \['x'\]"):
        opt.update({"w": torch.ones(1), "x": torch.ones(1)}, opt.init(trainable), trainable)


@pytest.mark.parametrize("bad", [{"betas": (0.9, 1.0)}, {"weight_decay": -1.0}, {"learning_rate": -1e-3}])
def test_adamw_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        optim.adamw(**bad)


def test_warmup_is_linear_then_constant():
    schedule = optim.constant_with_warmup(2e-4, warmup_steps=5)
    assert [schedule(step) for step in range(1, 8)] == pytest.approx([0.4e-4, 0.8e-4, 1.2e-4, 1.6e-4, 2e-4, 2e-4, 2e-4])
    assert optim.constant_with_warmup(3e-4, warmup_steps=0)(1) == 3e-4
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.constant_with_warmup(1e-4, warmup_steps=-1)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_torch(max_norm):
    grads = random_tensors(torch.Generator().manual_seed(1))
    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for parameter, g in zip(parameters, grads.values()):
        parameter.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    clipped, norm = optim.clip_by_global_norm(grads, max_norm)
    torch.testing.assert_close(norm, torch_norm)
    for parameter, path in zip(parameters, grads):
        torch.testing.assert_close(clipped[path], parameter.grad, rtol=0, atol=1e-7)
    clipped_norm = optim.global_norm(clipped).item()
    assert clipped_norm == pytest.approx(min(max_norm, norm.item()), rel=1e-5)


def test_clip_by_global_norm_rejects_non_positive_max_norm():
    with pytest.raises(ValueError, match="max_grad_norm=None"):
        optim.clip_by_global_norm({"g": torch.ones(1)}, 0.0)


def test_bf16_leaves_train_through_float32_master_weights():
    """Steps of 1e-3 are below half the bf16 spacing of weights near 1.5: in place they would all be lost."""
    weight = torch.tensor([1.5, -1.25, 0.75, 1.0])  # exact in bf16
    grads = {"w": torch.tensor([0.5, -0.25, 1.0, 0.125])}
    opt = optim.adamw(learning_rate=1e-3, weight_decay=0.01)
    full, half = {"w": weight}, {"w": weight.to(torch.bfloat16)}
    full_state, half_state = opt.init(full), opt.init(half)
    for _ in range(100):
        full, full_state = opt.update(grads, full_state, full)
        half, half_state = opt.update({"w": grads["w"].to(torch.bfloat16)}, half_state, half)
    assert torch.equal(half_state["master"]["w"], full["w"])
    assert half["w"].dtype == torch.bfloat16 and torch.equal(half["w"], full["w"].to(torch.bfloat16))
    assert not torch.equal(half["w"], weight.to(torch.bfloat16))
