"""dsf.training.optim: AdamW and SGD against torch.optim, Lion against its paper's update, schedules, global-norm clipping."""

import pytest
import torch

from dsf.training import optim

SHAPES = {"blocks/0/w": (4, 3), "blocks/1/w": (3,), "head": (2, 2, 2)}


def random_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {path: torch.randn(shape, generator=generator) for path, shape in SHAPES.items()}


def step_alongside_torch(ours, torch_optimizer, torch_params, schedule, trainable, generator, state_slot=None):
    """Six updates of ``ours`` and of the torch optimizer on the same random O(1) gradients (none near zero, so no
    last-bit difference is amplified), equal after each step, and so is ``state_slot`` of the state if named."""
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
            if state_slot is not None:
                torch.testing.assert_close(state[state_slot][path], torch_optimizer.state[parameter][state_slot], rtol=0, atol=1e-6)
    return trainable, state


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
    trainable, state = step_alongside_torch(ours, torch_optimizer, torch_params, schedule, trainable, generator,
                                            state_slot="exp_avg_sq")
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


@pytest.mark.parametrize(
    "opt",
    [optim.adamw(learning_rate=1e-3, weight_decay=0.01), optim.sgd(learning_rate=1e-4, momentum=0.9, weight_decay=0.01),
     optim.lion(learning_rate=1e-3, weight_decay=0.01)],
    ids=["adamw", "sgd", "lion"],
)
def test_bf16_leaves_train_through_float32_master_weights(opt):
    """Steps of 1e-3 are below half the bf16 spacing of weights near 1.5: in place they would all be lost."""
    weight = torch.tensor([1.5, -1.25, 0.75, 1.0])  # exact in bf16
    grads = {"w": torch.tensor([0.5, -0.25, 1.0, 0.125])}
    full, half = {"w": weight}, {"w": weight.to(torch.bfloat16)}
    full_state, half_state = opt.init(full), opt.init(half)
    for _ in range(100):
        full, full_state = opt.update(grads, full_state, full)
        half, half_state = opt.update({"w": grads["w"].to(torch.bfloat16)}, half_state, half)
    assert torch.equal(half_state["master"]["w"], full["w"])
    assert half["w"].dtype == torch.bfloat16 and torch.equal(half["w"], full["w"].to(torch.bfloat16))
    assert not torch.equal(half["w"], weight.to(torch.bfloat16))


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 0.1), (0.8, True, 0.0)])
def test_sgd_matches_torch_sgd(momentum, nesterov, weight_decay):
    generator = torch.Generator().manual_seed(0)
    trainable = random_tensors(generator)
    torch_params = {path: torch.nn.Parameter(x.clone()) for path, x in trainable.items()}
    schedule = optim.warmup(optim.cosine_decay(0.1, decay_steps=4), warmup_steps=2)
    torch_optimizer = torch.optim.SGD(torch_params.values(), lr=0.1, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay)
    ours = optim.sgd(schedule, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    trainable, state = step_alongside_torch(ours, torch_optimizer, torch_params, schedule, trainable, generator)
    assert state["step"] == 6 and ("momentum" in state) == bool(momentum)


def lion_reference(param, exp_avg, grad, lr, beta1, beta2, weight_decay):
    """One Lion step on one tensor, as Algorithm 2 of Chen et al. 2023 writes it."""
    update = torch.sign(beta1 * exp_avg + (1 - beta1) * grad)
    param = param * (1 - lr * weight_decay) - lr * update
    return param, beta2 * exp_avg + (1 - beta2) * grad


def test_lion_matches_the_papers_update():
    generator = torch.Generator().manual_seed(0)
    trainable = random_tensors(generator)
    reference = {path: (x.clone(), torch.zeros_like(x)) for path, x in trainable.items()}
    schedule = optim.linear_decay(1e-2, decay_steps=5, final_learning_rate=1e-3)
    ours = optim.lion(schedule, betas=(0.8, 0.95), weight_decay=0.5)
    state = ours.init(trainable)
    for step in range(1, 7):
        grads = random_tensors(generator)
        trainable, state = ours.update(grads, state, trainable)
        reference = {path: lion_reference(*reference[path], grads[path], schedule(step), 0.8, 0.95, 0.5) for path in SHAPES}
        for path in SHAPES:
            torch.testing.assert_close(trainable[path], reference[path][0], rtol=0, atol=1e-6)
            torch.testing.assert_close(state["exp_avg"][path], reference[path][1], rtol=0, atol=1e-6)


def test_schedules_compose_and_describe_themselves():
    schedule = optim.warmup(optim.cosine_decay(1.0, decay_steps=2, final_learning_rate=0.5), warmup_steps=4)
    assert [schedule(step) for step in range(1, 9)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.5])
    assert optim.schedule_settings(schedule) == {
        "schedule": "warmup", "warmup_steps": 4,
        "then": {"schedule": "cosine_decay", "learning_rate": 1.0, "decay_steps": 2, "final_learning_rate": 0.5},
    }
    assert optim.warmup(0.5, warmup_steps=0)(1) == 0.5
    with pytest.raises(ValueError, match="decay_steps must be a positive int"):
        optim.linear_decay(1.0, decay_steps=0)


@pytest.mark.parametrize("bad, message", [
    (lambda: optim.sgd(momentum=1.0), "momentum must be in"),
    (lambda: optim.sgd(momentum=0.0, nesterov=True), "nesterov=True needs a momentum"),
    (lambda: optim.lion(betas=(0.9, 1.5)), "betas"),
])
def test_sgd_and_lion_reject_bad_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
