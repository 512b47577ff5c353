import pytest
import torch

from dsf.diffusion.sampling import guided_prediction, sample, start_latents, step
from dsf.diffusion.schedules import EPSILON, FLOW_MATCHING, FLUX1, V_PREDICTION, WAN, from_diffusers_config


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def toy_model(params, x, sigma, text=None):
    """A nonlinear stand-in for a network, depending on params, x, sigma and a conditioning tensor."""
    h = torch.tanh(params["w"] * x + sigma.reshape(-1, *([1] * (x.ndim - 1))))
    return h if text is None else h + text


def oracle(parameterization, x0):
    """A model that predicts the exact target for the known clean latent ``x0``."""

    def model_fn(params, x, sigma):
        a, b = (f(sigma).reshape(-1, *([1] * (x.ndim - 1))) for f in (parameterization.a, parameterization.b))
        noise = (x - a * x0) / b
        return parameterization.target(x0, noise, sigma)

    return model_fn


PARAMS = {"w": torch.tensor(0.7)}


def test_flow_matching_step_is_euler():
    x, v = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    sigma, sigma_next = torch.tensor([0.9, 0.4]), torch.tensor([0.6, 0.0])
    expected = x + (sigma_next - sigma).reshape(-1, 1, 1, 1) * v
    torch.testing.assert_close(step(x, v, sigma, sigma_next), expected, rtol=0, atol=1e-6)


def test_flow_matching_sampler_is_the_euler_loop():
    noise, sigmas = randn(2, 3, 4, 4), FLUX1.sigmas(7)
    levels = torch.cat([sigmas, torch.zeros(1)])
    x = noise
    for i in range(len(sigmas)):
        x = x + (levels[i + 1] - levels[i]) * toy_model(PARAMS, x, levels[i].repeat(2))
    torch.testing.assert_close(sample(toy_model, PARAMS, noise, sigmas, progress=False), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sampler_matches_diffusers_scheduler_step(num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    noise = randn(1, 4, 8, 8)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(PARAMS, x, (t / 1000).reshape(1)), t, x).prev_sample
    sigmas = from_diffusers_config(scheduler.config).sigmas(num_steps)
    torch.testing.assert_close(sample(toy_model, PARAMS, noise, sigmas, progress=False), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parameterization", [FLOW_MATCHING, EPSILON, V_PREDICTION], ids=lambda p: p.name)
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 2, 4, 4)], ids=["image", "video"])
def test_oracle_model_recovers_x0(parameterization, shape):
    x0 = randn(*shape, seed=3)
    sigmas = torch.linspace(0.99, 0.05, 6)
    noise = parameterization.add_noise(torch.zeros(shape), randn(*shape, seed=4), sigmas[0].repeat(2))
    out = sample(oracle(parameterization, x0), None, noise, sigmas, parameterization=parameterization, progress=False)
    assert out.shape == shape
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_epsilon_sampler_refuses_sigma_one_before_calling_the_model():
    calls = []

    def model_fn(params, x, sigma):
        calls.append(sigma)
        return x

    with pytest.raises(ValueError, match="singular"):
        sample(model_fn, None, randn(1, 2), torch.tensor([1.0, 0.5]), parameterization=EPSILON, progress=False)
    assert calls == []


def counting(model_fn):
    calls = []

    def counted(params, x, sigma, **cond):
        calls.append(cond)
        return model_fn(params, x, sigma, **cond)

    return counted, calls


def test_cfg_scale_one_is_the_conditional_pass_with_one_call_per_step():
    noise, sigmas, text = randn(2, 3, 4, 4), WAN.sigmas(5), randn(1, 3, 1, 1, seed=5)
    counted, calls = counting(toy_model)
    guided = sample(counted, PARAMS, noise, sigmas, {"text": text}, negative_cond={"text": -text}, progress=False)
    assert len(calls) == 5 and all(cond["text"] is text for cond in calls)
    assert torch.equal(guided, sample(toy_model, PARAMS, noise, sigmas, {"text": text}, progress=False))


def test_cfg_combines_positive_and_negative_passes():
    x, sigma, text = randn(2, 3, 4, 4), torch.tensor([0.5, 0.5]), randn(1, 3, 1, 1, seed=5)
    counted, calls = counting(toy_model)
    cond, negative_cond = {"text": text}, {"text": -text}
    guided = guided_prediction(counted, PARAMS, x, sigma, cond, negative_cond=negative_cond, cfg_scale=4.0)
    positive, negative = toy_model(PARAMS, x, sigma, text), toy_model(PARAMS, x, sigma, -text)
    assert len(calls) == 2
    torch.testing.assert_close(guided, negative + 4.0 * (positive - negative))


def test_cfg_without_negative_cond_is_an_error():
    with pytest.raises(ValueError, match="cfg_scale=3.5 needs negative_cond"):
        sample(toy_model, PARAMS, randn(1, 2), WAN.sigmas(2), cfg_scale=3.5, progress=False)


def test_same_inputs_give_bit_identical_samples():
    noise, sigmas = randn(2, 3, 2, 4, 4), WAN.sigmas(6)
    first = sample(toy_model, PARAMS, noise, sigmas, progress=False)
    assert torch.equal(first, sample(toy_model, PARAMS, noise, sigmas, progress=False))
    assert not torch.equal(first, noise)


def test_image_to_image_starts_at_the_strength_sigma():
    x0, noise = randn(2, 3, 4, 4, seed=6), randn(2, 3, 4, 4, seed=7)
    sigmas = WAN.sigmas(4, denoising_strength=0.5)
    sigma0 = 5 * 0.5 / (1 + 4 * 0.5)
    assert sigmas[0].item() == pytest.approx(sigma0)
    start = start_latents(sigmas, noise, x0=x0)
    torch.testing.assert_close(start, (1 - sigma0) * x0 + sigma0 * noise)
    assert start_latents(sigmas, noise) is noise
    seen = []

    def model_fn(params, x, sigma):
        seen.append(sigma)
        return oracle(FLOW_MATCHING, x0)(params, x, sigma)

    out = sample(model_fn, None, start, sigmas, progress=False)
    torch.testing.assert_close(seen[0], torch.full((2,), sigma0))
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_sampler():
    params = {"w": torch.tensor(0.7, requires_grad=True)}
    out = sample(toy_model, params, randn(1, 2, 3, 3), FLUX1.sigmas(3), progress=False)
    (grad,) = torch.autograd.grad(out.square().sum(), params["w"])
    assert grad.abs().item() > 0


def test_progress_bar_shows_the_description(capsys):
    sample(toy_model, PARAMS, randn(1, 2), WAN.sigmas(2), progress=True, desc="denoise-test")
    assert "denoise-test" in capsys.readouterr().err


def test_sigmas_must_be_one_dimensional():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        sample(toy_model, PARAMS, randn(1, 2), torch.zeros(0), progress=False)
