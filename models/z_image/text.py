"""Z-Image's text encoder: Qwen3-4B's second-to-last hidden state of the chat-templated prompt, as a pure function.

Each prompt is put in Qwen3's chat template as one user message with the generation prompt and
``enable_thinking=True`` (what diffusers' ``ZImagePipeline.encode_prompt`` does), tokenized to at
most 512 tokens, and run through the language model (:mod:`dsf.model_parts.decoder_lm`: its layers
through ``run_blocks``, only the 35 layers the state needs). The result is the states zero-padded
to the longest prompt and a mask True on each prompt's own tokens; the DiT drops the padding per
sample, as diffusers' list of per-prompt states does.

Sources: a diffusers Z-Image pipeline folder (``text_encoder/`` and ``tokenizer/``), an encoder
folder, ComfyUI's ``qwen_3_4b.safetensors``, shards, a :class:`dsf.files.hub.ModelSource`, or a state
dict. The config is Qwen3-4B's (:data:`QWEN3_4B_CONFIG`) < the ``config.json`` beside the weights <
``config=``.

Example:
    >>> from transformers import Qwen3Config, Qwen3Model
    >>> tiny = {"vocab_size": 40, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
    ...         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    >>> weights = Qwen3Model(Qwen3Config(**tiny)).state_dict()
    >>> encoder = load_text_encoder(weights, tiny_tokenizer(), config=tiny)
    >>> embeds, mask = encoder.encode(encoder.params, ["a cat", "a"])
    >>> embeds.shape, mask.sum(dim=1).tolist()
    (torch.Size([2, 24, 8]), [24, 20])
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.model_parts import decoder_lm
from dsf.model_parts.modules import meta_module
from dsf.model_parts.pipelines import device_of
from dsf.model_parts.text_encoder import PROMPT_SHOWN, Prompts

# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json (Qwen3-4B)
QWEN3_4B_CONFIG = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "attention_bias": False, "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
MAX_SEQUENCE_LENGTH = 512
HIDDEN_STATE = -2  # the second-to-last of transformers' output_hidden_states
FAMILY, NAME = "Z-Image", "Qwen3"
TOKENIZER_FOLDER = "Z-Image's tokenizer/ (Qwen3's tokenizer files with its chat template)"
# The message and generation-prompt parts of Qwen3's chat template (the parts a single user prompt renders), for
# the tiny tokenizer of examples and tests; real tokenizers carry the whole template in their files.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Qwen3TextEncoder:
    """Qwen3 as Z-Image's text encoder: ``params`` (the decoder stack's tree), the tokenizer with its chat
    template, and the stack module on the meta device that supplies the code."""

    params: dict = field(repr=False)
    tokenizer: Any = field(repr=False)
    stack: torch.nn.Module = field(repr=False)
    max_length: int = MAX_SEQUENCE_LENGTH

    def templated(self, prompts: Prompts) -> list[str]:
        """The prompts in the chat template: one user message, the generation prompt, thinking enabled."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True) for prompt in prompts]

    def tokenize(self, prompts: Prompts, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` (B, L) of the templated prompts, L the longest (at most ``max_length``);
        a longer prompt is cut, with a warning naming it."""
        length = self.max_length if max_length is None else max_length
        texts = self.templated(prompts)
        for text in texts:
            count = len(self.tokenizer(text)["input_ids"])
            if count > length:
                shown = repr(text[:PROMPT_SHOWN]) + ("..." if len(text) > PROMPT_SHOWN else "")
                warnings.warn(f"prompt {shown} has {count} {NAME} tokens; the encoder takes {length}, the rest is dropped",
                              stacklevel=2)
        batch = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        used = int(batch["attention_mask"].sum(dim=1).max())  # right padding: the states of valid tokens do not see it
        return batch["input_ids"][:, :used], batch["attention_mask"][:, :used].bool()

    def encode(self, params, prompts: Prompts, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_embeds (B, L, hidden) zero on padding, text_mask (B, L) True on valid tokens)`` of prompts."""
        input_ids, mask = self.tokenize(prompts, max_length)
        input_ids, mask = input_ids.to(device_of(params)), mask.to(device_of(params))
        (states,) = decoder_lm.hidden_states_fn(self.stack, (HIDDEN_STATE,))(params, input_ids, mask)
        return states * mask[..., None], mask


def load_text_encoder(
    source,
    tokenizer=None,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_length: int = MAX_SEQUENCE_LENGTH,
) -> Qwen3TextEncoder:
    """Z-Image's Qwen3 text encoder from a pipeline folder, an encoder folder or file(s), or a state dict.

    ``tokenizer``: a local folder, a :class:`dsf.files.hub.ModelSource`, or a tokenizer object; for a pipeline
    folder it defaults to its ``tokenizer/``. ``config``: transformers ``Qwen3Config`` keys over Qwen3-4B's.

    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> tiny = {"vocab_size": 40, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3,
    ...         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    >>> encoder = load_text_encoder(Qwen3ForCausalLM(Qwen3Config(**tiny)).state_dict(), tiny_tokenizer(), config=tiny)
    >>> sorted(encoder.params), len(encoder.params["layers"])
    (['embed_tokens', 'layers', 'norm'], 3)
    """
    from transformers import Qwen2Tokenizer

    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", NAME)
    tokenizer_folder = loading.pipeline_part(root, "text_encoder", "tokenizer")
    tokenizer = loading.load_tokenizer(tokenizer, tokenizer_folder, Qwen2Tokenizer, NAME, TOKENIZER_FOLDER)
    stack = text_encoder_stack(config, loading.config_of_kind(weights, "model_type", "qwen3"))
    params = loading.encoder_params(FAMILY, NAME, weights, lambda flat: decoder_lm.lm_to_ours(flat, NAME),
                                    decoder_lm.lm_shapes(stack), dtype, device)
    return Qwen3TextEncoder(params, tokenizer, stack, max_length)


def text_encoder_stack(config=None, found: dict | None = None) -> torch.nn.Module:
    """The Qwen3 decoder stack on the meta device: :data:`QWEN3_4B_CONFIG` < ``found`` < ``config``.

    >>> decoder_lm.lm_shapes(text_encoder_stack())["layers.35.mlp.gate_proj.weight"]
    (9728, 2560)
    """
    from transformers import Qwen3Config, Qwen3Model

    return decoder_lm.stack_of(meta_module(Qwen3Model, Qwen3Config.from_dict(loading.merged_config(QWEN3_4B_CONFIG, found, config))))


def tiny_tokenizer():
    """A Qwen2 tokenizer over single letters with Qwen3's special tokens and chat template, for examples and tests.

    >>> tokenizer = tiny_tokenizer()
    >>> len(tokenizer), tokenizer.pad_token
    (36, '<|endoftext|>')
    """
    from transformers import Qwen2Tokenizer

    characters = string.ascii_lowercase + "Ġ" + "Ċ" + "<>|/_"  # Ġ and Ċ: the byte-level space and newline
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(characters)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def encode_prompt(encoder: Qwen3TextEncoder, prompts: Prompts, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """``(text_embeds, text_mask)`` of prompts with the encoder's own params (see :meth:`Qwen3TextEncoder.encode`).

    >>> from transformers import Qwen3Config, Qwen3Model
    >>> tiny = {"vocab_size": 40, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
    ...         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    >>> encoder = load_text_encoder(Qwen3Model(Qwen3Config(**tiny)).state_dict(), tiny_tokenizer(), config=tiny)
    >>> embeds, mask = encode_prompt(encoder, ["a", "a cat"], max_sequence_length=32)
    >>> embeds.shape, mask.sum(dim=1).tolist()
    (torch.Size([2, 24, 8]), [20, 24])
    """
    return encoder.encode(encoder.params, prompts, max_sequence_length)
