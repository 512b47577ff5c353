"""The moving-digits model: a tiny Wan DiT in pixel space and a seeded tiny T5 text encoder.

The DiT is :func:`dsf.models.wan.apply` itself, on a small :class:`dsf.models.wan.WanConfig`
(:attr:`MovingDigitsConfig.wan`) whose latents are the video's pixels (B, 3, T, H, W) in [-1, 1];
:func:`init_dit` draws its weights for training from scratch at this width.
The text encoder and tokenizer are the digits model's, over a vocabulary extended by the motion
words ("moving left", ...); the digits model's own vocabulary is untouched.

Example:
    >>> from dsf.models.digits.text import tokenize
    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1, text_dim=8, text_layers=1)
    >>> encode, text_params = init_text_encoder(cfg, dsf.random.key(0))
    >>> text = encode(text_params, tokenize(build_tokenizer(), ["a handwritten digit two moving up"], cfg.max_prompt_tokens))
    >>> params = init_dit(cfg, dsf.random.key(1))
    >>> wan.apply(params, torch.randn(1, 3, 5, 16, 16), torch.rand(1), text, config=cfg.wan).shape
    torch.Size([1, 3, 5, 16, 16])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import dsf
from dsf.model_parts.init import xavier_uniform
from dsf.models import wan
from dsf.models.digits import text as digits_text
from dsf.models.digits.text import text_encoder_fn
from dsf.models.wan import WanConfig
from dsf.random import Key, split

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # name -> (row, column) step
VOCABULARY = digits_text.VOCABULARY + ("moving",) + tuple(DIRECTIONS)


@dataclass(frozen=True)
class MovingDigitsConfig:
    """Video geometry, DiT and text-encoder sizes of the moving-digits model.

    A video has ``frames`` = 1 + 4k frames of ``image_size``² pixels; a digit of ``digit_size``²
    pixels moves ``speed`` pixels per frame, so it travels ``speed·(frames - 1)`` pixels. The default
    digit is scikit-learn's at its own 8×8 (upscaled, it would leave no room to move 2 pixels a frame
    in 16×16: a 2-pixel step is what made the direction of motion learnable in minutes).

    >>> cfg = MovingDigitsConfig()
    >>> cfg.travel, cfg.wan.hidden_size, cfg.tokens
    (8, 128, 80)
    >>> MovingDigitsConfig(frames=4)
    Traceback (most recent call last):
    ...
    ValueError: frames must be 1 + 4k (1, 5, 9, ...) as in Wan videos, got 4
    """

    image_size: int = 16
    digit_size: int = 8
    frames: int = 5
    speed: int = 2
    channels: int = 3
    patch: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 256
    num_layers: int = 4
    freq_dim: int = 64
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_prompt_tokens: int = 8

    def __post_init__(self):
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (1, 5, 9, ...) as in Wan videos, got {self.frames}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.digit_size + self.travel > self.image_size:
            raise ValueError(
                f"a {self.digit_size}-pixel digit moving {self.speed} pixels per frame over {self.frames} frames needs "
                f"{self.digit_size + self.travel} pixels, more than image_size {self.image_size}: lower speed or digit_size"
            )

    @property
    def travel(self) -> int:
        return self.speed * (self.frames - 1)

    @property
    def tokens(self) -> int:
        return self.frames * (self.image_size // self.patch) ** 2

    @property
    def wan(self) -> WanConfig:
        return WanConfig(
            patch_size=(1, self.patch, self.patch), num_heads=self.num_heads, head_dim=self.head_dim,
            in_channels=self.channels, out_channels=self.channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, text_len=self.max_prompt_tokens,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer():
    """The digits tokenizer (lower-casing, whitespace-splitting, word-level) over :data:`VOCABULARY`.

    >>> build_tokenizer()("A digit one moving LEFT")["input_ids"]
    [2, 7, 19, 28, 29]
    """
    return digits_text.build_tokenizer(VOCABULARY)


def text_encoder_module(cfg: MovingDigitsConfig, key: Key | None = None):
    """The transformers ``T5EncoderModel`` of the config over :data:`VOCABULARY`, its weights drawn from ``key`` when given.

    >>> text_encoder_module(MovingDigitsConfig(text_dim=8, text_layers=1)).config.vocab_size == len(VOCABULARY)
    True
    """
    return digits_text.text_encoder_module(cfg, key, VOCABULARY)


def init_text_encoder(cfg: MovingDigitsConfig, key: Key):
    """A fresh seeded text encoder as ``(encode, params)``, ``encode(params, input_ids) -> (B, L, text_dim)``.

    >>> import dsf
    >>> encode, params = init_text_encoder(MovingDigitsConfig(text_dim=8, text_layers=1), dsf.random.key(0))
    >>> encode(params, torch.zeros(1, 3, dtype=torch.long)).shape
    torch.Size([1, 3, 8])
    """
    return text_encoder_fn(text_encoder_module(cfg, key))


def init_dit(cfg: MovingDigitsConfig, key: Key) -> dict:
    """Fresh Wan DiT params for training from scratch at a tiny width: :func:`dsf.models.wan.init_dit`
    with Glorot-uniform matrices (its N(0, 0.02) suits 1,536-wide layers; at 128 wide the text path,
    four such layers deep, starts ~1e-3 strong and barely learns) and a zero output projection, so
    a fresh model is the zero velocity field.

    >>> params = init_dit(MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1), dsf.random.key(0))
    >>> params["proj_out"]["weight"].abs().max().item(), round(params["blocks"][0]["attn2"]["to_v"]["weight"].std().item(), 2)
    (0.0, 0.2)
    """
    wan_key, glorot_key = split(key)
    flat = dsf.tree.flatten_dict(wan.init_dit(cfg.wan, wan_key))
    for name_key, (name, tensor) in zip(split(glorot_key, len(flat)), list(flat.items())):
        if name.startswith("proj_out."):
            flat[name] = torch.zeros_like(tensor)
        elif tensor.ndim == 2 or name == "patch_embedding.weight":  # the patch embedding as a linear (out, C·pt·ph·pw)
            flat[name] = xavier_uniform(name_key, (tensor.shape[0], tensor[0].numel())).reshape(tensor.shape)
    return dsf.tree.unflatten_dict(flat)
