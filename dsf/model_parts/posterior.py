"""The diagonal Gaussian posterior of a KL autoencoder: its encoder's moments (mean ‖ log-variance) to latents.

Example:
    >>> import torch, dsf
    >>> moments = torch.cat([torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), -100.0)], dim=1)
    >>> posterior_latents(moments).shape, bool(posterior_latents(moments, dsf.random.key(0)).sub(1).abs().max() < 1e-4)
    (torch.Size([1, 2, 3, 3]), True)
"""

from __future__ import annotations

import torch

from dsf.random import Key, normal

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


def posterior_latents(moments: torch.Tensor, key: Key | None = None) -> torch.Tensor:
    """Latents of the posterior whose moments are (B, 2·C, ...), the mean then the log-variance on axis 1:
    the mean (B, C, ...), or with a ``key`` a sample ``mean + std·ε``.

    >>> moments = torch.tensor([[2.0, 0.0]])
    >>> posterior_latents(moments).tolist(), posterior_latents(moments, __import__("dsf").random.key(0)).shape
    ([[2.0]], torch.Size([1, 1]))
    """
    mean, logvar = moments.chunk(2, dim=1)
    if key is None:
        return mean
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    return mean + std * normal(key, mean.shape, device=mean.device, dtype=mean.dtype)
