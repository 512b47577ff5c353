"""Noise schedules as data: how ``x_t`` is built, what the model predicts, and where σ goes.

Two records describe a diffusion process:

- :class:`Parameterization`: ``x_t = a(σ)·x0 + b(σ)·ε`` and ``pred = c(σ)·x0 + d(σ)·ε``.
  Flow matching, ε-prediction and v-prediction are instances; a sampler step inverts the 2×2 matrix
  ``[[a, b], [c, d]]`` to recover ``(x0, ε)`` and rebuilds ``x`` at the next σ.
- :class:`FlowSchedule`: the σ values a flow-matching model is called at (grid, shift, terminal
  stretch, image-to-image strength), plus the 1000-step training grid and its weights.

σ is always in ``[0, 1]`` (never ×1000). The templates (``FLUX1``, ``WAN``, ``QWEN_IMAGE``,
``QWEN_IMAGE_LIGHTNING``, ``FLUX2``, ``ZIMAGE``) reproduce DiffSynth-Studio's ``FlowMatchScheduler``;
override a field with ``dataclasses.replace(WAN, shift=3.0)``. :func:`from_diffusers_config` maps a
diffusers ``FlowMatchEulerDiscreteScheduler`` config onto a :class:`FlowSchedule`.

Example:
    >>> import torch
    >>> from dsf.diffusion.schedules import FLUX1, FLOW_MATCHING
    >>> FLUX1.sigmas(4)
    tensor([1.0000, 0.8577, 0.6022, 0.0089])
    >>> x0, noise, sigma = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0.25])
    >>> FLOW_MATCHING.add_noise(x0, noise, sigma)
    tensor([[0.2500, 0.2500]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Coefficient = Callable[[torch.Tensor], torch.Tensor]


def _broadcast(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample ``values`` (B,) reshaped to (B, 1, ..., 1) against ``like`` (B, ...)."""
    return values.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _as_sigma(sigma, batch_size: int) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if sigma.ndim > 1 or sigma.numel() not in (1, batch_size):
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample (shape ({batch_size},)), got shape "
            f"{tuple(sigma.shape)}"
        )
    return sigma


def _one_minus(sigma):
    return 1 - sigma


def _identity(sigma):
    return sigma


def _negated(sigma):
    return -sigma


def _ones(sigma):
    return torch.ones_like(sigma)


def _zeros(sigma):
    return torch.zeros_like(sigma)


def _minus_ones(sigma):
    return -torch.ones_like(sigma)


def _variance_preserving_signal(sigma):
    return torch.sqrt(1 - sigma * sigma)


