"""Z-Image's VAE is FLUX.1's autoencoder (the shared network): its config.json gives FLUX.1's config, and a Z-Image
pipeline folder's vae/ encodes and decodes as diffusers' ZImagePipeline normalizes latents."""

from __future__ import annotations

import pytest
import torch

import dsf
from dsf.model_parts.flux_vae import FluxVAEConfig, vae_params_meta
from dsf.models import z_image

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from tiny_flux import VAE_TINY, randomize  # noqa: E402

# Tongyi-MAI/Z-Image-Turbo vae/config.json (diffusers AutoencoderKL)
Z_IMAGE_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}


def test_z_image_vae_config_is_flux_vae_defaults():
    shapes = {k: tuple(v.shape) for k, v in dsf.tree.flatten_dict(vae_params_meta(FluxVAEConfig())).items()}
    assert z_image.VAE.resolve_config(shapes, Z_IMAGE_VAE_CONFIG, None) == FluxVAEConfig()
    with torch.device("meta"):
        reference = AutoencoderKL(**{k: v for k, v in Z_IMAGE_VAE_CONFIG.items() if not k.startswith("_")})
    assert dsf.tree.num_params(vae_params_meta(FluxVAEConfig())) == sum(p.numel() for p in reference.parameters())


def test_pipeline_folder_vae_matches_the_diffusers_pipeline_normalization(tmp_path):
    reference = AutoencoderKL(**VAE_TINY).eval()
    randomize(reference, seed=1)
    reference.save_pretrained(tmp_path / "pipe" / "vae")
    vae, params = z_image.load_vae(tmp_path / "pipe")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale, shift = reference.config.scaling_factor, reference.config.shift_factor
    with torch.no_grad():
        latents = vae.encode(params, images)
        expected_latents = (reference.encode(images).latent_dist.mode() - shift) * scale  # ZImageImg2ImgPipeline
        decoded = vae.decode(params, latents)
        expected = reference.decode(latents / scale + shift, return_dict=False)[0]  # ZImagePipeline.__call__
    assert float((latents - expected_latents).abs().max() / expected_latents.abs().max()) <= 1e-4
    assert float((decoded - expected).abs().max() / expected.abs().max()) <= 1e-4
