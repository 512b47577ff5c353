import dataclasses
import math

import pytest
import torch

from dsf.diffusion import schedules
from dsf.diffusion.schedules import (
    EPSILON,
    FLOW_MATCHING,
    FLUX1,
    FLUX2,
    QWEN_IMAGE,
    QWEN_IMAGE_LIGHTNING,
    V_PREDICTION,
    WAN,
    ZIMAGE,
    FlowSchedule,
)

# DiffSynth-Studio FlowMatchScheduler golden numbers (diffsynth-facts.md §3.3): (sigmas, first, last).
GOLDEN = {
    "flux1_n30": (lambda: FLUX1.sigmas(30), [1.0, 0.988271, 0.975979], [0.104323, 0.008929]),
    "wan_n50": (lambda: WAN.sigmas(50), [1.0, 0.995935, 0.991735], [0.172414, 0.092593]),
    "qwen_n30_1328": (lambda: QWEN_IMAGE.sigmas(30, image_seq_len=6889), [1.0, 0.984396, 0.968181], [0.091612, 0.02]),
    "qwen_n30_default_mu": (lambda: QWEN_IMAGE.sigmas(30), [1.0, 0.9839, 0.967186], [0.089527, 0.02]),
    "flux2_n50_1024": (lambda: FLUX2.sigmas(50, image_seq_len=4096), [1.0, 0.997309, 0.994521], [0.239631, 0.133719]),
    "zimage_n8": (lambda: ZIMAGE.sigmas(8), [1.0, 0.954545, 0.9], [0.5, 0.3]),
    "qwen_lightning_n4_1024": (
        lambda: QWEN_IMAGE_LIGHTNING.sigmas(4, image_seq_len=4096), [1.0, 0.9, 0.75, 0.5], [0.75, 0.5]
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_diffsynth_golden_sigmas(case):
    make, first, last = GOLDEN[case]
    sigmas = make()
    assert sigmas.dtype == torch.float32
    assert torch.allclose(sigmas[: len(first)], torch.tensor(first), atol=1e-5)
    assert torch.allclose(sigmas[-len(last):], torch.tensor(last), atol=1e-5)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_diffsynth_golden_mu():
    assert QWEN_IMAGE.mu_for(30, image_seq_len=4096) == pytest.approx(0.693548, abs=1e-6)
    assert QWEN_IMAGE.mu_for(30, image_seq_len=6889) == pytest.approx(0.834325, abs=1e-6)
    assert FLUX2.mu_for(50, image_seq_len=4096) == pytest.approx(2.023351, abs=1e-6)
    assert FLUX2.mu_for(4, image_seq_len=4096) == pytest.approx(2.291180, abs=1e-6)
    assert QWEN_IMAGE_LIGHTNING.mu_for(4, image_seq_len=4096) == pytest.approx(math.log(3.0))


def test_empirical_mu_is_linear_in_seq_len_above_4300_tokens():
    assert schedules.empirical_mu(8192, 4) == schedules.empirical_mu(8192, 50)
    assert schedules.empirical_mu(8192, 4) == pytest.approx(0.00016927 * 8192 + 0.45666666)


def test_training_defaults_follow_diffsynth():
    assert FLUX1.training_sigmas()[-1] == pytest.approx(3 * (0.003 / 1.002) / (1 + 2 * (0.003 / 1.002)), rel=1e-5)
    assert WAN.training_sigmas()[-1] == pytest.approx(5 * 0.001 / (1 + 4 * 0.001), rel=1e-5)
    flux2 = FLUX2.training_sigmas()
    flux2_end = schedules.exponential_shift(torch.tensor(1 / 1000, dtype=torch.float64), 0.8).item()
    assert flux2[-1] == pytest.approx(flux2_end, rel=1e-5)
    assert QWEN_IMAGE.training_sigmas()[-1] == pytest.approx(0.02, abs=1e-6)
    assert all(len(s.training_sigmas()) == 1000 for s in (FLUX1, WAN, QWEN_IMAGE, FLUX2, ZIMAGE))


def test_training_weights_wan():
    w = schedules.training_weights(WAN.training_sigmas())
    assert w.max().item() == pytest.approx(2.0764, abs=1e-4)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w[0].item() == 0.0
    assert w[500].item() == pytest.approx(1.0249, abs=1e-4)
    assert w[999].item() == pytest.approx(0.0319, abs=1e-4)


def test_training_weights_flux1():
    w = schedules.training_weights(FLUX1.training_sigmas())
    assert w.max().item() == pytest.approx(1.7943, abs=1e-4)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_training_weights_other_lengths_are_lifted_by_their_second_weight():
    w = schedules.training_weights(WAN.sigmas(10))
    # scaled to mean 1, then w += w[1] (so w[1] doubles): the mean is 1 + w[1]/2
    assert w.mean().item() == pytest.approx(1 + w[1].item() / 2, abs=1e-5)
    assert w[0].item() == pytest.approx(w[1].item() / 2, abs=1e-6)


def test_exponential_shift_equals_static_shift_of_e_to_mu():
    sigma = torch.linspace(1, 0.01, 20, dtype=torch.float64)
    assert torch.allclose(schedules.exponential_shift(sigma, math.log(3.0)), schedules.static_shift(sigma, 3.0))


def test_stretch_to_terminal_keeps_one_and_ends_at_terminal():
    stretched = schedules.stretch_to_terminal(torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64), 0.1)
    assert stretched[0] == 1.0 and stretched[-1].item() == pytest.approx(0.1)


def test_denoising_strength_starts_lower_and_ends_at_the_same_place_for_inclusive_grids():
    full, partial = FLUX1.sigmas(10), FLUX1.sigmas(10, denoising_strength=0.6)
    start = FLUX1.sigma_min + (1 - FLUX1.sigma_min) * 0.6
    assert partial[0].item() == pytest.approx(schedules.static_shift(start, 3.0), rel=1e-6)
    assert partial[-1].item() == pytest.approx(full[-1].item(), rel=1e-6)


def test_template_override_with_replace():
    assert torch.allclose(dataclasses.replace(WAN, shift=3.0).sigmas(8), ZIMAGE.sigmas(8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": "cosine"}, "grid must be one of"),
        ({"dynamic_shift": "quadratic"}, "dynamic_shift must be one of"),
        ({"shift": 3.0, "mu": 0.8}, "one kind of shift"),
        ({"shift": -1.0}, "shift must be positive"),
        ({"sigma_min": 1.0}, "sigma_min must be in"),
        ({"shift_terminal": 1.5}, "shift_terminal must be in"),
    ],
)
def test_flow_schedule_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowSchedule(**kwargs)


def test_sigmas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        WAN.sigmas(0)
    with pytest.raises(ValueError, match="denoising_strength"):
        WAN.sigmas(4, denoising_strength=0.0)
    with pytest.raises(ValueError, match="pass image_seq_len"):
        FlowSchedule(dynamic_shift="linear").sigmas(4)


# diffusers parity: FlowMatchEulerDiscreteScheduler.sigmas[:-1] for static and dynamic shifting.


def flux_calculate_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """FluxPipeline's ``calculate_shift``, written out."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


STATIC_CONFIGS = [{"shift": 3.0}, {"shift": 1.0}, {"shift": 5.0, "shift_terminal": 0.05}]
DYNAMIC_CONFIGS = [
    {"shift": 3.0, "use_dynamic_shifting": True},
    {"use_dynamic_shifting": True, "max_shift": 0.9, "max_image_seq_len": 8192, "shift_terminal": 0.02},
]


@pytest.mark.parametrize("config", STATIC_CONFIGS)
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_matches_diffusers_static_shift(config, num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    schedule = schedules.from_diffusers_config(scheduler.config)
    if num_steps == 1 and schedule.shift_terminal:  # diffusers returns NaN here
        with pytest.raises(ValueError, match="must end below 1"):
            schedule.sigmas(num_steps)
        return
    scheduler.set_timesteps(num_steps)
    torch.testing.assert_close(schedule.sigmas(num_steps), scheduler.sigmas[:-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", DYNAMIC_CONFIGS)
@pytest.mark.parametrize("num_steps, seq_len", [(4, 1024), (28, 4096), (50, 6889)])
def test_matches_diffusers_dynamic_shift(config, num_steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    schedule = schedules.from_diffusers_config(scheduler.config)
    mu = flux_calculate_shift(
        seq_len,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    assert schedule.mu_for(num_steps, image_seq_len=seq_len) == pytest.approx(mu, rel=1e-12)
    scheduler.set_timesteps(num_steps, mu=mu)
    ours = schedule.sigmas(num_steps, image_seq_len=seq_len)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-5, atol=1e-7)


def test_from_diffusers_config_rejects_unsupported_options():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        schedules.from_diffusers_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type='linear'"):
        schedules.from_diffusers_config({"time_shift_type": "linear"})


# Parameterizations.


@pytest.mark.parametrize("parameterization", [FLOW_MATCHING, EPSILON, V_PREDICTION], ids=lambda p: p.name)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3, 2, 3, 4, 5)])
def test_decompose_inverts_add_noise_and_target(parameterization, shape):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    sigma = torch.tensor([0.1, 0.5, 0.95])
    x_t = parameterization.add_noise(x0, noise, sigma)
    x0_hat, noise_hat = parameterization.decompose(x_t, parameterization.target(x0, noise, sigma), sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noise_hat, noise, rtol=1e-4, atol=1e-4)


def test_definitions():
    x0, noise, sigma = torch.full((2, 3), 2.0), torch.full((2, 3), 5.0), torch.tensor([0.6, 0.8])
    s = sigma[:, None]
    torch.testing.assert_close(FLOW_MATCHING.add_noise(x0, noise, sigma), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(FLOW_MATCHING.target(x0, noise, sigma), noise - x0)
    alpha = torch.sqrt(1 - s**2)
    torch.testing.assert_close(EPSILON.add_noise(x0, noise, sigma), alpha * x0 + s * noise)
    torch.testing.assert_close(EPSILON.target(x0, noise, sigma), noise)
    torch.testing.assert_close(V_PREDICTION.target(x0, noise, sigma), alpha * noise - s * x0)


def test_add_noise_keeps_the_latent_dtype():
    x0 = torch.randn(2, 4, dtype=torch.bfloat16)
    assert FLOW_MATCHING.add_noise(x0, torch.randn(2, 4), torch.tensor([0.3, 0.7])).dtype == torch.bfloat16


def test_singular_decomposition_is_an_error():
    with pytest.raises(ValueError, match=r"epsilon: .* sigma=1.0"):
        EPSILON.decompose(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 1.0]))


def test_sigma_must_match_the_batch():
    with pytest.raises(ValueError, match=r"one value per sample \(shape \(2,\)\)"):
        FLOW_MATCHING.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.1, 0.2, 0.3]))
