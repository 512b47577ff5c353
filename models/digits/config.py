"""Configuration of the digits model: a small text-to-image DiT trained from scratch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DigitsConfig:
    """Sizes of the digits DiT and of its text encoder.

    >>> DigitsConfig().tokens
    16
    """

    image_size: int = 16
    channels: int = 3
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_prompt_tokens: int = 6
    timestep_dim: int = 128

    def __post_init__(self):
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)
