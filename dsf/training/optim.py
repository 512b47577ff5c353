"""Functional optimizers over flat ``{path: tensor}`` dicts of trainable leaves.

An :class:`Optimizer` is a pair of pure functions in the style of optax: ``init(trainable) -> state``
and ``update(grads, state, trainable) -> (new_trainable, new_state)``. Nothing is updated in place:
the inputs stay valid, so a caller can keep the previous step around or compare it. The state is a
plain dict of tensors and an integer step, ready for :func:`dsf.training.checkpoint.save_state`.

A learning-rate schedule is any ``step -> float`` function, where ``step`` counts updates from 1
(the first update uses ``schedule(1)``).

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
from typing import Callable

import torch

Schedule = Callable[[int], float]
Tensors = dict[str, torch.Tensor]
OptimizerState = dict  # {"step": int, <slot name>: {path: tensor}, ...}


@dataclass(frozen=True)
class Optimizer:
    """``init(trainable) -> state`` and ``update(grads, state, trainable) -> (new_trainable, new_state)``."""

    init: Callable[[Tensors], OptimizerState]
    update: Callable[[Tensors, OptimizerState, Tensors], tuple[Tensors, OptimizerState]]


def constant(learning_rate: float) -> Schedule:
    """The schedule that is ``learning_rate`` at every step.

    >>> constant(1e-3)(10)
    0.001
    """
    _check_learning_rate(learning_rate)
    return lambda step: learning_rate


def constant_with_warmup(learning_rate: float, warmup_steps: int) -> Schedule:
    """Linear warm-up from ``learning_rate / warmup_steps`` at step 1 to ``learning_rate`` at ``warmup_steps``, then constant.

    >>> schedule = constant_with_warmup(1.0, warmup_steps=4)
    >>> [schedule(step) for step in range(1, 7)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    _check_learning_rate(learning_rate)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    return lambda step: learning_rate * min(1.0, step / warmup_steps) if warmup_steps else learning_rate


def as_schedule(learning_rate: float | Schedule) -> Schedule:
    """A schedule as it is, or a number as a :func:`constant` schedule.

    >>> as_schedule(0.5)(3), as_schedule(lambda step: 1 / step)(4)
    (0.5, 0.25)
    """
    return learning_rate if callable(learning_rate) else constant(learning_rate)


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
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")

    def init(trainable: Tensors) -> OptimizerState:
        state = {
            "step": 0,
            "exp_avg": {path: torch.zeros_like(x, dtype=_update_dtype(x)) for path, x in trainable.items()},
            "exp_avg_sq": {path: torch.zeros_like(x, dtype=_update_dtype(x)) for path, x in trainable.items()},
        }
        master = {path: x.detach().float() for path, x in trainable.items() if _update_dtype(x) != x.dtype}
        return {**state, "master": master} if master else state

    @torch.no_grad()
    def update(grads: Tensors, state: OptimizerState, trainable: Tensors) -> tuple[Tensors, OptimizerState]:
        _check_same_paths(grads, trainable)
        paths = list(trainable)
        master = state.get("master", {})
        params = [master.get(p, trainable[p]) for p in paths]
        grad_list = [grads[p].to(x.dtype) for p, x in zip(paths, params)]
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
        if master:
            new_state["master"] = {p: new_params[p] for p in master}
        return {p: new_params[p].to(trainable[p].dtype) for p in paths}, new_state

    return Optimizer(init, update)


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
