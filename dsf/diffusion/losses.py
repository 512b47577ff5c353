"""Training losses: draw a noise level per sample, noise the data, regress the model's prediction.

Timesteps are drawn as uniform indices into the schedule's shifted 1000-step training grid
(uniform indices over a shifted grid = shifted-σ sampling), as DiffSynth-Studio trains. All
randomness comes from the key: the same key gives the same loss bit-for-bit.

:func:`noised` is the draw under the loss, per sample (``x_t``, σ, target, weight), and
``flow_matching_loss(..., reduction="none")`` the per-sample losses: what a paradigm that weighs or
compares samples (Diffusion-DPO, reward weighting, min-SNR) builds on.

Example:
    >>> import torch, dsf
    >>> from dsf.diffusion.losses import flow_matching_loss
    >>> def model(params, x, sigma):
    ...     return params * x
    >>> loss = flow_matching_loss(model, torch.tensor(1.0), torch.zeros(2, 4), dsf.random.key(0))
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from dsf import random
from dsf.diffusion.schedules import FLOW_MATCHING, FLUX1, FlowSchedule, Parameterization, training_weights


def timestep_range(
    num_timesteps: int, min_timestep_boundary: float = 0.0, max_timestep_boundary: float = 1.0
) -> tuple[int, int]:
    """The index range ``[int(min·n), int(max·n))`` of an ``n``-step training grid (index 0 is the
    noisiest); e.g. Wan2.2's high-noise expert trains on ``max_timestep_boundary=0.417``.

    >>> timestep_range(1000, 0.0, 0.417)
    (0, 417)
    """
    if not 0 <= min_timestep_boundary < max_timestep_boundary <= 1:
        raise ValueError(
            f"timestep boundaries must satisfy 0 <= min < max <= 1, got min_timestep_boundary="
            f"{min_timestep_boundary}, max_timestep_boundary={max_timestep_boundary}"
        )
    low, high = int(min_timestep_boundary * num_timesteps), int(max_timestep_boundary * num_timesteps)
    if low >= high:
        raise ValueError(
            f"timestep boundaries [{min_timestep_boundary}, {max_timestep_boundary}) select no index of a "
            f"{num_timesteps}-step grid; widen them to at least 1/{num_timesteps}"
        )
    return low, high


def timestep_indices(
    key: random.Key,
    batch_size: int,
    num_timesteps: int = 1000,
    min_timestep_boundary: float = 0.0,
    max_timestep_boundary: float = 1.0,
) -> torch.Tensor:
    """One training-grid index per sample, uniform in :func:`timestep_range`.

    >>> import dsf
    >>> idx = timestep_indices(dsf.random.key(0), 8, 1000, 0.5, 1.0)
    >>> bool(((idx >= 500) & (idx < 1000)).all())
    True
    """
    low, high = timestep_range(num_timesteps, min_timestep_boundary, max_timestep_boundary)
    return random.randint(key, low, high, (batch_size,))


def drop_prompts(key: random.Key, prompts: Sequence[str], probability: float) -> list[str]:
    """``prompts`` with each replaced by the empty prompt with ``probability`` (drawn from ``key``), so a
    model trained on them also learns the unconditional velocity that classifier-free guidance needs.

    >>> import dsf
    >>> drop_prompts(dsf.random.key(0), ["a cat"] * 4, 0.0), drop_prompts(dsf.random.key(0), ["a cat"] * 2, 1.0)
    (['a cat', 'a cat', 'a cat', 'a cat'], ['', ''])
    """
    dropped = random.uniform(key, (len(prompts),)) < probability
    return ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]


class Noised(NamedTuple):
    """One training draw per sample: the noised input, its noise level, the regression target and the loss weight."""

    x_t: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def noised(
    key: random.Key,
    x0: torch.Tensor,
    schedule: FlowSchedule = FLUX1,
    parameterization: Parameterization = FLOW_MATCHING,
    *,
    min_timestep_boundary: float = 0.0,
    max_timestep_boundary: float = 1.0,
    weighted: bool = True,
) -> Noised:
    """What :func:`flow_matching_loss` draws for ``x0`` from ``key``: ``(x_t, sigma, target, weight)``.

    Per sample: an index into ``schedule.training_sigmas()`` (see :func:`timestep_indices`), noise
    ε ~ N(0, 1) drawn in float32 and cast to ``x0``'s dtype, ``x_t = add_noise(x0, ε, σ)``, the
    parameterization's ``target`` and the float32 weight :func:`dsf.diffusion.schedules.training_weights`
    (all 1 when ``weighted=False``). The key is split into an index key and a noise key.

    >>> import torch, dsf
    >>> x_t, sigma, target, weight = noised(dsf.random.key(0), torch.zeros(2, 4))
    >>> x_t.shape, sigma.shape, weight.shape, torch.equal(target, x_t / sigma[:, None])
    (torch.Size([2, 4]), torch.Size([2]), torch.Size([2]), True)
    """
    grid = schedule.training_sigmas()
    index_key, noise_key = random.split(key)
    index = timestep_indices(index_key, x0.shape[0], len(grid), min_timestep_boundary, max_timestep_boundary)
    sigma = grid[index].to(x0.device)
    noise = random.normal(noise_key, x0.shape, device=x0.device, dtype=x0.dtype)
    weight = training_weights(grid)[index].to(x0.device) if weighted else torch.ones(x0.shape[0], device=x0.device)
    return Noised(parameterization.add_noise(x0, noise, sigma), sigma, parameterization.target(x0, noise, sigma), weight)


def flow_matching_loss(
    model_fn: Callable[..., torch.Tensor],
    params,
    x0: torch.Tensor,
    key: random.Key,
    cond: dict | None = None,
    *,
    schedule: FlowSchedule = FLUX1,
    parameterization: Parameterization = FLOW_MATCHING,
    min_timestep_boundary: float = 0.0,
    max_timestep_boundary: float = 1.0,
    weighted: bool = True,
    scored: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over the batch of ``w(σ_i)·MSE(model_fn(params, x_t, σ, **cond), target)`` (float32 scalar),
    or with ``reduction="none"`` the per-sample terms ``w(σ_i)·MSE_i`` (float32, one per sample).

    ``x_t``, σ, the target and ``w`` are what :func:`noised` draws from ``key`` (``w`` all 1 when
    ``weighted=False``). ``scored`` picks the part of prediction and target the error is taken
over (e.g. ``lambda t: t[:, :, 1:]`` leaves out a conditioning first frame); all of it when None.

    >>> import torch, dsf
    >>> def model(params, x, sigma):
    ...     return params * x
    >>> params = torch.tensor(1.0, requires_grad=True)
    >>> loss = flow_matching_loss(model, params, torch.randn(2, 3, 4, 4), dsf.random.key(1), weighted=False)
    >>> torch.autograd.grad(loss, params)[0].shape
    torch.Size([])
    >>> flow_matching_loss(model, params, torch.randn(2, 3, 4, 4), dsf.random.key(1), reduction="none").shape
    torch.Size([2])
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' (the batch mean) or 'none' (one loss per sample), got {reduction!r}")
    x_t, sigma, target, weight = noised(
        key, x0, schedule, parameterization, min_timestep_boundary=min_timestep_boundary,
        max_timestep_boundary=max_timestep_boundary, weighted=weighted,
    )
    pred = model_fn(params, x_t, sigma, **(cond or {}))
    if pred.shape != target.shape:
        raise ValueError(
            f"model_fn returned shape {tuple(pred.shape)}, expected the latent shape {tuple(target.shape)}"
        )
    if scored is not None:
        pred, target = scored(pred), scored(target)
    per_sample = weight * (pred.float() - target.float()).square().reshape(x0.shape[0], -1).mean(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()
