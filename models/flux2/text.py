"""FLUX.2's text encoders as pure functions: three hidden layers of a chat LLM, stacked per token.

dev reads Mistral-Small-3.1-24B's language model (``Mistral3ForConditionalGeneration``) at layers 10, 20,
30 (3 × 5120 = 15360) over the chat template with BFL's system message; klein 4B reads Qwen3-4B at layers
9, 18, 27 (3 × 2560 = 7680), klein 9B Qwen3-8B (3 × 4096 = 12288), over the user turn with
``add_generation_prompt=True, enable_thinking=False``. Prompts are padded to 512 tokens (right padding,
attention causal and skipping the padding); the DiT sees every position, padding included, as in the
reference. The layers run through :func:`dsf.run_blocks` (:mod:`dsf.model_parts.decoder_lm`), so
block offload and fp8 storage stream a 24B encoder one layer at a time.

Example:
    >>> from dsf.models.flux2.tiny import random_lm_weights, tiny_lm_config, tiny_tokenizer
    >>> encoder = load_text_encoder(random_lm_weights("qwen3"), tiny_tokenizer("qwen3"), config=tiny_lm_config("qwen3"),
    ...                             layers=(1, 2, 3))
    >>> encoder.encode(encoder.params, ["ab", "b"], max_length=40).shape
    torch.Size([2, 40, 24])
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.files.quantized import load_in_layout
from dsf.model_parts import decoder_lm
from dsf.model_parts.modules import meta_module
from dsf.model_parts.pipelines import device_of
from dsf.model_parts.text_encoder import PROMPT_SHOWN, Prompts
from dsf.tree import unflatten_dict

MAX_TOKENS = 512
DEV_LAYERS, KLEIN_LAYERS = (10, 20, 30), (9, 18, 27)
# BFL's system message of FLUX.2-dev's prompt (black-forest-labs/flux2 src/flux2/system_messages.py, as diffusers has it)
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships,"
    " object\nattribution and actions without speculation."
)
QWEN3_MARKER = "layers.0.self_attn.q_norm.weight"  # Qwen3 norms q and k per head; Mistral does not

# The language models' configs (their hub config.json), used when the weights come without one (ComfyUI files),
# picked by the width of the token embedding.
QWEN3_4B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True}
QWEN3_8B = QWEN3_4B | {"hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
MISTRAL_SMALL_3_1 = {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
                     "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0,
                     "sliding_window": None}
KNOWN_CONFIGS = {2560: QWEN3_4B, 4096: QWEN3_8B, 5120: MISTRAL_SMALL_3_1}


@dataclass(frozen=True)
class Flux2TextEncoder:
    """A FLUX.2 text encoder as data: its ``params`` (the decoder stack's tree), tokenizer, the pure map from tokens to
    the stacked hidden states, and how prompts become chats (``"mistral"``: system message + user turn, the batch
    through the chat template; ``"qwen3"``: each user turn rendered with a generation prompt and thinking off).

    ``encode(params, prompts)`` → (B, L, 3·hidden).
    """

    name: str
    params: dict = field(repr=False)
    tokenizer: Any = field(repr=False)
    states: Callable = field(repr=False)
    chat: str
    max_length: int = MAX_TOKENS

    def tokenize(self, prompts: Prompts, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` (B, L) of the prompts as chats, padded or cut to ``max_length`` (512); a
        longer chat is cut, with a warning naming its prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = max_length or self.max_length
        for prompt, count in zip(prompts, self._tokens(prompts, {})["attention_mask"]):
            if len(count) > length:
                shown = repr(prompt[:PROMPT_SHOWN]) + ("..." if len(prompt) > PROMPT_SHOWN else "")
                warnings.warn(f"prompt {shown} makes a chat of {len(count)} {self.name} tokens; the encoder takes {length}, "
                              "the rest is dropped", stacklevel=2)
        tokens = self._tokens(prompts, {"padding": "max_length", "truncation": True, "max_length": length, "return_tensors": "pt"})
        return tokens["input_ids"], tokens["attention_mask"]

    def _tokens(self, prompts: list[str], padding: dict) -> dict:
        """The tokenizer's output for the prompts' chats (``padding``: its padding and truncation options)."""
        if self.chat == "mistral":
            chats = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                      {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}] for prompt in prompts]
            return self.tokenizer.apply_chat_template(chats, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                      **padding)
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False) for prompt in prompts]
        return self.tokenizer(texts, **padding)

    def encode_tokens(self, params, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stacked hidden states (B, L, 3·hidden) of tokens: layer states concatenated per token."""
        device = device_of(params)
        return torch.cat(self.states(params, input_ids.to(device), attention_mask.to(device)), dim=-1)

    def encode(self, params, prompts: Prompts, max_length: int | None = None) -> torch.Tensor:
        """The DiT's ``text_embeds`` (B, L, 3·hidden) of prompts."""
        return self.encode_tokens(params, *self.tokenize(prompts, max_length))


def _stack_module(config: dict) -> torch.nn.Module:
    """The decoder stack of a transformers config (a Mistral3 one: its text config), built on the meta device."""
    from transformers import AutoConfig, AutoModel

    full = AutoConfig.for_model(**config)
    return decoder_lm.stack_of(meta_module(AutoModel.from_config, full.get_text_config()))


def _chat_template_beside(folder: Path) -> str | None:
    """A processor's chat template saved beside the tokenizer files (``chat_template.jinja`` / ``.json``), if any."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return None


def _tokenizer(tokenizer, default_folder: Path | None):
    """A tokenizer (or processor) object as is, else the fast tokenizer of a folder, with its chat template."""
    from transformers import PreTrainedTokenizerFast

    if hasattr(tokenizer, "apply_chat_template") and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    loaded = loading.load_tokenizer(tokenizer, default_folder, PreTrainedTokenizerFast, "FLUX.2 text",
                                    "the pipeline's tokenizer/")
    if loaded.chat_template is None:
        folder = loading.local_folder(tokenizer if tokenizer is not None else default_folder, "FLUX.2 tokenizer")
        loaded.chat_template = _chat_template_beside(folder)
    if loaded.chat_template is None:
        raise ValueError("the FLUX.2 text tokenizer has no chat template: pass the tokenizer/ folder of the FLUX.2 "
                         "repo (its tokenizer_config.json or chat_template.jinja holds the template)")
    return loaded


def load_text_encoder(
    source,
    tokenizer=None,
    *,
    config: dict | None = None,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_length: int = MAX_TOKENS,
) -> Flux2TextEncoder:
    """FLUX.2's text encoder: Mistral3 (dev) or Qwen3 (klein), told apart by the weights.

    ``source``: a diffusers FLUX.2 pipeline folder (its ``text_encoder/`` and ``tokenizer/``), an encoder folder,
    safetensors files (a whole ``Mistral3ForConditionalGeneration`` or ``Qwen3ForCausalLM``, or ComfyUI's language
    model file: the vision tower and LM head are left out), a :class:`dsf.files.hub.ModelSource` or a state dict.
    The config is: the known model of that width (Qwen3-4B, Qwen3-8B, Mistral-Small-3.1) < the ``config.json``
    beside the weights < ``config`` (transformers config keys). ``layers``: the hidden states stacked (default
    (10, 20, 30) for Mistral, (9, 18, 27) for Qwen3).
    """
    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", "FLUX.2 text")
    flat = load_in_layout(weights, lambda stored: decoder_lm.lm_to_ours(stored, "FLUX.2 text"), dtype=dtype, device=device)
    chat = "qwen3" if QWEN3_MARKER in flat else "mistral"
    width = flat["embed_tokens.weight"].shape[1] if "embed_tokens.weight" in flat else None
    merged = loading.merged_config(KNOWN_CONFIGS.get(width, {}), loading.config_json_beside(weights), config)
    if "model_type" not in merged:
        raise ValueError(f"no config for a {width}-wide FLUX.2 text encoder: pass config= (its config.json keys)")
    stack = _stack_module(merged)
    loading.check_encoder_keys("FLUX.2", chat, decoder_lm.lm_shapes(stack), flat, weights)
    default_layers = KLEIN_LAYERS if chat == "qwen3" else DEV_LAYERS
    states = decoder_lm.hidden_states_fn(stack, tuple(layers or default_layers))
    tokenizer = _tokenizer(tokenizer, loading.pipeline_part(root, "text_encoder", "tokenizer"))
    return Flux2TextEncoder(chat, unflatten_dict(flat), tokenizer, states, chat, max_length)
