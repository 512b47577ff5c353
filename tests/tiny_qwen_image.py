"""A tiny random Qwen-Image written to disk like the real ones (a diffusers pipeline folder), for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from dsf.models.qwen_image.pipeline import SCHEDULER_CONFIG
from dsf.models.qwen_image.text import QWEN25_VL_7B_CONFIG
from dsf.models.qwen_image.tiny import TEXT_TINY, tiny_tokenizer
from tiny_flux import randomize

DIT_TINY = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=TEXT_TINY["hidden_size"], axes_dims_rope=(4, 6, 6))
VAE_TINY = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
VISION_TINY = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": TEXT_TINY["hidden_size"],
               "fullatt_block_indexes": [0]}


def tiny_text_encoder_model(vocab_size: int):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` with Qwen-Image's text settings (eps, RoPE θ)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = QWEN25_VL_7B_CONFIG | TEXT_TINY | {"vocab_size": vocab_size}
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=VISION_TINY)).eval()
    randomize(model, seed=2)
    return model


def write_tiny_qwen_image_pipeline(root: Path, zero_cond_t: bool = False):
    """Save a tiny random diffusers ``QwenImagePipeline`` to ``root`` (the hub layout) and return it."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = tiny_tokenizer()
    transformer = QwenImageTransformer2DModel(**DIT_TINY, zero_cond_t=zero_cond_t).eval()
    randomize(transformer, seed=0)
    vae = AutoencoderKLQwenImage(**VAE_TINY).eval()
    randomize(vae, seed=1)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # few pixels at the clamp
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                             text_encoder=tiny_text_encoder_model(len(tokenizer)), tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(root)
    return pipe
