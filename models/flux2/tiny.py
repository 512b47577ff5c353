"""Tiny randomly initialized FLUX.2 components, for examples, smoke tests and benchmarks (no files).

The tokenizers are character-level, with the special tokens of Mistral-Small-3.1 and Qwen3 and the parts of
their chat templates that FLUX.2's prompts reach: ``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]`` for
dev, ``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` for klein.

Example:
    >>> tokenizer = tiny_tokenizer("qwen3")
    >>> tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True,
    ...                               enable_thinking=False)
    '<|im_start|>user\\na cat<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
"""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = {
    "mistral": {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>",
                "more": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]},
    "qwen3": {"pad": "<|endoftext|>", "eos": "<|im_end|>", "unk": "<unk>",
              "more": ["<|im_start|>", "<think>", "</think>"]},
}
# The branches of the hub tokenizers' chat templates (Mistral-Small-3.1 in FLUX.2-dev's tokenizer/, Qwen3's) that a
# system message and a user turn (dev), or one user turn with a generation prompt and thinking off (klein), reach.
CHAT_TEMPLATES = {
    "mistral": (
        "{{- bos_token }}"
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
        "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
        "{%- set loop_messages = messages[1:] %}"
        "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
        "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
        "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
        "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}"
        "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
        "{%- endif %}{%- endfor %}"
    ),
    "qwen3": (
        "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
        "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
        "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
        "{%- endif %}"
    ),
}
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def tiny_tokenizer(kind: str):
    """A character-level fast tokenizer with ``kind``'s (``"mistral"`` or ``"qwen3"``) special tokens and chat template.

    >>> tiny_tokenizer("mistral")("ab")["input_ids"], len(tiny_tokenizer("mistral"))
    ([9, 10], 105)
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[kind]
    named = [special[name] for name in ("pad", "bos", "eos", "unk") if name in special]
    vocab = {token: i for i, token in enumerate(named + special["more"] + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tokens = {f"{name}_token": special[name] for name in ("pad", "bos", "eos", "unk") if name in special}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHAT_TEMPLATES[kind],
                                        additional_special_tokens=special["more"], **tokens)
    return tokenizer


def tiny_lm_config(kind: str, layers: int = 3) -> dict:
    """A tiny transformers config (``model_type`` mistral3 or qwen3) of ``layers`` decoder layers, 8 wide.

    >>> tiny_lm_config("mistral")["text_config"]["num_hidden_layers"]
    3
    """
    text = {"vocab_size": 112, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    if kind == "qwen3":
        return {"model_type": "qwen3", **text}
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 4,
              "image_size": 16, "patch_size": 4}
    return {"model_type": "mistral3", "text_config": {"model_type": "mistral", **text}, "vision_config": vision,
            "spatial_merge_size": 2, "image_token_index": 7}


def random_lm_weights(kind: str, seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialized tiny ``Mistral3ForConditionalGeneration`` or ``Qwen3ForCausalLM``.

    >>> "model.language_model.layers.0.self_attn.q_proj.weight" in random_lm_weights("mistral")
    True
    """
    from transformers import AutoConfig, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    model_class = Qwen3ForCausalLM if kind == "qwen3" else Mistral3ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(AutoConfig.for_model(**tiny_lm_config(kind, layers))).state_dict()


def tiny_pipeline(seed: int = 0, variant: str = "klein-base"):
    """A randomly initialized pipeline of tiny components (no files): ``variant`` ``"dev"`` (Mistral3 text, embedded
    guidance), ``"klein-base"`` (Qwen3 text, CFG) or ``"klein"`` (distilled).

    >>> pipe = tiny_pipeline()
    >>> pipe.dit.config.hidden_size, pipe.dit.config.context_dim, pipe.vae.config.patch_channels
    (32, 24, 16)
    """
    import dsf
    from dsf.models.flux2.config import Flux2Config
    from dsf.models.flux2.model import Flux2DiT, init_dit
    from dsf.models.flux2.pipeline import Flux2Pipeline
    from dsf.models.flux2.text import load_text_encoder
    from dsf.models.flux2.vae import Flux2VAE, Flux2VAEConfig, init_vae

    kind = "mistral" if variant == "dev" else "qwen3"
    dit_key, vae_key = dsf.random.split(dsf.random.key(seed))
    vae_config = Flux2VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    dit_config = Flux2Config(in_channels=16, out_channels=16, num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4, 4),
                             num_double_blocks=1, num_single_blocks=1, context_dim=24, guidance_embeds=variant == "dev")
    text = load_text_encoder(random_lm_weights(kind, seed), tiny_tokenizer(kind), config=tiny_lm_config(kind),
                             layers=(1, 2, 3), max_length=256)
    return Flux2Pipeline(Flux2DiT(dit_config), init_dit(dit_config, dit_key), Flux2VAE(vae_config), init_vae(vae_config, vae_key),
                         text, max_sequence_length=256, distilled=variant == "klein")
