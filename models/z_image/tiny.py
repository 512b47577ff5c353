"""Tiny randomly initialized Z-Image components, for examples, smoke tests and benchmarks (no files).

Example:
    >>> pipe = tiny_pipeline()
    >>> pipe.dit.config.hidden_size, pipe.vae.config.downsample_factor, len(pipe.text_encoder.params["layers"])
    (32, 8, 2)
"""

from __future__ import annotations

import torch

import dsf
from dsf.model_parts.flux_vae import FluxVAE, FluxVAEConfig, init_vae
from dsf.models.z_image.config import ZImageConfig
from dsf.models.z_image.model import ZImageDiT, init_dit
from dsf.models.z_image.pipeline import ZImagePipeline
from dsf.models.z_image.text import QWEN3_4B_CONFIG, load_text_encoder, tiny_tokenizer

TEXT_TINY = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
DIT_TINY = ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=16, axes_dims=(4, 6, 6))
VAE_TINY = FluxVAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def tiny_pipeline(seed: int = 0) -> ZImagePipeline:
    """A randomly initialized pipeline of tiny components, for examples and smoke tests (no files)."""
    from transformers import Qwen3Config, Qwen3Model

    dit_key, vae_key = dsf.random.split(dsf.random.key(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG | TEXT_TINY)).state_dict()
    encoder = load_text_encoder(weights, tiny_tokenizer(), config=TEXT_TINY, max_length=64)
    return ZImagePipeline(ZImageDiT(DIT_TINY), init_dit(DIT_TINY, dit_key), FluxVAE(VAE_TINY), init_vae(VAE_TINY, vae_key),
                          encoder, max_sequence_length=64)
