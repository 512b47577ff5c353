"""The encoder of transformers' T5 family (T5, umT5) over checkpoint-named params: key conversion, shapes, states.

T5-v1.1-XXL and umT5-XXL share one architecture (:data:`XXL_CONFIG`), and their encoders one key
layout: the token embedding ``shared.weight`` and the stack ``encoder.*``, whose own
``encoder.embed_tokens.weight`` is the same tensor as ``shared.weight``. Params hold it once, as
``shared.weight``. :func:`last_hidden_fn` embeds the tokens with it and runs the stack's blocks one
at a time through :func:`dsf.run_blocks`, so block-level offload, checkpointing and sharding reach
each layer of the encoder as they reach each block of a DiT.

Example:
    >>> from transformers import T5Config, T5EncoderModel
    >>> from dsf.model_parts.modules import meta_module
    >>> module = meta_module(T5EncoderModel, T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    >>> sorted(encoder_shapes(module))[:2]
    ['encoder.block.0.layer.0.SelfAttention.k.weight', 'encoder.block.0.layer.0.SelfAttention.o.weight']
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import torch

from dsf.blocks import run_blocks
from dsf.files import loading
from dsf.model_parts.modules import call_module, state_shapes
from dsf.tree import flatten_dict
from dsf.weight import dense

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
    """``hidden(params, input_ids) -> (B, L, d_model)``: the encoder's last hidden state, computed layer by layer.

    ``shared`` embeds the tokens; each ``encoder.block[i]`` runs through :func:`dsf.run_blocks` on
    its own subtree (so block hooks fetch, gather, decode and checkpoint one layer at a time), as
    transformers' block module called with that subtree; ``encoder.final_layer_norm`` ends. A T5
    block hands the relative position bias that block 0 computes to the later blocks; an umT5
    block computes its own. With ``pad_token_id``, padding is masked out of attention (an additive
    mask) and its states are zeroed; without, every token attends and keeps its state.

    >>> from transformers import T5Config, T5EncoderModel
    >>> from dsf.tree import unflatten_dict
    >>> module = T5EncoderModel(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2))
    >>> params = unflatten_dict({k: v for k, v in module.state_dict().items() if k != STACK_EMBEDDING})
    >>> states = last_hidden_fn(module, pad_token_id=0)(params, torch.tensor([[3, 1, 0]]))
    >>> states.shape, bool((states[0, 2] == 0).all())
    (torch.Size([1, 3, 8]), True)
    """
    module.eval()
    stack = module.encoder
    layer = _layer_fn(stack)

    def hidden(params, input_ids: torch.Tensor) -> torch.Tensor:
        _check_tree(params)
        states, ids = _embedded(params["shared"]["weight"], input_ids)
        keep = None if pad_token_id is None else ids.ne(pad_token_id)
        mask = None if keep is None else additive_mask(keep, states.dtype)
        states, _ = run_blocks(layer, params["encoder"]["block"], (states, None), mask)
        states = call_module(stack.final_layer_norm, params["encoder"]["final_layer_norm"], states)
        if keep is None:
            return states
        return torch.where(keep[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))

    return hidden


def _embedded(embedding, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states, ids)``: the tokens embedded, and the ids on the embedding's device; the table is released after."""
    table = dense(embedding)
    ids = input_ids.to(table.device)
    return torch.nn.functional.embedding(ids, table), ids


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask (B, 1, 1, L) added to the scores: 0 where ``keep`` (B, L) holds, the dtype's minimum elsewhere.

    >>> mask = additive_mask(torch.tensor([[True, False]]), torch.float32)
    >>> mask.shape, mask[..., 0].item() == 0, mask[..., 1].item() == torch.finfo(torch.float32).min
    (torch.Size([1, 1, 1, 2]), True, True)
    """
    return (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _layer_fn(stack: torch.nn.Module) -> Callable:
    """``layer(block_params, (states, bias), mask) -> (states, bias)``: one encoder block of ``stack``.

    The transformers module that runs a block is the one whose parameter names the block's params
    carry (T5's block 0 alone holds the relative attention bias). A block whose forward takes
    ``position_bias`` (T5) gets the bias the previous blocks returned and returns its own; one
    that does not (umT5) computes it, and the carried bias stays ``None``.
    """
    modules = {frozenset(block.state_dict()): block for block in reversed(stack.block)}
    shares_bias = "position_bias" in inspect.signature(stack.block[0].forward).parameters

    def layer(params, carry, mask):
        states, bias = carry
        module = modules.get(frozenset(flatten_dict(params)), stack.block[0])
        if not shares_bias:
            out = call_module(module, params, states, attention_mask=mask)
            return (out if isinstance(out, torch.Tensor) else out[0]), None
        return _states_and_bias(call_module(module, params, states, attention_mask=mask, position_bias=bias))

    return layer


def _states_and_bias(out) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states, position_bias)`` of a T5 block's output ``(hidden_states, position_bias, ...)``."""
    if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].ndim == 4:
        return out[0], out[1]
    import transformers

    raise RuntimeError(
        f"transformers {transformers.__version__}'s T5 block returned {type(out).__name__} without the position bias "
        "second; dsf reads (hidden_states, position_bias, ...) as transformers 4.44 to 5.x return it: install a "
        "transformers version in that range"
    )


def _check_tree(params) -> None:
    if not (isinstance(params, Mapping) and isinstance(params.get("encoder"), Mapping) and "shared" in params):
        found = sorted(params)[:4] if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "T5 encoder params are a nested tree: params['shared']['weight'], params['encoder']['block'][i], "
            f"params['encoder']['final_layer_norm'] (found {found}); a flat state dict converts with "
            "dsf.tree.unflatten_dict"
        )
