"""Tiny randomly initialized Qwen-Image components, for examples, smoke tests and benchmarks (no files).

:func:`tiny_tokenizer` is a real byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokenizer and chat special tokens)
over a small vocabulary: every byte, and each word of the prompt templates as one token, so a template's system
part is as many tokens as with Qwen's own tokenizer (34 for text-to-image).

Example:
    >>> pipe = tiny_pipeline()
    >>> pipe.dit.config.hidden_size, pipe.vae.config.spatial_factor
    (32, 8)
    >>> from dsf.models.qwen_image.text import T2I_DROP, T2I_TEMPLATE
    >>> tokens = tiny_tokenizer().tokenize(T2I_TEMPLATE.format("a cat"))
    >>> tokens[T2I_DROP - 3 : T2I_DROP + 2]
    ['<|im_start|>', 'user', 'Ċ', 'a', 'Ġcat']
"""

from __future__ import annotations

import torch

import dsf
from dsf.model_parts.decoder_lm import hidden_states_fn, lm_to_ours
from dsf.model_parts.wan_vae import WanVAEConfig, init_vae
from dsf.models.qwen_image.config import QwenImageConfig
from dsf.models.qwen_image.model import QwenImageDiT, init_dit
from dsf.models.qwen_image.pipeline import QwenImagePipeline
from dsf.models.qwen_image.text import T2I_TEMPLATE, QwenTextEncoder, language_model, text_config
from dsf.models.qwen_image.vae import QwenImageVAE
from dsf.tree import unflatten_dict

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
WORDS = "a cat dog red blue sign that says hello on the wall"  # prompt words of the examples and tests
TEXT_TINY = {  # a tiny Qwen2.5-VL language model: 3-D RoPE sections summing to half the head size
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
}


def tiny_tokenizer():
    """A ``Qwen2Tokenizer`` whose vocabulary is the bytes, the template words and :data:`WORDS` (vocab < 600)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    bytes_only = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    text = T2I_TEMPLATE.format(" " + WORDS)
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    merges = []
    for word, _ in bytes_only.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
        for end in range(2, len(word) + 1):  # each word merged left to right into one token
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    vocab |= {token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_text_encoder(seed: int = 0, max_sequence_length: int = 16) -> QwenTextEncoder:
    """A randomly initialized tiny Qwen2.5-VL language model (:data:`TEXT_TINY`) with :func:`tiny_tokenizer`."""
    from transformers import Qwen2_5_VLTextModel

    tokenizer = tiny_tokenizer()
    config = TEXT_TINY | {"vocab_size": len(tokenizer)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = Qwen2_5_VLTextModel(text_config(config)).state_dict()
    params = unflatten_dict(lm_to_ours(weights, "Qwen2.5-VL"))
    return QwenTextEncoder(params, tokenizer, hidden_states_fn(language_model(config), (-1,)), max_sequence_length)


def tiny_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A randomly initialized pipeline of tiny components, for examples and smoke tests (no files)."""
    dit_key, vae_key = dsf.random.split(dsf.random.key(seed))
    dit_config = QwenImageConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1,
                                 context_dim=TEXT_TINY["hidden_size"])
    vae_config = WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    return QwenImagePipeline(QwenImageDiT(dit_config), init_dit(dit_config, dit_key), QwenImageVAE(vae_config),
                             init_vae(vae_config, vae_key), tiny_text_encoder(seed))
