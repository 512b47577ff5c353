"""Tiny randomly initialized Wan components, for examples, smoke tests and benchmarks (no files).

Variants mirror the released models: ``t2v`` (Wan2.1 T2V), ``i2v`` (Wan2.1 I2V, with CLIP),
``ti2v`` (Wan2.2 TI2V-5B, the Wan 2.2 VAE), ``t2v-a14b`` and ``i2v-a14b`` (Wan2.2's two experts).

Example:
    >>> pipe = tiny_pipeline("i2v")
    >>> pipe.task, pipe.dit.config.in_channels, pipe.multiple
    ('image-to-video', 36, 16)
"""

from __future__ import annotations

import string

import torch

import dsf
from dsf.models.wan.config import WanConfig
from dsf.models.wan.model import TwoExpertDiT, WanDiT, default_boundary, init_dit
from dsf.models.wan.pipeline import WanPipeline
from dsf.models.wan.text import CLIP_VIT_H_CONFIG, UMT5_XXL_CONFIG, load_clip_vision, load_umt5
from dsf.model_parts.wan_vae import WanVAE, WanVAEConfig, init_vae
from dsf.model_parts.wan_vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

VARIANTS = ("t2v", "i2v", "ti2v", "t2v-a14b", "i2v-a14b")
UMT5_TINY = {"vocab_size": 32, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
CLIP_TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28}
VAE21_TINY = WanVAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
VAE22_TINY = WanVAEConfig(
    base_dim=4, decoder_base_dim=8, z_dim=48, dim_mult=(1, 1, 1, 1), num_res_blocks=1, is_residual=True, in_channels=12,
    out_channels=12, patch_size=2, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)


def tiny_dit_config(variant: str) -> WanConfig:
    """The DiT config of a tiny variant: 2 heads of 16, one block, 16-wide text (and CLIP) features.

    >>> tiny_dit_config("ti2v").out_channels, tiny_dit_config("i2v").image_dim
    (48, 16)
    """
    channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48), "t2v-a14b": (16, 16), "i2v-a14b": (36, 16)}
    in_channels, out_channels = channels[variant]
    image_dim = CLIP_TINY["hidden_size"] if variant == "i2v" else None
    return WanConfig(num_heads=2, head_dim=16, ffn_dim=32, num_layers=1, text_dim=UMT5_TINY["d_model"], freq_dim=32,
                     in_channels=in_channels, out_channels=out_channels, image_dim=image_dim)


def tiny_pipeline(variant: str = "t2v", seed: int = 0) -> WanPipeline:
    """A randomly initialized pipeline of tiny components (see :data:`VARIANTS`), for examples and smoke tests.

    >>> pipe = tiny_pipeline("t2v-a14b")
    >>> pipe.task, sorted(pipe.params["dit"]), pipe.dit.boundary
    ('text-to-video', ['high_noise', 'low_noise'], 0.875)
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny Wan variant {variant!r}; choose one of {VARIANTS}")
    from transformers import CLIPImageProcessor, T5TokenizerFast

    high_key, low_key, vae_key = dsf.random.split(dsf.random.key(seed), 3)
    config = tiny_dit_config(variant)
    if variant.endswith("a14b"):
        dit = TwoExpertDiT(WanDiT(config), WanDiT(config), boundary=default_boundary(config))
        dit_params = {"high_noise": init_dit(config, high_key), "low_noise": init_dit(config, low_key)}
    else:
        dit, dit_params = WanDiT(config), init_dit(config, high_key)
    vae_config = VAE22_TINY if variant == "ti2v" else VAE21_TINY
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + c, -1.0) for c in string.ascii_lowercase]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    t5 = load_umt5(_random_module_weights("umt5", UMT5_XXL_CONFIG | UMT5_TINY, seed), tokenizer, config=UMT5_TINY,
                   max_length=16)
    clip = None
    if variant == "i2v":
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        clip = load_clip_vision(_random_module_weights("clip", CLIP_VIT_H_CONFIG | CLIP_TINY, seed), processor,
                                config=CLIP_TINY)
    return WanPipeline(dit, dit_params, WanVAE(vae_config), init_vae(vae_config, vae_key), t5, clip, max_sequence_length=16)


def _random_module_weights(kind: str, config: dict, seed: int) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = UMT5EncoderModel(UMT5Config(**config)) if kind == "umt5" else CLIPVisionModel(CLIPVisionConfig(**config))
    return module.state_dict()
