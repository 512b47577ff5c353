"""Qwen-Image's text encoder: Qwen2.5-VL-7B's language model as a pure function, with Qwen-Image's prompt template.

A prompt is put into the chat template (text-to-image: a system prompt asking for a detailed description), the
whole is run through the language model (:mod:`dsf.model_parts.decoder_lm`: its 28 layers through
:func:`dsf.run_blocks`, so offload, fp8 and shard stream them), and the last hidden state of the tokens after the
template's first :data:`T2I_DROP` (the system part) is the DiT's conditioning, zero-padded, with a mask of the
valid tokens. At most ``max_sequence_length`` (512) tokens are kept; a longer prompt is cut with a warning, as
diffusers cuts it.

Sources: a diffusers Qwen-Image pipeline folder (its ``text_encoder/`` and ``tokenizer/``), an encoder folder,
single or sharded safetensors files (ComfyUI's ``qwen_2.5_vl_7b.safetensors``), a :class:`dsf.files.hub.ModelSource`,
or a flat state dict. The config is Qwen2.5-VL-7B's (:data:`QWEN25_VL_7B_CONFIG`) < the ``config.json`` beside the
weights < ``config=`` (transformers' ``Qwen2_5_VLConfig`` keys, top level or under ``text_config``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.files.io import Source
from dsf.model_parts.decoder_lm import hidden_states_fn, lm_shapes, lm_to_ours
from dsf.model_parts.input_checks import prompt_lists
from dsf.model_parts.modules import meta_module
from dsf.model_parts.text_encoder import PROMPT_SHOWN
from dsf.weight import dense

NAME = "Qwen2.5-VL"
MAX_SEQUENCE_LENGTH = 512  # the pipelines' default
TOKENIZER_LIMIT = 1024  # diffusers' tokenizer_max_length: the most prompt tokens any pipeline takes

# Qwen/Qwen-Image's text_encoder/config.json, its language model's part (Qwen2.5-VL-7B-Instruct)
QWEN25_VL_7B_CONFIG = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06, "attention_dropout": 0.0, "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 28, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "bos_token_id": 151643, "eos_token_id": 151645,
}

# diffusers' QwenImagePipeline: the template, and how many of its tokens (the system part) are dropped
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
T2I_DROP = 34


@dataclass(frozen=True)
class QwenTextEncoder:
    """Qwen-Image's prompt encoder as data: the language model's ``params``, its tokenizer, and the pure map
    ``states(params, input_ids, attention_mask) -> (last hidden state,)``.

    ``encode(params, prompts)`` gives ``(text_embeds (B, L, hidden) zero-padded, text_mask (B, L) bool)``, L the
    longest prompt's token count (at most ``max_sequence_length``).
    """

    params: dict = field(repr=False)
    tokenizer: Any = field(repr=False)
    states: Callable = field(repr=False)
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def tokenize(self, prompts: Sequence[str], template: str = T2I_TEMPLATE, drop: int = T2I_DROP):
        """``(input_ids, attention_mask)`` (B, drop + L) of the prompts in ``template``, right-padded, cut after
        ``max_sequence_length`` prompt tokens (with a warning naming the prompt)."""
        texts = [template.format(prompt) for prompt in prompts]
        limit = drop + self.max_sequence_length
        for prompt, text in zip(prompts, texts):
            count = len(self.tokenizer(text)["input_ids"]) - drop
            if count > self.max_sequence_length:
                shown = repr(prompt[:PROMPT_SHOWN]) + ("..." if len(prompt) > PROMPT_SHOWN else "")
                warnings.warn(f"prompt {shown} has {count} {NAME} tokens with its template's end; Qwen-Image takes "
                              f"{self.max_sequence_length} (max_sequence_length), the rest is dropped", stacklevel=3)
        batch = self.tokenizer(texts, padding=True, padding_side="right", truncation=True, max_length=limit,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    def encode(self, params, prompts: str | Sequence[str], template: str = T2I_TEMPLATE, drop: int = T2I_DROP):
        """``(text_embeds, text_mask)`` of the prompts (a string or a list), on the device of ``params``.

        >>> from dsf.models.qwen_image.tiny import tiny_text_encoder
        >>> encoder = tiny_text_encoder()
        >>> embeds, mask = encoder.encode(encoder.params, ["a cat", "a"])
        >>> embeds.shape, mask.tolist()
        (torch.Size([2, 7, 16]), [[True, True, True, True, True, True, True], [True, True, True, True, True, True, False]])
        """
        prompts, _ = prompt_lists(prompts, "")
        input_ids, keep = self.tokenize(prompts, template, drop)
        device = dense(params["embed_tokens"]["weight"]).device
        (hidden,) = self.states(params, input_ids.to(device), keep.to(device))
        hidden, keep = hidden[:, drop:], keep[:, drop:].to(device)
        length = int(keep.sum(1).max())
        hidden, keep = hidden[:, :length], keep[:, :length]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device)), keep


def text_config(config: Any = None, found: Mapping | None = None):
    """The language model's ``Qwen2_5_VLTextConfig``: :data:`QWEN25_VL_7B_CONFIG` < ``found`` (a config.json) <
    ``config``, each read at its top level and then its ``text_config``.

    >>> text_config({"text_config": {"num_hidden_layers": 2}}).num_hidden_layers, text_config().hidden_size
    (2, 3584)
    """
    from transformers import Qwen2_5_VLTextConfig

    merged = dict(QWEN25_VL_7B_CONFIG)
    for layer in (found, config.to_dict() if hasattr(config, "to_dict") else config):
        layer = dict(layer or {})
        for part in ({k: v for k, v in layer.items() if k not in ("text_config", "vision_config")}, layer.get("text_config") or {}):
            merged |= _rope_in_parameters(part, merged["rope_parameters"])
    merged = {k: v for k, v in merged.items() if k not in ("model_type", "architectures", "transformers_version")}
    return Qwen2_5_VLTextConfig(**merged)


def _rope_in_parameters(config: Mapping, rope: Mapping) -> dict:
    """``config`` with its RoPE settings (transformers 4's ``rope_scaling`` and ``rope_theta``, or 5's
    ``rope_parameters``) merged over ``rope`` as ``rope_parameters``.

    >>> _rope_in_parameters({"rope_theta": 10.0, "rope_scaling": {"mrope_section": [1, 1, 2]}}, {"rope_type": "default"})
    {'rope_parameters': {'rope_type': 'default', 'mrope_section': [1, 1, 2], 'rope_theta': 10.0}}
    """
    config = dict(config)
    found = {**(config.pop("rope_scaling", None) or {}), **(config.pop("rope_parameters", None) or {})}
    if "rope_theta" in config:
        found["rope_theta"] = config.pop("rope_theta")
    return config | ({"rope_parameters": {**rope, **found}} if found else {})


def language_model(config: Any = None, found: Mapping | None = None) -> torch.nn.Module:
    """Qwen2.5-VL's language model on the meta device (the code of the layers, no tensors).

    >>> lm_shapes(language_model({"num_hidden_layers": 1}))["layers.0.self_attn.k_proj.weight"]
    (512, 3584)
    """
    from transformers import Qwen2_5_VLTextModel

    return meta_module(Qwen2_5_VLTextModel, text_config(config, found))


def load_text_encoder(
    source: Source,
    tokenizer=None,
    *,
    config: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> QwenTextEncoder:
    """Qwen-Image's text encoder from any source (see the module docstring).

    ``tokenizer``: a local folder (Qwen-Image's ``tokenizer/``), a :class:`dsf.files.hub.ModelSource`, or a
    tokenizer object; for a pipeline folder it defaults to its ``tokenizer/``.

    >>> from transformers import Qwen2_5_VLTextModel
    >>> from dsf.models.qwen_image.tiny import TEXT_TINY, tiny_tokenizer
    >>> weights = Qwen2_5_VLTextModel(text_config(TEXT_TINY)).state_dict()
    >>> encoder = load_text_encoder({"model.language_model." + k: v for k, v in weights.items()}, tiny_tokenizer(),
    ...                             config=TEXT_TINY)
    >>> encoder.encode(encoder.params, "a cat")[0].shape
    torch.Size([1, 7, 16])
    """
    from transformers import Qwen2Tokenizer

    if not 1 <= max_sequence_length <= TOKENIZER_LIMIT:
        raise ValueError(f"max_sequence_length must be 1 to {TOKENIZER_LIMIT} (as diffusers' Qwen-Image pipelines), "
                         f"got {max_sequence_length}")
    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", NAME)
    tokenizer_folder = loading.pipeline_part(root, "text_encoder", "tokenizer")
    tokenizer = loading.load_tokenizer(tokenizer, tokenizer_folder, Qwen2Tokenizer, NAME, "Qwen-Image's tokenizer/")
    stack = language_model(config, loading.config_of_kind(weights, "model_type", "qwen2_5_vl"))
    params = loading.encoder_params("Qwen-Image", NAME, weights, lambda flat: lm_to_ours(flat, NAME), lm_shapes(stack),
                                    dtype, device)
    return QwenTextEncoder(params, tokenizer, hidden_states_fn(stack, (-1,)), max_sequence_length)
