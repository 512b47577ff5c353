"""Deterministic sampling: walk a σ schedule down to 0, one model call (two with guidance) per step.

Each step splits the latent into ``(x0_hat, ε_hat)`` with the parameterization's 2×2 inverse and
rebuilds it at the next σ. For flow matching that is the Euler step ``x + (σ_next - σ)·v``; for
ε- and v-prediction it is DDIM. The sampler is pure in ``params`` and never disables autograd:
wrap the call in ``torch.no_grad()`` for inference, leave it on to differentiate through sampling.

Example:
    >>> import torch
    >>> from dsf.diffusion.sampling import sample
    >>> from dsf.diffusion.schedules import WAN
    >>> x0 = torch.ones(1, 4)
    >>> def velocity(params, x, sigma):  # the exact flow towards x0
    ...     return (x - x0) / sigma[:, None]
    >>> out = sample(velocity, None, torch.randn(1, 4), WAN.sigmas(3), progress=False)
    >>> torch.allclose(out, x0)
    True
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from dsf.diffusion.schedules import FLOW_MATCHING, Parameterization

ModelFn = Callable[..., torch.Tensor]


def guided_prediction(
    model_fn: ModelFn,
    params,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: dict | None = None,
    *,
    negative_cond: dict | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Classifier-free guidance ``neg + cfg_scale·(pos - neg)``; one model call when ``cfg_scale == 1``.

    >>> import torch
    >>> def model(params, x, sigma, shift):
    ...     return x + shift
    >>> x, sigma = torch.zeros(1, 2), torch.ones(1)
    >>> guided_prediction(model, None, x, sigma, {"shift": 1.0}, negative_cond={"shift": 0.0}, cfg_scale=3.0)
    tensor([[3., 3.]])
    """
    _check_guidance(cfg_scale, negative_cond)
    positive = model_fn(params, x, sigma, **(cond or {}))
    if cfg_scale == 1.0:
        return positive
    negative = model_fn(params, x, sigma, **negative_cond)
    return negative + cfg_scale * (positive - negative)


def step(
    x: torch.Tensor,
    pred: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    parameterization: Parameterization = FLOW_MATCHING,
) -> torch.Tensor:
    """Move ``x`` from σ to ``sigma_next`` given the model's prediction (computed in float32, returned in
    ``x``'s dtype). σ's are (B,) tensors or scalars.

    >>> import torch
    >>> step(torch.ones(1, 2), torch.full((1, 2), 2.0), torch.tensor([1.0]), torch.tensor([0.5]))
    tensor([[0., 0.]])
    """
    x0_hat, noise_hat = parameterization.decompose_unchecked(x.float(), pred.float(), sigma)
    return parameterization.add_noise(x0_hat, noise_hat, sigma_next).to(x.dtype)


def sample(
    model_fn: ModelFn,
    params,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict | None = None,
    *,
    negative_cond: dict | None = None,
    cfg_scale: float = 1.0,
    parameterization: Parameterization = FLOW_MATCHING,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Denoise ``noise`` (the latent at ``sigmas[0]``, see :func:`start_latents`) through ``sigmas``
    and a final σ=0.

    ``model_fn(params, x, sigma, **cond)`` gets ``sigma`` as a (B,) float32 tensor in ``[0, 1]`` on
    ``x``'s device. ``cond`` and ``negative_cond`` are dicts of keyword arguments; ``cfg_scale != 1``
    needs ``negative_cond``.

    >>> import torch
    >>> from dsf.diffusion.schedules import FLUX1
    >>> def model(params, x, sigma, scale):
    ...     return params * scale * x
    >>> noise = torch.ones(1, 1, 2, 2)
    >>> out = sample(model, torch.tensor(0.5), noise, FLUX1.sigmas(4), {"scale": 2.0}, progress=False)
    >>> out.shape
    torch.Size([1, 1, 2, 2])
    """
    _check_guidance(cfg_scale, negative_cond)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    if sigmas.ndim != 1 or len(sigmas) == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    parameterization.check_invertible(sigmas)
    levels = torch.cat([sigmas, sigmas.new_zeros(1)]).to(noise.device)
    batch_size = noise.shape[0]
    x = noise
    for i in tqdm(range(len(sigmas)), desc=desc, disable=not progress):
        sigma, sigma_next = levels[i].repeat(batch_size), levels[i + 1].repeat(batch_size)
        pred = guided_prediction(
            model_fn, params, x, sigma, cond, negative_cond=negative_cond, cfg_scale=cfg_scale
        )
        x = step(x, pred, sigma, sigma_next, parameterization)
    return x


def start_latents(
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor | None = None,
    parameterization: Parameterization = FLOW_MATCHING,
) -> torch.Tensor:
    """The latent to start :func:`sample` from: ``noise`` for text-to-image, or ``x0`` noised to
    ``sigmas[0]`` for image-to-image (``sigmas`` from ``schedule.sigmas(N, denoising_strength=...)``).

    >>> import torch
    >>> from dsf.diffusion.schedules import WAN
    >>> start_latents(WAN.sigmas(4, denoising_strength=0.5), torch.ones(1, 2), x0=torch.zeros(1, 2))
    tensor([[0.8333, 0.8333]])
    """
    if x0 is None:
        return noise
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    sigma = torch.as_tensor(sigmas, dtype=torch.float32)[0].repeat(x0.shape[0])
    return parameterization.add_noise(x0, noise, sigma)


def _check_guidance(cfg_scale: float, negative_cond: dict | None) -> None:
    if cfg_scale != 1.0 and negative_cond is None:
        raise ValueError(
            f"cfg_scale={cfg_scale} needs negative_cond (the unconditional/negative keyword arguments); "
            f"pass negative_cond or use cfg_scale=1.0"
        )
