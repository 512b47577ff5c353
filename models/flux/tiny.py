"""Tiny randomly initialized FLUX.1 components, for examples, smoke tests and benchmarks (no files).

Example:
    >>> pipe = tiny_pipeline()
    >>> pipe.dit.config.hidden_size, pipe.vae.config.downsample_factor
    (32, 8)
"""

from __future__ import annotations

import torch

import dsf
from dsf.models.flux.config import FluxConfig
from dsf.models.flux.model import FluxDiT, init_dit
from dsf.models.flux.pipeline import FluxPipeline
from dsf.models.flux.text import CLIP_L_CONFIG, T5_XXL_CONFIG, load_clip, load_t5
from dsf.model_parts.flux_vae import FluxVAE, FluxVAEConfig, init_vae


def tiny_pipeline(seed: int = 0) -> FluxPipeline:
    """A randomly initialized pipeline of tiny components, for examples and smoke tests (no files)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    dit_key, vae_key = dsf.random.split(dsf.random.key(seed))
    dit_config = FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
                            num_single_blocks=1, context_dim=16, pooled_dim=16)
    vae_config = FluxVAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c + "</w>": i for i, c in enumerate(letters)} | {"<|startoftext|>": 26, "<|endoftext|>": 27}
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    t5_tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + c, -1.0) for c in letters],
                                   extra_ids=0)
    clip_tiny = {"vocab_size": 28, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    t5_tiny = {"vocab_size": 29, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    clip = load_clip(_random_module_weights("clip", CLIP_L_CONFIG | clip_tiny, seed), clip_tokenizer, config=clip_tiny)
    t5 = load_t5(_random_module_weights("t5", T5_XXL_CONFIG | t5_tiny, seed), t5_tokenizer, config=t5_tiny, max_length=16)
    return FluxPipeline(FluxDiT(dit_config), init_dit(dit_config, dit_key), FluxVAE(vae_config), init_vae(vae_config, vae_key),
                        clip, t5, max_sequence_length=16)


def _random_module_weights(kind: str, config: dict, seed: int) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = CLIPTextModel(CLIPTextConfig(**config)) if kind == "clip" else T5EncoderModel(T5Config(**config))
    return module.state_dict()
