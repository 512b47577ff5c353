"""Preference optimization of a diffusion model against a frozen reference: Diffusion-DPO.

Diffusion-DPO (Wallace et al., 2023) trains on pairs of a preferred and a rejected sample of the same
condition. Both are noised with the same noise level and noise (the same key through
:func:`dsf.diffusion.losses.noised`), and the policy's per-sample errors are compared with a frozen
reference's::

    margin = -beta * ((policy_preferred - reference_preferred) - (policy_rejected - reference_rejected))
    loss   = mean(-logsigmoid(margin))

The margin is the implicit reward margin: positive when the policy, more than the reference, fits the
preferred sample better than the rejected one. At policy == reference it is 0 and the loss is log 2.
(diffusers' ``train_diffusion_dpo.py`` writes ``-0.5 * beta_dpo``: its ``beta_dpo`` is ``2 * beta`` here.)

Example:
    >>> import torch, dsf
    >>> def model(params, x, sigma):
    ...     return params * x
    >>> preferred, rejected = torch.ones(2, 4), -torch.ones(2, 4)
    >>> loss, metrics = diffusion_dpo_loss(model, torch.tensor(0.5), torch.tensor(0.5), preferred, rejected,
    ...                                    dsf.random.key(0), beta=100.0)
    >>> round(loss.item(), 4), metrics["reward_margin"].item()  # log 2: the policy is the reference
    (0.6931, 0.0)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsf import random
from dsf.diffusion.losses import flow_matching_loss


def dpo_loss_from_errors(policy_preferred: torch.Tensor, policy_rejected: torch.Tensor, reference_preferred: torch.Tensor,
                         reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of Diffusion-DPO from per-sample errors (one per pair, e.g. flow-matching MSEs).

    ``metrics``: ``reward_margin`` (the mean margin, see the module docstring) and
    ``preference_accuracy`` (the fraction of pairs with a positive margin), detached.

    >>> import math
    >>> loss, metrics = dpo_loss_from_errors(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]),
    ...                                      torch.tensor([1.5]), beta=2.0)
    >>> metrics["reward_margin"].item(), math.isclose(loss.item(), math.log1p(math.exp(-2.0)), rel_tol=1e-6)
    (2.0, True)
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive (how strongly the policy may leave the reference), got {beta!r}")
    errors = (policy_preferred, policy_rejected, reference_preferred, reference_rejected)
    if len({tuple(e.shape) for e in errors}) != 1 or policy_preferred.ndim != 1:
        shapes = [tuple(e.shape) for e in errors]
        raise ValueError(f"the four error vectors must be one per pair and of one length, got shapes {shapes}")
    margin = -beta * ((policy_preferred - reference_preferred) - (policy_rejected - reference_rejected))
    metrics = {"reward_margin": margin.detach().mean(), "preference_accuracy": (margin.detach() > 0).float().mean()}
    return -F.logsigmoid(margin).mean(), metrics


def diffusion_dpo_loss(model_fn: Callable[..., torch.Tensor], params, reference_params, preferred: torch.Tensor,
                       rejected: torch.Tensor, key: random.Key, cond: dict | None = None, *, beta: float,
                       reference_cond: dict | None = None, weighted: bool = False,
                       **draw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of Diffusion-DPO of ``model_fn`` at ``params`` against ``reference_params``
    (no gradient) on pairs ``preferred[i]``/``rejected[i]`` under one ``cond`` (the reference's own
    ``reference_cond`` when its conditioning differs, e.g. text states of a text encoder being trained).

    Each error is :func:`dsf.diffusion.losses.flow_matching_loss` with ``reduction="none"`` and the same
    ``key``, so a pair shares its noise level and noise; ``weighted=False`` takes the plain per-sample
    MSE as the DPO paper does, and ``draw`` (``schedule=``, ``parameterization=``, timestep boundaries)
    goes to the loss as it is. The reference runs under ``torch.no_grad``. Returns what
    :func:`dpo_loss_from_errors` returns; train it with ``has_aux=True``.

    >>> import dsf
    >>> def model(params, x, sigma):
    ...     return params * x
    >>> loss, metrics = diffusion_dpo_loss(model, torch.tensor(0.9), torch.tensor(1.0), torch.ones(3, 4),
    ...                                    torch.zeros(3, 4), dsf.random.key(0), beta=10.0)
    >>> loss.shape, sorted(metrics)
    (torch.Size([]), ['preference_accuracy', 'reward_margin'])
    """
    if preferred.shape != rejected.shape:
        raise ValueError(f"preferred {tuple(preferred.shape)} and rejected {tuple(rejected.shape)} samples must pair up: "
                         "give them one shape")

    def errors(at_params, x0, at_cond):
        return flow_matching_loss(model_fn, at_params, x0, key, at_cond, weighted=weighted, reduction="none", **draw)

    policy = errors(params, preferred, cond), errors(params, rejected, cond)
    reference_cond = cond if reference_cond is None else reference_cond
    with torch.no_grad():
        reference = errors(reference_params, preferred, reference_cond), errors(reference_params, rejected, reference_cond)
    return dpo_loss_from_errors(*policy, *reference, beta=beta)
