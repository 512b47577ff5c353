"""A tiny random Z-Image written to disk like the hub ones (a diffusers pipeline folder), for tests."""

from __future__ import annotations

from pathlib import Path

from tiny_flux import VAE_TINY, randomize

TEXT_TINY = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
DIT_TINY = dict(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6])


def write_tiny_z_image_pipeline(root: Path):
    """Save a tiny random diffusers ``ZImagePipeline`` to ``root`` (transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/ with Turbo's scheduler config) and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from dsf.models.z_image.pipeline import TURBO_SCHEDULER_CONFIG
    from dsf.models.z_image.text import QWEN3_4B_CONFIG, tiny_tokenizer

    transformer, vae = ZImageTransformer2DModel(**DIT_TINY), AutoencoderKL(**VAE_TINY)
    text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG | TEXT_TINY))
    for seed, module in enumerate((transformer, vae, text_encoder)):
        randomize(module.eval(), seed)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER_CONFIG), vae=vae,
                          text_encoder=text_encoder, tokenizer=tiny_tokenizer(), transformer=transformer)
    pipe.save_pretrained(root)
    return pipe
