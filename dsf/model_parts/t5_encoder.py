"""The encoder of transformers' T5 family (T5, umT5) over checkpoint-named params: key conversion, shapes, states.

T5-v1.1-XXL and umT5-XXL share one architecture (:data:`XXL_CONFIG`), and their encoders one key
layout: the token embedding ``shared.weight`` and the stack ``encoder.*``, whose own
``encoder.embed_tokens.weight`` is the same tensor as ``shared.weight``. Params hold it once, as
``shared.weight``; :func:`last_hidden_fn` hands it to the stack too.

Example:
    >>> from transformers import T5Config, T5EncoderModel
    >>> from dsf.model_parts.modules import meta_module
    >>> module = meta_module(T5EncoderModel, T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    >>> sorted(encoder_shapes(module))[:2]
    ['encoder.block.0.layer.0.SelfAttention.k.weight', 'encoder.block.0.layer.0.SelfAttention.o.weight']
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from dsf.files import loading
from dsf.model_parts.modules import pure_module, state_shapes
from dsf.tree import flatten_dict
from dsf.weight import materialize_tree

# T5 v1.1's XXL encoder-decoder (sizes, gated-GELU feed-forward, untied embeddings), the architecture of both
# google/t5-v1_1-xxl and google/umt5-xxl; each model adds its own "model_type" and "vocab_size".
XXL_CONFIG = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-06,
    "initializer_factor": 1.0,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
MARKER = "block.0.layer.0.SelfAttention.q.weight"
PARTS = ("block.", "final_layer_norm.", "embed_tokens.")
EMBEDDING, STACK_EMBEDDING = "shared.weight", "encoder.embed_tokens.weight"


def encoder_to_ours(flat: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The ``name`` encoder's tensors of a flat state dict, named ``shared.weight`` and ``encoder.*``.

    The encoder is found by its first block wherever it sits (``encoder.``, no prefix, deeper in an
    all-in-one file; a decoder is left out). Its token embedding is ``shared.weight``, taken from
    ``encoder.embed_tokens.weight`` when a file only has that one.

    >>> w = torch.zeros(1)
    >>> sorted(encoder_to_ours({"t5.encoder." + MARKER: w, "t5.shared.weight": w, "t5.decoder." + MARKER: w}, "T5"))
    ['encoder.block.0.layer.0.SelfAttention.q.weight', 'shared.weight']
    """
    prefix = loading.encoder_prefix(flat, MARKER, name, skip="decoder.")
    ours = loading.encoder_tensors(flat, prefix, PARTS, "encoder.")
    stack_embedding = ours.pop(STACK_EMBEDDING, None)
    embedding = flat.get(prefix.removesuffix("encoder.") + EMBEDDING, stack_embedding)
    return ours if embedding is None else {EMBEDDING: embedding, **ours}


def encoder_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of the params of a T5-family encoder ``module``: its state dict less the stack's embedding.

    >>> from transformers import T5Config, T5EncoderModel
    >>> module = T5EncoderModel(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    >>> encoder_shapes(module)[EMBEDDING], STACK_EMBEDDING in encoder_shapes(module)
    ((8, 8), False)
    """
    return state_shapes(module, skip={STACK_EMBEDDING})


def last_hidden_fn(module: torch.nn.Module, pad_token_id: int | None = None) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """``hidden(params, input_ids) -> (B, L, d_model)``: the encoder's last hidden state; ``shared`` embeds the tokens.

    With ``pad_token_id``, padding is masked out of attention and its states are zeroed; without,
    every token attends and keeps its state.

    >>> from transformers import T5Config, T5EncoderModel
    >>> module = T5EncoderModel(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    >>> params = {k: v for k, v in module.state_dict().items() if k != STACK_EMBEDDING}
    >>> states = last_hidden_fn(module, pad_token_id=0)(params, torch.tensor([[3, 1, 0]]))
    >>> states.shape, bool((states[0, 2] == 0).all())
    (torch.Size([1, 3, 8]), True)
    """
    apply, _ = pure_module(module)

    def hidden(params, input_ids: torch.Tensor) -> torch.Tensor:
        ours = flatten_dict(materialize_tree(params))
        ids = input_ids.to(ours[EMBEDDING].device)
        tensors = ours | {STACK_EMBEDDING: ours[EMBEDDING]}
        if pad_token_id is None:
            return apply(tensors, input_ids=ids).last_hidden_state
        mask = ids.ne(pad_token_id)
        states = apply(tensors, input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return torch.where(mask[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))

    return hidden
