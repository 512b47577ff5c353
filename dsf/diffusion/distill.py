"""Direct distillation: a few-step student learns to land where a many-step teacher lands.

The student samples with few steps (e.g. 4) and classifier-free guidance off, with gradients
through every sampler step; the loss is the mean squared distance of its result to the teacher's
many-step (e.g. 50) guided result from the same noise and prompt. Teacher results come from a
dataset (generated offline) or are computed on the fly, once per key, by a :class:`TeacherCache`.

Example:
    >>> import torch, dsf
    >>> from dsf.diffusion.schedules import FlowSchedule
    >>> def velocity(params, x, sigma):
    ...     return params["v"] * x
    >>> params, noise = {"v": torch.tensor(0.5)}, torch.ones(2, 4)
    >>> target = torch.zeros(2, 4)
    >>> def loss(params):
    ...     return direct_distill_loss(velocity, params, noise, FlowSchedule().sigmas(4), target)
    >>> value, grads = dsf.value_and_grad(loss)(params)
    >>> round(value.item(), 4), bool(grads["v"] < 0)  # a faster flow lands closer to the zero target
    (0.3436, True)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from dsf.diffusion.sampling import ModelFn, sample
from dsf.diffusion.schedules import FLOW_MATCHING, Parameterization


def direct_distill_loss(
    model_fn: ModelFn,
    params,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    target: torch.Tensor,
    cond: dict | None = None,
    *,
    negative_cond: dict | None = None,
    cfg_scale: float = 1.0,
    parameterization: Parameterization = FLOW_MATCHING,
) -> torch.Tensor:
    """Mean squared distance (float32 scalar) between the student's sample of ``noise`` through
    ``sigmas`` and ``target``; differentiable in ``params`` through every step.

    >>> import torch
    >>> from dsf.diffusion.schedules import FlowSchedule
    >>> velocity = lambda params, x, sigma: params * x
    >>> direct_distill_loss(velocity, torch.tensor(0.0), torch.ones(1, 2), FlowSchedule().sigmas(2), torch.ones(1, 2))
    tensor(0.)
    """
    student = sample(model_fn, params, noise, sigmas, cond, negative_cond=negative_cond, cfg_scale=cfg_scale,
                     parameterization=parameterization, progress=False)
    if student.shape != target.shape:
        raise ValueError(
            f"teacher targets have shape {tuple(target.shape)} but the student samples {tuple(student.shape)}; "
            "give one target per noise, at the sampled resolution"
        )
    return (student.float() - target.float()).square().mean()


class TeacherCache:
    """Teacher results computed once per key and kept in memory.

    ``compute(keys) -> tensor (len(keys), ...)`` runs the teacher on the keys not seen before, in
    one batch and without gradients; ``cache(keys)`` stacks the results in the order of ``keys``.
    ``computed`` counts the keys the teacher has run on.

    >>> import torch
    >>> cache = TeacherCache(lambda keys: torch.tensor([float(k) for k in keys]))
    >>> cache([3, 1]).tolist(), cache([1, 3, 2]).tolist(), cache.computed
    ([3.0, 1.0], [1.0, 3.0, 2.0], 3)
    """

    def __init__(self, compute: Callable[[list], torch.Tensor]):
        self.compute = compute
        self.results: dict[Hashable, torch.Tensor] = {}

    @property
    def computed(self) -> int:
        return len(self.results)

    def __call__(self, keys: Sequence[Hashable]) -> torch.Tensor:
        missing = list(dict.fromkeys(k for k in keys if k not in self.results))
        if missing:
            with torch.no_grad():
                fresh = self.compute(missing)
            if len(fresh) != len(missing):
                raise ValueError(f"the teacher returned {len(fresh)} results for {len(missing)} keys; return one per key")
            self.results.update(zip(missing, fresh))
        return torch.stack([self.results[k] for k in keys])
