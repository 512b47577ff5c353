"""A text encoder as data: its ``params``, its tokenizer, and a pure map from token ids to embeddings.

The model families build a :class:`TextEncoder` from their checkpoints; prompts are tokenized
(optionally cleaned first), padded to ``max_length``, and cut with a warning when longer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

PROMPT_SHOWN = 80  # characters of a prompt quoted in the truncation warning

Prompts = Union[str, Sequence[str]]


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder as data: its ``params``, its tokenizer, and the pure map from token ids to embeddings.

    ``encode_ids(params, input_ids (B, L)) -> embeddings``; ``max_length`` is the most tokens it takes;
    ``clean`` maps each prompt before tokenizing (``str`` leaves it as is).

    >>> from transformers import T5TokenizerFast
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> count = TextEncoder("counter", {}, tokenizer, 4, lambda params, ids: (ids > 0).sum(-1))
    >>> count.tokenize(["a a"]).tolist(), count.encode({}, ["a", "a a"]).tolist()
    ([[3, 3, 1, 0]], [2, 3])
    """

    name: str
    params: dict = field(repr=False)
    tokenizer: Any = field(repr=False)
    max_length: int
    encode_ids: Callable[[dict, torch.Tensor], torch.Tensor] = field(repr=False)
    clean: Callable[[str], str] = field(default=str, repr=False)

    def tokenize(self, prompts: Prompts, max_length: int | None = None) -> torch.Tensor:
        """Token ids (B, max_length) of the cleaned prompts; a longer prompt is cut, with a warning naming it."""
        length = self._length(max_length)
        prompts = [self.clean(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        for prompt in prompts:
            count = len(self.tokenizer(prompt, verbose=False)["input_ids"])
            if count > length:
                shown = repr(prompt[:PROMPT_SHOWN]) + ("..." if len(prompt) > PROMPT_SHOWN else "")
                warnings.warn(
                    f"prompt {shown} has {count} {self.name} tokens; the encoder takes {length}, the rest is dropped",
                    stacklevel=2,
                )
        batch = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return batch["input_ids"]

    def encode(self, params, prompts: Prompts | torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """The embeddings of prompts (tokenized here) or of token ids (B, L) with ``params``."""
        if not isinstance(prompts, torch.Tensor):
            return self.encode_ids(params, self.tokenize(prompts, max_length))
        length = self._length(max_length)
        if prompts.ndim != 2 or prompts.shape[1] > length:
            raise ValueError(f"{self.name} takes token ids of shape (batch, at most {length}), got {tuple(prompts.shape)}")
        return self.encode_ids(params, prompts)

    def _length(self, max_length: int | None) -> int:
        if max_length is None:
            return self.max_length
        if not 1 <= max_length <= self.max_length:
            raise ValueError(f"{self.name} takes 1 to {self.max_length} tokens, got max_length={max_length}")
        return max_length
