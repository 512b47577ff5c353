"""The digits model: a small text-to-image DiT trained from scratch on scikit-learn's digits."""

from dsf.models.digits.config import DigitsConfig
from dsf.models.digits.model import dit_apply, init_dit
from dsf.models.digits.text import build_tokenizer, init_text_encoder, prompt_for, text_encoder_fn, text_encoder_module, tokenize

__all__ = [
    "DigitsConfig",
    "build_tokenizer",
    "dit_apply",
    "init_dit",
    "init_text_encoder",
    "prompt_for",
    "text_encoder_fn",
    "text_encoder_module",
    "tokenize",
]
