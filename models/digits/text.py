"""The digits text encoder: a small transformers T5 encoder created from a seed, with a word-level
tokenizer built locally with the ``tokenizers`` package, run as a pure function over its params.

Example:
    >>> import dsf
    >>> from dsf.models.digits import DigitsConfig, build_tokenizer, init_text_encoder, tokenize
    >>> cfg = DigitsConfig(text_dim=16, text_layers=1, text_heads=2)
    >>> encode, params = init_text_encoder(cfg, dsf.random.key(0))
    >>> ids = tokenize(build_tokenizer(), ["a handwritten digit seven"], cfg.max_prompt_tokens)
    >>> encode(params, ids).shape
    torch.Size([1, 6, 16])
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from dsf.models.digits.config import DigitsConfig
from dsf.model_parts.modules import pure_module
from dsf.random import Key

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY = ("[PAD]", "[UNK]", "a", "an", "the", "of", "handwritten", "digit", "number", "with", "in",
              "thick", "thin", "bold", "inverted", "colors", "strokes", "style") + DIGIT_WORDS


def prompt_for(digit: int) -> str:
    """The training prompt of a digit class.

    >>> prompt_for(7)
    'a handwritten digit seven'
    """
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def build_tokenizer(vocabulary: Sequence[str] = VOCABULARY):
    """A lower-casing, whitespace-splitting word-level tokenizer over ``vocabulary`` (``[PAD]`` and ``[UNK]`` first)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


def tokenize(tokenizer, prompts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """Token ids (B, max_tokens), padded; a longer prompt is truncated with a warning that names it."""
    for prompt in prompts:
        count = len(tokenizer(prompt)["input_ids"])
        if count > max_tokens:
            warnings.warn(f"prompt {prompt!r} has {count} tokens; the text encoder takes {max_tokens}, the rest is dropped", stacklevel=2)
    batch = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return batch["input_ids"]


def text_encoder_module(cfg: DigitsConfig, key: Key | None = None, vocabulary: Sequence[str] = VOCABULARY):
    """The transformers ``T5EncoderModel`` of the config (its ``text_dim``, ``text_layers``, ``text_heads``)
    over ``vocabulary``, its weights drawn from ``key`` when given."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(vocabulary), d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads, d_ff=2 * cfg.text_dim,
        num_layers=cfg.text_layers, num_heads=cfg.text_heads, dropout_rate=0.0, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key.value & ((1 << 63) - 1) if key is not None else 0)
        return T5EncoderModel(config).eval()


def text_encoder_fn(module) -> tuple[Callable, dict]:
    """``(encode, params)`` with ``encode(params, input_ids) -> last hidden states (B, L, text_dim)``."""
    apply, params = pure_module(module)

    def encode(params, input_ids: torch.Tensor) -> torch.Tensor:
        return apply(params, input_ids=input_ids).last_hidden_state

    return encode, params


def init_text_encoder(cfg: DigitsConfig, key: Key) -> tuple[Callable, dict]:
    """A fresh seeded text encoder as ``(encode, params)``."""
    return text_encoder_fn(text_encoder_module(cfg, key))
