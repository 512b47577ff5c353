import pytest
import torch

import dsf
from dsf.diffusion.losses import flow_matching_loss, noised, timestep_indices, timestep_range
from dsf.diffusion.schedules import FLOW_MATCHING, FLUX1, V_PREDICTION, WAN, training_weights


def linear_model(params, x, sigma, bias=0.0):
    """A tiny channel-mixing linear model: (B, C, ...) -> (B, C, ...)."""
    return torch.einsum("oc,bc...->bo...", params["w"], x) + params["b"].reshape(1, -1, *([1] * (x.ndim - 2))) + bias


def make_params(channels=3, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(channels, channels, generator=gen).requires_grad_(requires_grad),
        "b": torch.randn(channels, generator=gen).requires_grad_(requires_grad),
    }


def latents(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_same_key_same_loss_different_key_different_loss():
    params, x0 = make_params(), latents(4, 3, 4, 4)
    first = flow_matching_loss(linear_model, params, x0, dsf.random.key(0))
    assert first.shape == () and first.dtype == torch.float32
    assert torch.equal(first, flow_matching_loss(linear_model, params, x0, dsf.random.key(0)))
    assert not torch.equal(first, flow_matching_loss(linear_model, params, x0, dsf.random.key(1)))


@pytest.mark.parametrize("weighted", [True, False])
def test_loss_is_the_weighted_mean_of_per_sample_mse(weighted):
    params, x0, key = make_params(), latents(3, 3, 2, 4, 4), dsf.random.key(7)
    grid = WAN.training_sigmas()
    index_key, noise_key = dsf.random.split(key)
    index = timestep_indices(index_key, 3, 1000)
    sigma = grid[index]
    noise = dsf.random.normal(noise_key, x0.shape)
    s = sigma.reshape(-1, 1, 1, 1, 1)
    pred = linear_model(params, (1 - s) * x0 + s * noise, sigma, bias=0.5)
    mse = (pred - (noise - x0)).square().mean(dim=(1, 2, 3, 4))
    weights = training_weights(grid)[index] if weighted else torch.ones(3)
    loss = flow_matching_loss(linear_model, params, x0, key, {"bias": 0.5}, schedule=WAN, weighted=weighted)
    torch.testing.assert_close(loss, (weights * mse).mean(), rtol=1e-5, atol=0)


def test_training_weights_have_mean_one():
    assert training_weights(FLUX1.training_sigmas()).mean().item() == pytest.approx(1.0, abs=1e-5)


def test_boundaries_restrict_the_drawn_timesteps():
    low, high = timestep_range(1000, 0.25, 0.417)
    assert (low, high) == (250, 417)
    index = timestep_indices(dsf.random.key(3), 4096, 1000, 0.25, 0.417)
    assert int(index.min()) == 250 and int(index.max()) == 416

    grid, seen = FLUX1.training_sigmas(), []

    def model_fn(params, x, sigma):
        seen.append(sigma)
        return x

    for seed in range(20):
        key = dsf.random.key(seed)
        flow_matching_loss(model_fn, None, latents(8, 2), key, min_timestep_boundary=0.25, max_timestep_boundary=0.417)
    drawn = torch.cat(seen)
    assert bool(((drawn <= grid[250]) & (drawn >= grid[416])).all())
    assert bool(torch.isin(drawn, grid[250:417]).all())


@pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.0001, 0.0009)])
def test_bad_boundaries_are_errors(low, high):
    with pytest.raises(ValueError, match="boundar"):
        flow_matching_loss(
            linear_model, make_params(), latents(1, 3, 2, 2), dsf.random.key(0),
            min_timestep_boundary=low, max_timestep_boundary=high,
        )


def test_gradient_flows_to_params():
    params, x0 = make_params(requires_grad=True), latents(2, 3, 4, 4)
    loss = flow_matching_loss(linear_model, params, x0, dsf.random.key(0))
    grad_w, grad_b = torch.autograd.grad(loss, [params["w"], params["b"]])
    assert grad_w.shape == (3, 3) and grad_w.abs().sum() > 0 and grad_b.abs().sum() > 0


