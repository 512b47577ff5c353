"""FLUX.1's text encoders as pure functions: CLIP-L (pooled, 768) and T5-v1.1-XXL (per token, 4096).

:func:`load_clip` and :func:`load_t5` return a :class:`TextEncoder`: ``params``, a tree whose keys
mirror the checkpoint files (``text_model.*`` for CLIP; ``shared`` and ``encoder.*`` for T5), the
tokenizer, and a pure ``encode(params, prompts or token ids)``. The transformers module is built on
the meta device and only supplies the code: every tensor lives in ``params``, read once from
safetensors, so gradients, transforms and offload see a plain tree and memory holds one copy.

Sources: a diffusers FLUX.1 pipeline folder (its ``text_encoder/`` and ``tokenizer/``, or
``text_encoder_2/`` and ``tokenizer_2/``), an encoder folder, single or sharded safetensors files,
a :class:`dsf.files.hub.ModelSource`, or a flat state dict in memory. The config is FLUX.1's
(:data:`CLIP_L_CONFIG`, :data:`T5_XXL_CONFIG`) < the ``config.json`` beside the weights < ``config=``.

Example:
    >>> from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    >>> tiny = {"vocab_size": 8, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    >>> weights = T5EncoderModel(T5Config(**T5_XXL_CONFIG | tiny)).state_dict()
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> t5 = load_t5(weights, tokenizer, config=tiny)
    >>> t5.encode(t5.params, ["a a"], max_length=6).shape
    torch.Size([1, 6, 8])
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from dsf.files import loading

from dsf.model_parts import t5_encoder
from dsf.files.hub import ModelSource, local_source
from dsf.files.io import Source
from dsf.model_parts.modules import meta_module, module_names, pure_module, state_shapes
from dsf.model_parts.text_encoder import Prompts, TextEncoder
from dsf.tree import flatten_dict
from dsf.weight import materialize_tree

# FLUX.1-dev's text_encoder/config.json (openai/clip-vit-large-patch14's text tower).
CLIP_L_CONFIG = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# FLUX.1-dev's text_encoder_2/config.json (google/t5-v1_1-xxl).
T5_XXL_CONFIG = {"model_type": "t5", "vocab_size": 32128, **t5_encoder.XXL_CONFIG}

T5_MAX_TOKENS = 512
FAMILY, CLIP_NAME, T5_NAME = "FLUX.1", "CLIP-L", "T5-XXL"
CLIP_MARKER = "embeddings.token_embedding.weight"
CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
CLIP_LEGACY_BUFFER = "embeddings.position_ids"
CLIP_TOWER = "text_model"  # CLIPTextModel's attribute on transformers 4; the checkpoints' key prefix
CLIP_EMBEDDING = "text_model.embeddings.token_embedding.weight"
T5_MARKER = t5_encoder.MARKER
TOKENIZER_FOLDERS = "FLUX.1-dev's tokenizer/ for CLIP, tokenizer_2/ for T5"

ConfigLike = Any  # a dict of transformers config keys, a transformers config, or None
SourceLike = Union[ModelSource, Source]


def encode_prompt(clip: TextEncoder, t5: TextEncoder, prompts: Prompts, max_sequence_length: int = T5_MAX_TOKENS):
    """FLUX.1's prompt embeddings: ``(text_embeds (B, L, 4096) from T5, pooled_embeds (B, 768) from CLIP)``.

    ``L`` is ``max_sequence_length`` (512 for FLUX.1-dev, 256 for schnell).

    >>> from transformers import T5TokenizerFast
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> clip = TextEncoder("clip", {"w": torch.ones(3)}, tokenizer, 77, lambda p, ids: p["w"].expand(len(ids), 3))
    >>> t5 = TextEncoder("t5", {"w": torch.ones(4)}, tokenizer, 512, lambda p, ids: p["w"].expand(*ids.shape, 4))
    >>> [tuple(x.shape) for x in encode_prompt(clip, t5, ["a", "a a"], max_sequence_length=16)]
    [(2, 16, 4), (2, 3)]
    """
    return t5.encode(t5.params, prompts, max_length=max_sequence_length), clip.encode(clip.params, prompts)


def load_clip(
    source: SourceLike,
    tokenizer=None,
    *,
    config: ConfigLike = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """FLUX.1's CLIP-L text encoder; ``encode`` gives the pooled output (B, hidden) of 77 tokens.

    ``tokenizer``: a local folder (e.g. FLUX.1-dev's ``tokenizer/``), a :class:`ModelSource`, or a
    tokenizer object; for a pipeline folder it defaults to its ``tokenizer/``.

    >>> from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    >>> tiny = {"vocab_size": 4, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    >>> weights = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG | tiny)).state_dict()
    >>> tokenizer = CLIPTokenizer(vocab={"a</w>": 0, "b</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, merges=[])
    >>> clip = load_clip(weights, tokenizer, config=tiny)
    >>> clip.encode(clip.params, ["a b", "b"]).shape
    torch.Size([2, 8])
    """
    from transformers import CLIPTokenizer

    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", CLIP_NAME)
    tokenizer_folder = loading.pipeline_part(root, "text_encoder", "tokenizer")
    tokenizer = loading.load_tokenizer(tokenizer, tokenizer_folder, CLIPTokenizer, CLIP_NAME, TOKENIZER_FOLDERS)
    module = _clip_module(config, _clip_config_beside(weights))
    return TextEncoder(
        name=CLIP_NAME,
        params=loading.encoder_params(FAMILY, CLIP_NAME, weights, clip_to_ours, _clip_shapes(module), dtype, device),
        tokenizer=tokenizer,
        max_length=module.config.max_position_embeddings,
        encode_ids=_clip_pooled_fn(module),
    )


def load_t5(
    source: SourceLike,
    tokenizer=None,
    *,
    config: ConfigLike = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_length: int = T5_MAX_TOKENS,
) -> TextEncoder:
    """FLUX.1's T5-v1.1-XXL encoder; ``encode`` gives the last hidden state (B, L, d_model), L ≤ ``max_length``.

    ``tokenizer``: a local folder (e.g. FLUX.1-dev's ``tokenizer_2/``), a :class:`ModelSource`, or
    a tokenizer object; for a pipeline folder it defaults to its ``tokenizer_2/``.

    >>> from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    >>> tiny = {"vocab_size": 8, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    >>> weights = T5EncoderModel(T5Config(**T5_XXL_CONFIG | tiny)).state_dict()
    >>> tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=0)
    >>> t5 = load_t5(weights, tokenizer, config=tiny, max_length=16)
    >>> t5.encode(t5.params, ["a"]).shape
    torch.Size([1, 16, 8])
    """
    from transformers import T5TokenizerFast

    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder_2", T5_NAME)
    tokenizer_folder = loading.pipeline_part(root, "text_encoder_2", "tokenizer_2")
    tokenizer = loading.load_tokenizer(tokenizer, tokenizer_folder, T5TokenizerFast, T5_NAME, TOKENIZER_FOLDERS)
    module = _t5_module(config, loading.config_of_kind(weights, "model_type", "t5"))
    return TextEncoder(
        name=T5_NAME,
        params=loading.encoder_params(FAMILY, T5_NAME, weights, t5_to_ours, t5_encoder.encoder_shapes(module), dtype, device),
        tokenizer=tokenizer,
        max_length=max_length,
        encode_ids=t5_encoder.last_hidden_fn(module),
    )


def clip_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's tensors of a flat state dict, named ``text_model.*`` as in FLUX.1's files.

    The encoder is found by its token embedding wherever it sits: under ``text_model.``, with no
    prefix (transformers 5), or deeper in an all-in-one file. Other keys (``text_projection``, the
    vision tower, the legacy ``position_ids`` buffer) are left out.

    >>> w = torch.zeros(1)
    >>> sorted(clip_to_ours({"embeddings.token_embedding.weight": w, "text_projection.weight": w}))
    ['text_model.embeddings.token_embedding.weight']
    """
    prefix = loading.encoder_prefix(flat, CLIP_MARKER, CLIP_NAME)
    return loading.encoder_tensors(flat, prefix, CLIP_PARTS, CLIP_TOWER + ".", {CLIP_LEGACY_BUFFER})


def t5_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The T5 encoder's tensors of a flat state dict, named ``shared.weight`` and ``encoder.*``.

    The encoder is found by its first block wherever it sits (``encoder.``, no prefix, deeper in an
    all-in-one file; a decoder is left out). Its token embedding is ``shared.weight``, taken from
    ``encoder.embed_tokens.weight`` when a file only has that one.

    >>> w = torch.zeros(1)
    >>> sorted(t5_to_ours({"block.0.layer.0.SelfAttention.q.weight": w, "embed_tokens.weight": w}))
    ['encoder.block.0.layer.0.SelfAttention.q.weight', 'shared.weight']
    """
    return t5_encoder.encoder_to_ours(flat, T5_NAME)


def clip_param_shapes(config: ConfigLike = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the CLIP params tree for ``config`` (FLUX.1's CLIP-L by default); nothing is allocated.

    >>> shapes = clip_param_shapes()
    >>> shapes[CLIP_EMBEDDING], len(shapes)
    ((49408, 768), 196)
    """
    return _clip_shapes(_clip_module(config))


def t5_param_shapes(config: ConfigLike = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the T5 params tree for ``config`` (FLUX.1's T5-v1.1-XXL by default); nothing is allocated.

    >>> t5_param_shapes({"num_layers": 1})["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"]
    (10240, 4096)
    """
    return t5_encoder.encoder_shapes(_t5_module(config))


def _clip_module(config: ConfigLike, found: dict | None = None):
    """FLUX.1's CLIP text encoder on the meta device: :data:`CLIP_L_CONFIG` < ``found`` < ``config``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return meta_module(CLIPTextModel, CLIPTextConfig.from_dict(loading.merged_config(CLIP_L_CONFIG, found, config)))


def _t5_module(config: ConfigLike, found: dict | None = None):
    """FLUX.1's T5 encoder on the meta device: :data:`T5_XXL_CONFIG` < ``found`` < ``config``."""
    from transformers import T5Config, T5EncoderModel

    return meta_module(T5EncoderModel, T5Config.from_dict(loading.merged_config(T5_XXL_CONFIG, found, config)))


def _clip_shapes(module) -> dict[str, tuple[int, ...]]:
    return state_shapes(module, CLIP_TOWER)


def _clip_pooled_fn(module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """``pooled(params, input_ids) -> (B, hidden)``: CLIP's final-norm state at the end-of-text token."""
    apply, _ = pure_module(module)
    unread_buffers = dict(module.named_buffers())  # position_ids, on meta; positions are passed explicitly

    def pooled(params, input_ids: torch.Tensor) -> torch.Tensor:
        ours = flatten_dict(materialize_tree(params))
        ids = input_ids.to(ours[CLIP_EMBEDDING].device)
        tensors = unread_buffers | module_names(ours, module, CLIP_TOWER)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return apply(tensors, input_ids=ids, position_ids=positions).pooler_output

    return pooled


def _clip_config_beside(weights) -> dict | None:
    """A CLIP text config beside the weights; a full CLIP model's config gives its ``text_config``."""
    found = loading.config_json_beside(weights) or {}
    if found.get("model_type") == "clip":
        return found.get("text_config", {}) | {"model_type": "clip_text_model"}
    return found if found.get("model_type") == "clip_text_model" else None
