"""Functional optimizers over flat ``{path: tensor}`` dicts of trainable leaves.

An :class:`Optimizer` is a pair of pure functions in the style of optax: ``init(trainable) -> state``
and ``update(grads, state, trainable) -> (new_trainable, new_state)``. Nothing is updated in place:
the inputs stay valid, so a caller can keep the previous step around or compare it. The state is a
plain dict of tensors and an integer step, ready for :func:`dsf.training.checkpoint.save_state`.

A learning-rate schedule is any ``step -> float`` function, where ``step`` counts updates from 1
(the first update uses ``schedule(1)``). The schedules here (:func:`constant`, :func:`cosine_decay`,
:func:`linear_decay`, and :func:`warmup` in front of any of them) carry their ``settings`` so a
checkpoint can record them (:func:`schedule_settings`). The optimizers (:func:`adamw`, :func:`sgd`,
:func:`lion`) carry theirs and their schedule too, and keep float32 master weights for 16-bit leaves.

Example:
    >>> import torch
    >>> trainable = {"w": torch.tensor([1.0, -2.0])}
    >>> opt = adamw(learning_rate=0.1, weight_decay=0.0)
    >>> state = opt.init(trainable)
    >>> grads, norm = clip_by_global_norm({"w": torch.tensor([3.0, -4.0])}, max_norm=1.0)
    >>> round(norm.item(), 4)
    5.0
    >>> trainable, state = opt.update(grads, state, trainable)
    >>> trainable["w"], state["step"]
    (tensor([ 0.9000, -1.9000]), 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

Schedule = Callable[[int], float]
Tensors = dict[str, torch.Tensor]
OptimizerState = dict  # {"step": int, <slot name>: {path: tensor}, ...}


@dataclass(frozen=True)
class Optimizer:
    """``init(trainable) -> state`` and ``update(grads, state, trainable) -> (new_trainable, new_state)``.

    ``learning_rate`` is the schedule the updates use (``None`` when unknown: a trainer then logs no
    learning rate) and ``settings`` the JSON values that define the optimizer (``None``: a custom one),
    which a checkpoint records so that a resumed run must use the same optimizer.

    >>> opt = sgd(learning_rate=0.1, momentum=0.5)
    >>> opt.learning_rate(1), opt.settings["optimizer"], opt.settings["momentum"]
    (0.1, 'sgd', 0.5)
    """

    init: Callable[[Tensors], OptimizerState]
    update: Callable[[Tensors, OptimizerState, Tensors], tuple[Tensors, OptimizerState]]
    learning_rate: Schedule | None = None
    settings: Mapping[str, Any] | None = None


def constant(learning_rate: float) -> Schedule:
    """The schedule that is ``learning_rate`` at every step.

    >>> constant(1e-3)(10)
    0.001
    """
    _check_learning_rate(learning_rate)
    return _described(lambda step: learning_rate, schedule="constant", learning_rate=learning_rate)


def warmup(schedule: float | Schedule, warmup_steps: int) -> Schedule:
    """Linear warm-up over ``warmup_steps`` steps to the first value of ``schedule``, then ``schedule``
    counting its steps from 1 again: step ``s <= warmup_steps`` is ``schedule(1) * s / warmup_steps``,
    step ``warmup_steps + s`` is ``schedule(s)``. A number is a :func:`constant` schedule.

    >>> schedule = warmup(linear_decay(1.0, decay_steps=2), warmup_steps=2)
    >>> [schedule(step) for step in range(1, 6)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    schedule = as_schedule(schedule)
    if not warmup_steps:
        return schedule

    def warmed_up(step: int) -> float:
        return schedule(1) * (step / warmup_steps) if step <= warmup_steps else schedule(step - warmup_steps)

    return _described(warmed_up, schedule="warmup", warmup_steps=warmup_steps, then=schedule_settings(schedule))


def constant_with_warmup(learning_rate: float, warmup_steps: int) -> Schedule:
    """Linear warm-up from ``learning_rate / warmup_steps`` at step 1 to ``learning_rate`` at ``warmup_steps``, then constant.

    >>> schedule = constant_with_warmup(1.0, warmup_steps=4)
    >>> [schedule(step) for step in range(1, 7)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    return warmup(constant(learning_rate), warmup_steps)


def cosine_decay(learning_rate: float, decay_steps: int, final_learning_rate: float = 0.0) -> Schedule:
    """Half a cosine from ``learning_rate`` at step 1 to ``final_learning_rate`` at step ``decay_steps + 1``
    and after (put :func:`warmup` in front for a warm-up).

    >>> schedule = cosine_decay(1.0, decay_steps=4, final_learning_rate=0.2)
    >>> [round(schedule(step), 4) for step in range(1, 7)]
    [1.0, 0.8828, 0.6, 0.3172, 0.2, 0.2]
    """
    progress = _decay_progress(learning_rate, decay_steps, final_learning_rate)
    return _described(
        lambda step: final_learning_rate + (learning_rate - final_learning_rate) * 0.5 * (1.0 + math.cos(math.pi * progress(step))),
        schedule="cosine_decay", learning_rate=learning_rate, decay_steps=decay_steps, final_learning_rate=final_learning_rate,
    )


def linear_decay(learning_rate: float, decay_steps: int, final_learning_rate: float = 0.0) -> Schedule:
    """A straight line from ``learning_rate`` at step 1 to ``final_learning_rate`` at step ``decay_steps + 1`` and after.

    >>> schedule = linear_decay(1.0, decay_steps=4)
    >>> [schedule(step) for step in range(1, 7)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    progress = _decay_progress(learning_rate, decay_steps, final_learning_rate)
    return _described(
        lambda step: final_learning_rate + (learning_rate - final_learning_rate) * (1.0 - progress(step)),
        schedule="linear_decay", learning_rate=learning_rate, decay_steps=decay_steps, final_learning_rate=final_learning_rate,
    )


def as_schedule(learning_rate: float | Schedule) -> Schedule:
    """A schedule as it is, or a number as a :func:`constant` schedule.

    >>> as_schedule(0.5)(3), as_schedule(lambda step: 1 / step)(4)
    (0.5, 0.25)
    """
    return learning_rate if callable(learning_rate) else constant(learning_rate)


def schedule_settings(schedule: Schedule) -> dict[str, Any]:
    """The JSON settings of a schedule made here; ``{"schedule": "custom"}`` for any other function
    (whose changes a resumed run then cannot notice).

    >>> schedule_settings(constant_with_warmup(0.5, warmup_steps=2))
    {'schedule': 'warmup', 'warmup_steps': 2, 'then': {'schedule': 'constant', 'learning_rate': 0.5}}
    >>> schedule_settings(lambda step: 1 / step)
    {'schedule': 'custom'}
    """
    return dict(getattr(schedule, "settings", {"schedule": "custom"}))


def _described(function: Callable[[int], float], **settings) -> Schedule:
    function.settings = settings
    return function


def _decay_progress(learning_rate: float, decay_steps: int, final_learning_rate: float) -> Callable[[int], float]:
    """``step -> fraction of the decay done``, from 0 at step 1 to 1 at step ``decay_steps + 1``; checks the settings."""
    _check_learning_rate(learning_rate)
    _check_learning_rate(final_learning_rate)
    if not isinstance(decay_steps, int) or isinstance(decay_steps, bool) or decay_steps < 1:
        raise ValueError(f"decay_steps must be a positive int, got {decay_steps!r}")
    return lambda step: min(step - 1, decay_steps) / decay_steps


def adamw(
    learning_rate: float | Schedule = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Optimizer:
    """Adam with decoupled weight decay, step for step the update of ``torch.optim.AdamW``.

    Each update first shrinks the parameters by ``lr * weight_decay``, then takes the Adam step with
    bias-corrected moments. The state holds ``exp_avg`` and ``exp_avg_sq`` and the number of updates
    made, ``step``. A trainable leaf stored in 16 bits (bf16, fp16) gets a float32 master copy in
    ``master``, float32 moments, and the update in float32; the leaf is the master rounded. (Updated in
    place, a bf16 weight would lose every step smaller than half its spacing, ``|w|·2⁻⁸``: most of them
    at fine-tuning rates.) Per trained 16-bit number that is 12 bytes of state instead of 4.

    >>> opt = adamw(learning_rate=constant_with_warmup(1e-2, warmup_steps=10))
    >>> state = opt.init({"w": torch.zeros(3)})
    >>> sorted(state), state["step"]
    (['exp_avg', 'exp_avg_sq', 'step'], 0)
    >>> state = opt.init({"w": torch.zeros(3, dtype=torch.bfloat16)})
    >>> sorted(state), state["master"]["w"].dtype, state["exp_avg"]["w"].dtype
    (['exp_avg', 'exp_avg_sq', 'master', 'step'], torch.float32, torch.float32)
    """
    schedule = as_schedule(learning_rate)
    beta1, beta2 = _checked_betas(betas)
    _check_non_negative(eps=eps, weight_decay=weight_decay)

    def init(trainable: Tensors) -> OptimizerState:
        return _with_master_weights({"step": 0, "exp_avg": _zeros(trainable), "exp_avg_sq": _zeros(trainable)}, trainable)

    @torch.no_grad()
    def update(grads: Tensors, state: OptimizerState, trainable: Tensors) -> tuple[Tensors, OptimizerState]:
        paths, params, grad_list = _update_inputs(grads, state, trainable)
        step = state["step"] + 1
        lr = schedule(step)
        decayed = torch._foreach_mul(params, 1.0 - lr * weight_decay)
        exp_avg = torch._foreach_lerp([state["exp_avg"][p] for p in paths], grad_list, 1.0 - beta1)
        exp_avg_sq = torch._foreach_mul([state["exp_avg_sq"][p] for p in paths], beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad_list, grad_list, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1**step)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**step))
        torch._foreach_add_(denom, eps)
        new_params = dict(zip(paths, torch._foreach_addcdiv(decayed, exp_avg, denom, value=-step_size)))
        new_state = {"step": step, "exp_avg": dict(zip(paths, exp_avg)), "exp_avg_sq": dict(zip(paths, exp_avg_sq))}
        return _finished(new_params, new_state, state, trainable)

    settings = {"optimizer": "adamw", "learning_rate": schedule_settings(schedule), "betas": [beta1, beta2], "eps": eps,
                "weight_decay": weight_decay}
    return Optimizer(init, update, schedule, settings)


def sgd(
    learning_rate: float | Schedule = 1e-3, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0
) -> Optimizer:
    """Stochastic gradient descent with (heavy-ball or Nesterov) momentum, step for step the update of
    ``torch.optim.SGD`` (no dampening): ``weight_decay`` adds ``weight_decay * param`` to the gradient.

    The state holds the ``momentum`` buffers (none when ``momentum=0``), the number of updates made,
    ``step``, and float32 ``master`` weights for 16-bit leaves as in :func:`adamw`.

    >>> opt = sgd(learning_rate=0.5, momentum=0.5)
    >>> trainable, state = {"w": torch.zeros(1)}, opt.init({"w": torch.zeros(1)})
    >>> for _ in range(2):
    ...     trainable, state = opt.update({"w": torch.ones(1)}, state, trainable)
    >>> trainable["w"], state["momentum"]["w"]
    (tensor([-1.2500]), tensor([1.5000]))
    """
    schedule = as_schedule(learning_rate)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if nesterov and not momentum:
        raise ValueError("nesterov=True needs a momentum above 0")
    _check_non_negative(weight_decay=weight_decay)

    def init(trainable: Tensors) -> OptimizerState:
        return _with_master_weights({"step": 0, **({"momentum": _zeros(trainable)} if momentum else {})}, trainable)

    @torch.no_grad()
    def update(grads: Tensors, state: OptimizerState, trainable: Tensors) -> tuple[Tensors, OptimizerState]:
        paths, params, grad_list = _update_inputs(grads, state, trainable)
        if weight_decay:
            grad_list = torch._foreach_add(grad_list, params, alpha=weight_decay)
        step = state["step"] + 1
        new_state = {"step": step}
        direction = grad_list
        if momentum:
            buffers = torch._foreach_mul([state["momentum"][p] for p in paths], momentum)
            torch._foreach_add_(buffers, grad_list)
            new_state["momentum"] = dict(zip(paths, buffers))
            direction = torch._foreach_add(grad_list, buffers, alpha=momentum) if nesterov else buffers
        new_params = dict(zip(paths, torch._foreach_add(params, direction, alpha=-schedule(step))))
        return _finished(new_params, new_state, state, trainable)

    settings = {"optimizer": "sgd", "learning_rate": schedule_settings(schedule), "momentum": momentum,
                "nesterov": nesterov, "weight_decay": weight_decay}
    return Optimizer(init, update, schedule, settings)


def lion(learning_rate: float | Schedule = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> Optimizer:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): each number moves by
    exactly the learning rate, in the sign of ``betas[0]``-interpolated momentum and gradient, after a
    decoupled decay by ``lr * weight_decay``; the momentum ``exp_avg`` then moves with ``betas[1]``.
    One state tensor per leaf (half of AdamW's), and float32 ``master`` weights for 16-bit leaves.

    >>> opt = lion(learning_rate=0.1)
    >>> trainable, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init({"w": torch.zeros(2)}), {"w": torch.zeros(2)})
    >>> trainable["w"], state["exp_avg"]["w"]
    (tensor([-0.1000,  0.1000]), tensor([ 0.0300, -0.0050]))
    """
    schedule = as_schedule(learning_rate)
    beta1, beta2 = _checked_betas(betas)
    _check_non_negative(weight_decay=weight_decay)

    def init(trainable: Tensors) -> OptimizerState:
        return _with_master_weights({"step": 0, "exp_avg": _zeros(trainable)}, trainable)

    @torch.no_grad()
    def update(grads: Tensors, state: OptimizerState, trainable: Tensors) -> tuple[Tensors, OptimizerState]:
        paths, params, grad_list = _update_inputs(grads, state, trainable)
        exp_avg = [state["exp_avg"][p] for p in paths]
        step = state["step"] + 1
        lr = schedule(step)
        signs = torch._foreach_sign(torch._foreach_lerp(exp_avg, grad_list, 1.0 - beta1))
        new_params = torch._foreach_mul(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(new_params, signs, alpha=-lr)
        new_state = {"step": step, "exp_avg": dict(zip(paths, torch._foreach_lerp(exp_avg, grad_list, 1.0 - beta2)))}
        return _finished(dict(zip(paths, new_params)), new_state, state, trainable)

    settings = {"optimizer": "lion", "learning_rate": schedule_settings(schedule), "betas": [beta1, beta2],
                "weight_decay": weight_decay}
    return Optimizer(init, update, schedule, settings)


def _zeros(trainable: Tensors) -> Tensors:
    """A state slot: zeros like each leaf, in the dtype its update uses."""
    return {path: torch.zeros_like(x, dtype=_update_dtype(x)) for path, x in trainable.items()}


def _with_master_weights(state: OptimizerState, trainable: Tensors) -> OptimizerState:
    """``state`` with float32 ``master`` copies of the 16-bit leaves, if there are any."""
    master = {path: x.detach().float() for path, x in trainable.items() if _update_dtype(x) != x.dtype}
    return {**state, "master": master} if master else state


def _update_inputs(grads: Tensors, state: OptimizerState, trainable: Tensors):
    """``(paths, the values the update starts from, the gradients in their dtypes)``, in the order of ``trainable``;
    a value is the master copy where there is one."""
    _check_same_paths(grads, trainable)
    master = state.get("master", {})
    params = [master.get(path, x) for path, x in trainable.items()]
    return list(trainable), params, [grads[path].to(x.dtype) for path, x in zip(trainable, params)]


def _finished(new_params: Tensors, new_state: OptimizerState, state: OptimizerState, trainable: Tensors):
    """``(new trainable leaves in their own dtypes, new_state with the new master copies)``."""
    if "master" in state:
        new_state["master"] = {path: new_params[path] for path in state["master"]}
    return {path: new_params[path].to(x.dtype) for path, x in trainable.items()}, new_state


def _update_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a leaf's optimizer state and update use: float32 for 16-bit floats, else its own."""
    return torch.float32 if x.is_floating_point() and x.element_size() < 4 else x.dtype


def global_norm(grads: Tensors) -> torch.Tensor:
    """The 2-norm of all gradients taken together, as a float32 scalar tensor.

    >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    if not grads:
        raise ValueError("global_norm needs at least one gradient, got an empty dict")
    norms = torch._foreach_norm(list(grads.values()), 2)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]), 2)


def clip_by_global_norm(grads: Tensors, max_norm: float, norm: torch.Tensor | None = None) -> tuple[Tensors, torch.Tensor]:
    """``(clipped grads, norm before clipping)``: grads scaled down so their global norm is at most ``max_norm``.

    Uses the formula of ``torch.nn.utils.clip_grad_norm_``: a scale of ``max_norm / (norm + 1e-6)``,
    applied only when it is below 1. ``norm`` defaults to :func:`global_norm` of ``grads``; pass the
    norm over all ranks when ``grads`` are one rank's shards (:func:`dsf.training.distributed.clip_by_global_norm`).

    >>> clipped, norm = clip_by_global_norm({"g": torch.tensor([6.0, 8.0])}, max_norm=5.0)
    >>> clipped["g"], norm
    (tensor([3.0000, 4.0000]), tensor(10.))
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}; pass max_grad_norm=None to turn clipping off")
    norm = global_norm(grads) if norm is None else norm
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    paths = list(grads)
    clipped = torch._foreach_mul([grads[p] for p in paths], [scale.to(grads[p].device, grads[p].dtype) for p in paths])
    return dict(zip(paths, clipped)), norm


def _check_learning_rate(learning_rate) -> None:
    if not isinstance(learning_rate, (int, float)) or not learning_rate >= 0:
        raise ValueError(f"learning_rate must be a non-negative number, got {learning_rate!r}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")


def _checked_betas(betas) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _check_same_paths(grads: Tensors, trainable: Tensors) -> None:
    missing, unexpected = sorted(set(trainable) - set(grads)), sorted(set(grads) - set(trainable))
    if missing or unexpected:
        raise ValueError(
            f"grads and trainable leaves differ: missing grads for {missing}, grads without a leaf for {unexpected}; "
            "compute grads with the same where= that selected the trainable leaves"
        )