def test_bfloat16_latents_draw_float32_noise_then_cast():
    x0, key, seen = latents(2, 3, 2, 2).bfloat16(), dsf.random.key(5), []

    def model_fn(params, x, sigma):
        seen.append(x)
        return x

    loss = flow_matching_loss(model_fn, None, x0, key, weighted=False)
    assert loss.dtype == torch.float32 and seen[0].dtype == torch.bfloat16
    index_key, noise_key = dsf.random.split(key)
    sigma = FLUX1.training_sigmas()[timestep_indices(index_key, 2)]
    expected = FLOW_MATCHING.add_noise(x0, dsf.random.normal(noise_key, x0.shape).bfloat16(), sigma)
    assert torch.equal(seen[0], expected)


def test_other_parameterizations_regress_their_own_target():
    x0, key = latents(2, 3, 4), dsf.random.key(2)

    def perfect(params, x, sigma):
        _, noise_key = dsf.random.split(key)
        return V_PREDICTION.target(x0, dsf.random.normal(noise_key, x0.shape), sigma)

    assert flow_matching_loss(perfect, None, x0, key, parameterization=V_PREDICTION).item() == 0.0
    assert flow_matching_loss(perfect, None, x0, key).item() > 0.0


def test_prediction_shape_must_match_the_latent():
    with pytest.raises(ValueError, match="model_fn returned shape"):
        flow_matching_loss(lambda params, x, sigma: x[:, :1], None, latents(2, 3, 4), dsf.random.key(0))


PER_SAMPLE_CASES = [
    dict(),
    dict(weighted=False),
    dict(schedule=WAN, parameterization=V_PREDICTION, min_timestep_boundary=0.2, max_timestep_boundary=0.6),
    dict(scored=lambda t: t[:, :, 1:]),
]


@pytest.mark.parametrize("options", PER_SAMPLE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_batch_mean_of_per_sample_losses_is_the_loss(options, dtype):
    params, x0, key = {k: v.to(dtype) for k, v in make_params().items()}, latents(5, 3, 4, 4).to(dtype), dsf.random.key(11)
    per_sample = flow_matching_loss(linear_model, params, x0, key, **options, reduction="none")
    assert per_sample.shape == (5,) and per_sample.dtype == torch.float32
    assert len(set(per_sample.tolist())) == 5
    assert torch.equal(per_sample.mean(), flow_matching_loss(linear_model, params, x0, key, **options))


@pytest.mark.parametrize("options", PER_SAMPLE_CASES[:3])
def test_noised_is_what_the_loss_draws(options):
    x0, key, seen = latents(6, 3, 4), dsf.random.key(4), []
    draw_options = {name: value for name, value in options.items() if name != "scored"}
    x_t, sigma, target, weight = noised(key, x0, **draw_options)

    def target_plus_one(params, x, sigma_in):
        seen.append((x, sigma_in))
        return target + 1.0

    per_sample = flow_matching_loss(target_plus_one, None, x0, key, **options, reduction="none")
    assert torch.equal(seen[0][0], x_t) and torch.equal(seen[0][1], sigma)
    torch.testing.assert_close(per_sample, weight, rtol=1e-5, atol=0)  # an error of 1 everywhere leaves each sample its weight
    assert len(set(sigma.tolist())) > 1
    assert bool((weight == 1).all()) == (options.get("weighted") is False)


def test_noised_draws_by_the_schedule_and_parameterization():
    x0, key = latents(3, 2, 4), dsf.random.key(8)
    x_t, sigma, target, weight = noised(key, x0, WAN, V_PREDICTION)
    index_key, noise_key = dsf.random.split(key)
    index = timestep_indices(index_key, 3)
    noise = dsf.random.normal(noise_key, x0.shape)
    assert torch.equal(sigma, WAN.training_sigmas()[index])
    assert torch.equal(x_t, V_PREDICTION.add_noise(x0, noise, sigma))
    assert torch.equal(target, V_PREDICTION.target(x0, noise, sigma))
    assert torch.equal(weight, training_weights(WAN.training_sigmas())[index])


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction must be 'mean' .* or 'none'"):
        flow_matching_loss(linear_model, make_params(), latents(2, 3, 4), dsf.random.key(0), reduction="sum")
