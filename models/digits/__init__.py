"""The digits model: a small text-to-image DiT trained from scratch on scikit-learn's digits.

``dsf.models.digits.training`` holds the dataset folder, the loss and the data stream;
``SCHEDULE`` is the model's noise schedule (what training and sampling use), and
``dsf.models.digits.metrics`` measures generated digits (ink fraction, a digit classifier).
"""

from dsf.models.digits.config import DigitsConfig
from dsf.models.digits.model import dit_apply, init_dit
from dsf.models.digits.metrics import digit_accuracy, gray, ink_fraction, real_digit_classifier
from dsf.models.digits.pipeline import SCHEDULE, DigitsModel, generate, generate_tensors, load_model, new_model, save_model, to_pil
from dsf.models.digits.text import build_tokenizer, init_text_encoder, prompt_for, text_encoder_fn, text_encoder_module, tokenize

__all__ = [
    "SCHEDULE",
    "DigitsConfig",
    "DigitsModel",
    "generate",
    "generate_tensors",
    "load_model",
    "new_model",
    "save_model",
    "to_pil",
    "build_tokenizer",
    "dit_apply",
    "init_dit",
    "init_text_encoder",
    "prompt_for",
    "text_encoder_fn",
    "text_encoder_module",
    "tokenize",
    "digit_accuracy",
    "gray",
    "ink_fraction",
    "real_digit_classifier",
]