@dataclass(frozen=True)
class Parameterization:
    """How ``x_t`` is built and what the model predicts, as four coefficient functions of σ.

    ``x_t = a(σ)·x0 + b(σ)·ε`` and ``pred = c(σ)·x0 + d(σ)·ε``. σ is a (B,) tensor (or a scalar)
    and broadcasts against latents of any rank (4-D images, 5-D video).

    >>> import torch
    >>> from dsf.diffusion.schedules import V_PREDICTION
    >>> x0, noise, sigma = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.8])
    >>> x_t = V_PREDICTION.add_noise(x0, noise, sigma)
    >>> x0_hat, noise_hat = V_PREDICTION.decompose(x_t, V_PREDICTION.target(x0, noise, sigma), sigma)
    >>> torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(noise_hat, noise, atol=1e-5)
    True
    """

    name: str
    a: Coefficient
    b: Coefficient
    c: Coefficient
    d: Coefficient

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """``x_t = a(σ)·x0 + b(σ)·ε``, in the dtype of ``x0``.

        >>> import torch
        >>> from dsf.diffusion.schedules import FLOW_MATCHING
        >>> FLOW_MATCHING.add_noise(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0.0, 1.0]))
        tensor([[0.],
                [1.]])
        """
        sigma = _as_sigma(sigma, x0.shape[0])
        a, b = (_broadcast(f(sigma), x0, x0.dtype) for f in (self.a, self.b))
        return a * x0 + b * noise.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """What the model should predict: ``c(σ)·x0 + d(σ)·ε``, in the dtype of ``x0``.

        >>> import torch
        >>> from dsf.diffusion.schedules import FLOW_MATCHING
        >>> FLOW_MATCHING.target(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.5]))
        tensor([[-1., -1.]])
        """
        sigma = _as_sigma(sigma, x0.shape[0])
        c, d = (_broadcast(f(sigma), x0, x0.dtype) for f in (self.c, self.d))
        return c * x0 + d * noise.to(x0.dtype)

    def check_invertible(self, sigma) -> None:
        """Raise ``ValueError`` where ``[[a, b], [c, d]]`` is singular, i.e. ``(x_t, pred)`` do not
        determine ``(x0, ε)``.

        >>> from dsf.diffusion.schedules import EPSILON
        >>> EPSILON.check_invertible([0.5, 1.0])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: epsilon: cannot recover (x0, noise) from (x_t, prediction) at sigma=1.0: the matrix ...
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        singular = ~(self._determinant(sigma).abs() > 1e-8)
        if singular.any():
            bad = sigma[singular][0].item()
            raise ValueError(
                f"{self.name}: cannot recover (x0, noise) from (x_t, prediction) at sigma={bad}: the "
                f"matrix [[a, b], [c, d]] is singular there; call the model only at sigmas where "
                f"a(σ)·d(σ) - b(σ)·c(σ) != 0 (e.g. start an epsilon-prediction schedule below 1)"
            )

    def decompose(self, x_t: torch.Tensor, pred: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, ε_hat)`` from the noisy latent and the model's prediction at σ.

        >>> import torch
        >>> from dsf.diffusion.schedules import FLOW_MATCHING
        >>> x_t, velocity, sigma = torch.full((1, 2), 0.5), torch.ones(1, 2), torch.tensor([0.5])
        >>> FLOW_MATCHING.decompose(x_t, velocity, sigma)
        (tensor([[0., 0.]]), tensor([[1., 1.]]))
        """
        self.check_invertible(sigma)
        return self.decompose_unchecked(x_t, pred, sigma)

    def decompose_unchecked(self, x_t: torch.Tensor, pred: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decompose` without the singularity check (no host sync); check the σ's beforehand
        with :meth:`check_invertible`.

        >>> import torch
        >>> from dsf.diffusion.schedules import FLOW_MATCHING
        >>> FLOW_MATCHING.decompose_unchecked(torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([0.5]))[0]
        tensor([[1.]])
        """
        sigma = _as_sigma(sigma, x_t.shape[0])
        a, b, c, d = (f(sigma) for f in (self.a, self.b, self.c, self.d))
        det = a * d - b * c
        dtype = torch.promote_types(x_t.dtype, pred.dtype)
        x0_from_x, x0_from_pred, noise_from_x, noise_from_pred = (
            _broadcast(coefficient, x_t, dtype) for coefficient in (d / det, -b / det, -c / det, a / det)
        )
        return x0_from_x * x_t + x0_from_pred * pred, noise_from_x * x_t + noise_from_pred * pred

    def _determinant(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.a(sigma) * self.d(sigma) - self.b(sigma) * self.c(sigma)


FLOW_MATCHING = Parameterization("flow_matching", a=_one_minus, b=_identity, c=_minus_ones, d=_ones)
"""Rectified flow: ``x_t = (1-σ)·x0 + σ·ε``, the model predicts the velocity ``ε - x0``."""

EPSILON = Parameterization("epsilon", a=_variance_preserving_signal, b=_identity, c=_zeros, d=_ones)
"""Variance preserving, ``x_t = sqrt(1-σ²)·x0 + σ·ε``; the model predicts ``ε``."""

V_PREDICTION = Parameterization(
    "v_prediction", a=_variance_preserving_signal, b=_identity, c=_negated, d=_variance_preserving_signal
)
"""Variance preserving; the model predicts ``v = sqrt(1-σ²)·ε - σ·x0``."""


def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``σ' = s·σ / (1 + (s-1)·σ)``: spends more steps at high noise when ``s > 1``.

    >>> import torch
    >>> static_shift(torch.tensor([0.0, 0.5, 1.0]), 3.0)
    tensor([0.0000, 0.7500, 1.0000])
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """``σ' = e^μ / (e^μ + 1/σ - 1)``; equals :func:`static_shift` with ``s = e^μ``.

    >>> import math, torch
    >>> exponential_shift(torch.tensor([0.0, 0.5, 1.0]), math.log(3.0))
    tensor([0.0000, 0.7500, 1.0000])
    """
    return math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)


def linear_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ linear in the image token count: ``base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len``.

    >>> round(linear_mu(4096, max_seq_len=8192, base_shift=0.5, max_shift=0.9), 6)  # Qwen-Image at 1024²
    0.693548
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def empirical_mu(seq_len: int, num_steps: int) -> float:
    """FLUX.2's fitted μ: linear in ``seq_len`` above 4300 tokens, else interpolated in ``num_steps``
    between fits at 10 and 200 steps.

    >>> round(empirical_mu(4096, 50), 6)
    2.023351
    """
    at_200_steps = 0.00016927 * seq_len + 0.45666666
    if seq_len > 4300:
        return at_200_steps
    at_10_steps = 8.73809524e-05 * seq_len + 1.89833333
    slope = (at_200_steps - at_10_steps) / 190.0
    return at_200_steps + slope * (num_steps - 200.0)


def stretch_to_terminal(sigma: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale ``1 - σ`` so the last σ becomes ``terminal`` (the first σ=1 stays 1).

    >>> import torch
    >>> stretch_to_terminal(torch.tensor([1.0, 0.5, 0.1]), 0.02)
    tensor([1.0000, 0.4556, 0.0200])
    """
    if not 0 <= terminal < 1:
        raise ValueError(f"shift_terminal must be in [0, 1), got {terminal}")
    one_minus = 1 - sigma
    if not one_minus[-1] > 0:
        raise ValueError(
            f"cannot stretch a schedule whose last sigma is {sigma[-1].item()} to terminal {terminal}: it must end "
            f"below 1 (use more than one step or a lower denoising_strength)"
        )
    return 1 - one_minus * ((1 - terminal) / one_minus[-1])


def training_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """Per-timestep loss weights over a training grid: a Gaussian bump around σ=0.5, shifted to
    reach 0 and scaled to mean 1 over 1000 steps (DiffSynth's rule for other lengths applies).

    >>> from dsf.diffusion.schedules import WAN
    >>> w = training_weights(WAN.training_sigmas())
    >>> round(w.mean().item(), 4), round(w.max().item(), 4), w[0].item()
    (1.0, 2.0764, 0.0)
    """
    if len(sigmas) < 2:
        raise ValueError(f"training weights need a grid of at least 2 sigmas, got {len(sigmas)}")
    bump = torch.exp(-2 * (sigmas.double() - 0.5) ** 2)
    lifted = bump - bump.min()
    weights = lifted * (1000 / lifted.sum())
    if len(sigmas) != 1000:
        weights = weights * (len(sigmas) / 1000)
        weights = weights + weights[1]
    return weights.float()


_GRIDS = ("inclusive", "exclusive")
_DYNAMIC_SHIFTS = (None, "linear", "empirical")


@dataclass(frozen=True)
class FlowSchedule:
    """Where a flow-matching sampler calls the model: a σ grid, then a shift, then a terminal stretch.

    Grid (with ``start = σ_min + (1 - σ_min)·denoising_strength``):

    - ``grid="inclusive"``: ``linspace(start, σ_min, N)`` (FLUX.1: σ_min = 0.003/1.002; diffusers);
    - ``grid="exclusive"``: ``linspace(start, σ_min, N+1)[:-1]`` (Wan, Qwen-Image, Z-Image: σ_min = 0);
    - ``sigma_min=None`` means ``σ_min = 1/N`` (FLUX.2).

    Shift (at most one kind): ``shift`` (static, :func:`static_shift`), or exponential
    (:func:`exponential_shift`) with μ from the image token count when ``dynamic_shift`` is
    ``"linear"`` (:func:`linear_mu` over ``base_/max_seq_len`` and ``base_/max_shift``) or
    ``"empirical"`` (:func:`empirical_mu`), else the fixed ``mu``. Then ``shift_terminal``
    (:func:`stretch_to_terminal`) if set.

    >>> from dsf.diffusion.schedules import FlowSchedule
    >>> FlowSchedule(shift=3.0).sigmas(4)
    tensor([1.0000, 0.9000, 0.7500, 0.5000])
    """

    grid: str = "exclusive"
    sigma_min: float | None = 0.0
    shift: float | None = None
    mu: float | None = None
    dynamic_shift: str | None = None
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    shift_terminal: float | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.grid not in _GRIDS:
            raise ValueError(f"grid must be one of {_GRIDS}, got {self.grid!r}")
        if self.dynamic_shift not in _DYNAMIC_SHIFTS:
            raise ValueError(f"dynamic_shift must be one of {_DYNAMIC_SHIFTS}, got {self.dynamic_shift!r}")
        if self.shift is not None and (self.mu is not None or self.dynamic_shift is not None):
            raise ValueError(
                f"a FlowSchedule has one kind of shift: got static shift={self.shift} together with "
                f"mu={self.mu}, dynamic_shift={self.dynamic_shift!r}; set shift=None or drop mu/dynamic_shift"
            )
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.sigma_min is not None and not 0 <= self.sigma_min < 1:
            raise ValueError(f"sigma_min must be in [0, 1) or None (meaning 1/num_steps), got {self.sigma_min}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1) or None, got {self.shift_terminal}")

    def mu_for(self, num_steps: int, image_seq_len: int | None = None) -> float | None:
        """The exponential-shift μ used for ``num_steps`` at ``image_seq_len`` tokens (None: no exponential shift).

        >>> from dsf.diffusion.schedules import QWEN_IMAGE, FLUX2
        >>> QWEN_IMAGE.mu_for(30), round(QWEN_IMAGE.mu_for(30, image_seq_len=6889), 6)
        (0.8, 0.834325)
        >>> round(FLUX2.mu_for(4, image_seq_len=4096), 6)
        2.29118
        """
        if self.dynamic_shift is not None and image_seq_len is not None:
            if self.dynamic_shift == "empirical":
                return empirical_mu(image_seq_len, num_steps)
            return linear_mu(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
        if self.dynamic_shift is not None and self.mu is None:
            raise ValueError(
                f"this schedule shifts by the image token count (dynamic_shift={self.dynamic_shift!r}) and "
                f"has no fixed mu: pass image_seq_len (e.g. (H // 16) * (W // 16)) or set mu"
            )
        return self.mu

    def sigmas(
        self, num_steps: int, denoising_strength: float = 1.0, image_seq_len: int | None = None
    ) -> torch.Tensor:
        """The ``num_steps`` σ's at which the model is called, float32, decreasing (the sampler
        appends the final 0). ``denoising_strength < 1`` starts lower, for image-to-image;
        ``image_seq_len`` (the image token count) matters only with ``dynamic_shift``.

        >>> from dsf.diffusion.schedules import WAN
        >>> WAN.sigmas(4, denoising_strength=0.5)
        tensor([0.8333, 0.7500, 0.6250, 0.4167])
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not 0 < denoising_strength <= 1:
            raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
        sigma = self._grid(num_steps, denoising_strength)
        mu = self.mu_for(num_steps, image_seq_len)
        if self.shift is not None:
            sigma = static_shift(sigma, self.shift)
        elif mu is not None:
            sigma = exponential_shift(sigma, mu)
        if self.shift_terminal is not None:
            sigma = stretch_to_terminal(sigma, self.shift_terminal)
        return sigma.float()

    def training_sigmas(self) -> torch.Tensor:
        """The ``num_train_timesteps`` σ's training draws from (DiffSynth ``set_timesteps(1000, training=True)``:
        no image token count, so dynamic schedules use their fixed ``mu``).

        >>> from dsf.diffusion.schedules import FLUX1
        >>> FLUX1.training_sigmas().shape
        torch.Size([1000])
        """
        return self.sigmas(self.num_train_timesteps)

    def _grid(self, num_steps: int, denoising_strength: float) -> torch.Tensor:
        sigma_min = 1 / num_steps if self.sigma_min is None else self.sigma_min
        start = sigma_min + (1 - sigma_min) * denoising_strength
        if self.grid == "inclusive":
            return torch.linspace(start, sigma_min, num_steps, dtype=torch.float64)
        return torch.linspace(start, sigma_min, num_steps + 1, dtype=torch.float64)[:-1]


FLUX1 = FlowSchedule(grid="inclusive", sigma_min=0.003 / 1.002, shift=3.0)
WAN = FlowSchedule(shift=5.0)
ZIMAGE = FlowSchedule(shift=3.0)
QWEN_IMAGE = FlowSchedule(
    mu=0.8, dynamic_shift="linear", base_shift=0.5, max_shift=0.9, max_seq_len=8192, shift_terminal=0.02
)
QWEN_IMAGE_LIGHTNING = FlowSchedule(
    mu=0.8, dynamic_shift="linear", base_shift=math.log(3.0), max_shift=math.log(3.0), max_seq_len=8192
)
FLUX2 = FlowSchedule(grid="inclusive", sigma_min=None, mu=0.8, dynamic_shift="empirical")

_UNSUPPORTED_DIFFUSERS_FLAGS = (
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def from_diffusers_config(config: Mapping) -> FlowSchedule:
    """The schedule of a diffusers ``FlowMatchEulerDiscreteScheduler`` config (its ``scheduler_config.json``).

    Static shift follows diffusers exactly, including its grid ending at the shifted ``1/T``; with
    ``use_dynamic_shifting`` pass ``image_seq_len`` to :meth:`FlowSchedule.sigmas` (μ is linear in it).

    >>> schedule = from_diffusers_config({"shift": 3.0, "use_dynamic_shifting": True, "max_image_seq_len": 4096})
    >>> schedule.dynamic_shift, schedule.shift, schedule.sigmas(2, image_seq_len=4096)
    ('linear', None, tensor([1.0000, 0.0032]))
    """
    enabled = [flag for flag in _UNSUPPORTED_DIFFUSERS_FLAGS if config.get(flag)]
    if enabled:
        raise ValueError(f"diffusers scheduler options {enabled} are not supported; set them to False")
    time_shift_type = config.get("time_shift_type", "exponential")
    if time_shift_type != "exponential":
        raise ValueError(f"time_shift_type={time_shift_type!r} is not supported; only 'exponential' is")
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    shift_terminal = config.get("shift_terminal") or None
    if config.get("use_dynamic_shifting", False):
        return FlowSchedule(
            grid="inclusive",
            sigma_min=1 / num_train_timesteps,
            dynamic_shift="linear",
            base_shift=float(config.get("base_shift", 0.5)),
            max_shift=float(config.get("max_shift", 1.15)),
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
            shift_terminal=shift_terminal,
            num_train_timesteps=num_train_timesteps,
        )
    shift = float(config.get("shift", 1.0))
    return FlowSchedule(
        grid="inclusive",
        sigma_min=static_shift(1 / num_train_timesteps, shift),
        shift=shift,
        shift_terminal=shift_terminal,
        num_train_timesteps=num_train_timesteps,
    )
