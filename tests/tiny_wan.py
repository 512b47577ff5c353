"""Tiny random Wan pipelines written to disk as diffusers pipeline folders, for tests.

Variants: ``t2v`` (Wan2.1 T2V), ``i2v`` (Wan2.1 I2V: CLIP image encoder and processor),
``t2v-a14b`` (Wan2.2 T2V-A14B: ``transformer/`` and ``transformer_2/`` switched at
``boundary_ratio``), ``ti2v`` (Wan2.2 TI2V-5B: 48-channel Wan 2.2 VAE, one timestep per frame).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dsf.model_parts.wan_vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

UMT5_TINY = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2}
CLIP_TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28}
DIT_TINY = dict(num_attention_heads=2, attention_head_dim=16, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2)
DIT_VARIANTS = {
    "t2v": dict(in_channels=16, out_channels=16),
    "t2v-a14b": dict(in_channels=16, out_channels=16),
    "i2v": dict(in_channels=36, out_channels=16, image_dim=CLIP_TINY["hidden_size"], added_kv_proj_dim=32),
    "ti2v": dict(in_channels=48, out_channels=48),
}
VAE21_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
VAE22_TINY = dict(
    base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
)
BOUNDARY = 0.875


class WanGridScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' Euler scheduler on DiffSynth-Studio's Wan σ grid, ``linspace(1, 0, N+1)[:-1]`` shifted.

    ``FlowMatchEulerDiscreteScheduler(shift=5.0)`` runs the same Euler steps from the same shift
    formula, but its own grid is ``linspace(1, shift(1/1000), N)`` before the shift; diffusers'
    Wan pipelines call ``set_timesteps(N)`` with no σ's, so this subclass hands it the Wan grid.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        grid = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=grid.tolist())


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), the VAE's output conv small enough that few pixels clamp."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name or name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
        if hasattr(model, "decoder"):
            model.decoder.conv_out.weight.mul_(0.3)


def write_umt5_tokenizer(folder: Path) -> None:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(folder)


def write_tiny_wan_pipeline(root: Path, variant: str = "t2v"):
    """Save a tiny random diffusers Wan pipeline of ``variant`` to ``root`` and return it (with a
    :class:`WanGridScheduler`, so it samples on our σ's)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from dsf.models.wan.text import CLIP_VIT_H_CONFIG, UMT5_XXL_CONFIG

    experts = [WanTransformer3DModel(**DIT_TINY, **DIT_VARIANTS[variant]).eval() for _ in range(2 if "a14b" in variant else 1)]
    vae = AutoencoderKLWan(**(VAE22_TINY if variant == "ti2v" else VAE21_TINY)).eval()
    text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG | UMT5_TINY)).eval()
    for seed, model in enumerate([*experts, vae, text_encoder]):
        randomize(model, seed)
    write_umt5_tokenizer(root / "tokenizer")
    components = dict(tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), text_encoder=text_encoder, vae=vae,
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=experts[0])
    if variant == "t2v-a14b":
        pipe = WanPipeline(**components, transformer_2=experts[1], boundary_ratio=BOUNDARY)
    elif variant == "i2v":
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_CONFIG | CLIP_TINY)).eval()
        randomize(image_encoder, 7)
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        pipe = WanImageToVideoPipeline(**components, image_encoder=image_encoder, image_processor=processor)
    elif variant == "ti2v":
        pipe = WanImageToVideoPipeline(**components, expand_timesteps=True)
    else:
        pipe = WanPipeline(**components)
    pipe.save_pretrained(root, safe_serialization=True)
    pipe.scheduler = WanGridScheduler.from_config(pipe.scheduler.config)
    return pipe
