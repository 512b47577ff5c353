"""Wan training pieces: Wan2.2-TI2V-5B trains on a clean first frame, as DiffSynth-Studio does."""

from __future__ import annotations

import pytest
import torch

import dsf
from dsf.diffusion.losses import timestep_indices
from dsf.models.wan.model import WanDiT
from dsf.models.wan.tiny import tiny_pipeline
from dsf.models.wan.training import SampleEncoder, sft_loss
from dsf.diffusion.schedules import WAN, training_weights

SIZE, FRAMES = 32, 9


@pytest.fixture(scope="module")
def ti2v():
    return tiny_pipeline("ti2v")


@pytest.fixture(scope="module")
def video():
    return torch.rand(3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def record_dit_calls(monkeypatch) -> list:
    calls = []
    call = WanDiT.__call__

    def recording(self, params, latents, timestep, *args, **kwargs):
        output = call(self, params, latents, timestep, *args, **kwargs)
        calls.append((latents.detach().clone(), timestep.clone(), output.detach().clone()))
        return output

    monkeypatch.setattr(WanDiT, "__call__", recording)
    return calls


def loss_and_dit_call(pipe, batch: dict, key, monkeypatch) -> tuple[torch.Tensor, tuple]:
    """``sft_loss`` of the batch, and what the DiT saw and returned: (latents, timestep, prediction)."""
    calls = record_dit_calls(monkeypatch)
    with torch.no_grad():
        loss = sft_loss(pipe)(pipe.params, batch, key)
    (call,) = calls
    return loss, call


def drawn(key, latents: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(σ, noise, loss weight) that ``sft_loss`` draws from ``key`` for one sample, as DiffSynth's trainer would."""
    grid = WAN.training_sigmas()
    index_key, noise_key = dsf.random.split(key)
    index = timestep_indices(index_key, 1, len(grid))
    return float(grid[index]), dsf.random.normal(noise_key, latents.shape), training_weights(grid)[index]


def test_ti2v_sample_carries_the_latents_of_the_first_frame_alone(ti2v, video):
    encoded = SampleEncoder(ti2v)(ti2v.params, {"video": video, "prompt": "a cat"})
    with torch.no_grad():
        alone = ti2v.vae.encode(ti2v.params["vae"], video[None, :, :1])[0]
    assert encoded["first_frame"].shape == (48, 1, 2, 2)
    assert torch.allclose(encoded["first_frame"], alone, rtol=1e-5, atol=1e-6)


def test_ti2v_sample_without_first_frame_conditioning_or_of_one_image_has_none(ti2v, video):
    text_only = SampleEncoder(ti2v, first_frame_conditioning=False)(ti2v.params, {"video": video, "prompt": "a cat"})
    image = SampleEncoder(ti2v)(ti2v.params, {"video": video[:, :1], "prompt": "a cat"})
    assert "first_frame" not in text_only and "first_frame" not in image


def test_ti2v_loss_sees_the_clean_first_frame_at_sigma_zero_and_scores_the_other_frames(ti2v, video, monkeypatch):
    encoded = SampleEncoder(ti2v)(ti2v.params, {"video": video, "prompt": "a cat"})
    batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    key = dsf.random.key(3)
    loss, (seen, timestep, prediction) = loss_and_dit_call(ti2v, batch, key, monkeypatch)
    sigma, noise, weight = drawn(key, batch["latents"])
    noisy = (1 - sigma) * batch["latents"] + sigma * noise
    assert torch.equal(seen[:, :, :1], batch["first_frame"])
    assert torch.allclose(seen[:, :, 1:], noisy[:, :, 1:], atol=1e-6)
    assert timestep.tolist() == [[0.0] + [sigma] * (seen.shape[2] - 1)]
    target = noise - batch["latents"]
    assert torch.allclose(loss, weight * (prediction - target)[:, :, 1:].square().mean(), rtol=1e-5)
    assert not torch.allclose(loss, weight * (prediction - target).square().mean(), rtol=1e-3)


def test_t2v_loss_scores_every_frame(monkeypatch):
    pipe = tiny_pipeline()
    batch = {"latents": torch.randn(1, 16, 3, 2, 2), "text_embeds": torch.randn(1, 4, 16)}
    key = dsf.random.key(5)
    loss, (_, timestep, prediction) = loss_and_dit_call(pipe, batch, key, monkeypatch)
    sigma, noise, weight = drawn(key, batch["latents"])
    assert timestep.tolist() == [sigma]
    assert torch.allclose(loss, weight * (prediction - (noise - batch["latents"])).square().mean(), rtol=1e-5)
