"""Qwen-Image VAE: parity with diffusers' AutoencoderKLQwenImage on images (encode to normalized latents, decode
clamped), from its diffusers folder, a single file in either layout and a pipeline folder; full-size names and shapes."""

from __future__ import annotations

import chex
import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.model_parts.wan_vae import WanVAEConfig, vae_params_meta
from dsf.model_parts.wan_vae_keys import ours_to_original_vae
from dsf.models.qwen_image import vae as qwen_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 3, 3], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.3, -0.2, 0.1, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def reference():
    model = AutoencoderKLQwenImage(**TINY).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim > 1 else (1 + 0.2 * noise if name.endswith("gamma") else 0.2 * noise))
        model.decoder.conv_out.weight.mul_(0.3)  # few pixels at the clamp
    return model


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(model, vae, vparams):
    """Our latents against the Qwen pipelines' ((mode − mean)/std, frame dropped), our images against their decode."""
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean = torch.tensor(model.config.latents_mean)[:, None, None, None]
    std = torch.tensor(model.config.latents_std)[:, None, None, None]
    with torch.no_grad():
        expected_latents = ((model.encode(images[:, :, None]).latent_dist.mode() - mean) / std)[:, :, 0]
        latents = vae.encode(vparams, images)
        expected_images = model.decode((latents[:, :, None] * std) + mean).sample[:, :, 0]
        decoded = vae.decode(vparams, latents)
    assert latents.shape == (2, 4, 2, 3) and decoded.shape == images.shape
    assert float((expected_images.abs() == 1).float().mean()) < 0.1
    assert _relative_error(latents, expected_latents) <= 1e-4
    assert _relative_error(decoded, expected_images) <= 1e-4


def test_parity_from_diffusers_pipeline_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "vae")
    vae, vparams = qwen_vae.load_vae(tmp_path / "pipe")
    assert vae.config == WanVAEConfig(**TINY)  # latent statistics from config.json (input_channels read too)
    _assert_parity(reference, vae, vparams)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_parity_from_single_file(reference, tmp_path, layout):
    flat = dict(reference.state_dict()) if layout == "diffusers" else ours_to_original_vae(reference.state_dict())
    save_file({k: v.contiguous() for k, v in flat.items()}, tmp_path / "qwen_image_vae.safetensors")
    vae, vparams = qwen_vae.load_vae(tmp_path / "qwen_image_vae.safetensors",
                                     config={"latents_mean": TINY["latents_mean"], "latents_std": TINY["latents_std"]})
    assert qwen_vae.VAE.detect_layout(flat) == layout
    _assert_parity(reference, vae, vparams)


def test_parity_detects_a_wrong_statistic(reference):
    vae, vparams = qwen_vae.load_vae(dict(reference.state_dict()), config={**TINY, "latents_std": [1.5, 0.5, 2.0, 1.1]})
    with pytest.raises(AssertionError):
        _assert_parity(reference, vae, vparams)


def test_full_size_names_and_shapes_match_diffusers():
    with torch.device("meta"):
        reference = AutoencoderKLQwenImage()
    assert qwen_vae.QWEN_IMAGE_VAE_CONFIG == qwen_vae.resolve_vae_config({}, dict(reference.config))
    params = vae_params_meta(qwen_vae.QWEN_IMAGE_VAE_CONFIG)
    chex.assert_trees_all_equal_shapes(dsf.tree.flatten_dict(params), dict(reference.state_dict()))


def test_unknown_config_key_and_wrong_ranks_are_named(reference):
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan config keys.*'input_chanels'"):
        qwen_vae.load_vae(dict(reference.state_dict()), config={"input_chanels": 3})
    vae, vparams = qwen_vae.load_vae(dict(reference.state_dict()), config=TINY)
    with pytest.raises(ValueError, match=r"images have shape \(1, 3, 1, 8, 8\).*\(B, 3, H, W\)"):
        vae.encode(vparams, torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"latents have shape \(1, 16, 2, 2\).*\(B, 4, H, W\)"):
        vae.decode(vparams, torch.zeros(1, 16, 2, 2))
