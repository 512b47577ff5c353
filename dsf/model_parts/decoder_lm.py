"""A transformers decoder-only language model (Qwen2.5-VL's, Qwen3, Mistral) as a pure text encoder.

The new families read their prompts from a chat LLM's hidden states: Qwen-Image the last one of
Qwen2.5-VL, Z-Image the second-to-last of Qwen3, FLUX.2 three intermediate layers of Qwen3 or
Mistral-Small stacked. Whatever model object holds it, the language model is a *stack*: the token
embedding ``embed_tokens``, the decoder ``layers`` and the final ``norm``, with a rotary embedding
computed from positions (no weights). :func:`hidden_states_fn` runs a stack as a pure function of
its params: the tokens embedded, each decoder layer through :func:`dsf.run_blocks` as transformers'
layer module called on its own subtree (so block offload, fp8 and shard stream one layer at a
time), and only as many layers as the states asked for need.

The states are indexed as transformers' ``output_hidden_states`` tuple: 0 is the embeddings, ``k``
the output of layer ``k − 1``, and the last (``-1``) the final normed state, ``last_hidden_state``.
Attention is causal and skips padding (``attention_mask`` 1 on valid tokens), as transformers'
eager and SDPA attention compute it; the states of valid tokens are transformers' (right padding).

Example:
    >>> import torch
    >>> from transformers import Qwen3Config, Qwen3Model
    >>> from dsf.tree import unflatten_dict
    >>> module = Qwen3Model(Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
    ...                                 num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    >>> params = unflatten_dict(lm_to_ours(module.state_dict(), "Qwen3"))
    >>> second_to_last, last = hidden_states_fn(stack_of(module), (-2, -1))(params, torch.tensor([[3, 5, 7]]))
    >>> reference = module(torch.tensor([[3, 5, 7]]), output_hidden_states=True).hidden_states
    >>> bool(torch.allclose(second_to_last, reference[-2], atol=1e-6)), bool(torch.allclose(last, reference[-1], atol=1e-6))
    (True, True)
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from dsf.blocks import run_blocks
from dsf.files import loading
from dsf.model_parts.modules import call_module, state_shapes
from dsf.weight import dense

MARKER = "layers.0.self_attn.q_proj.weight"
PARTS = ("embed_tokens.", "layers.", "norm.")
STACK_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def lm_to_ours(flat: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The language model's tensors of a flat state dict, named as its stack's own state dict.

    The stack is found by its first layer's query projection wherever it sits (no prefix, ``model.``,
    ``model.language_model.``, ``language_model.model.``); the LM head and vision towers are left out.

    >>> w = torch.zeros(1)
    >>> sorted(lm_to_ours({"model.language_model." + MARKER: w, "model.language_model.norm.weight": w,
    ...                    "lm_head.weight": w, "model.visual.blocks.0.attn.qkv.weight": w}, "Qwen2.5-VL"))
    ['layers.0.self_attn.q_proj.weight', 'norm.weight']
    """
    prefix = loading.encoder_prefix(flat, MARKER, name)
    return loading.encoder_tensors(flat, prefix, PARTS, "")


def stack_of(module: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (the module with ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``) in a model object.

    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> config = Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    >>> type(stack_of(Qwen3ForCausalLM(config))).__name__
    'Qwen3Model'
    """
    for candidate in module.modules():
        if all(hasattr(candidate, part) for part in STACK_PARTS):
            return candidate
    raise ValueError(
        f"{type(module).__name__} holds no decoder stack (a module with {', '.join(STACK_PARTS)}); "
        "pass a transformers decoder-only language model or a model holding one"
    )


def lm_shapes(stack: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of a stack's params (its state dict: the rotary embedding holds no weights).

    >>> from transformers import Qwen3Config, Qwen3Model
    >>> module = Qwen3Model(Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                                 num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    >>> lm_shapes(module)["embed_tokens.weight"], lm_shapes(module)["norm.weight"]
    ((16, 8), (8,))
    """
    return state_shapes(stack)


def hidden_states_fn(stack: torch.nn.Module, layers: Sequence[int]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``states(params, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None)``: the hidden
    states at ``layers`` (indices of transformers' ``output_hidden_states``; negative ones count from the end).

    ``params``: the stack's tree (:func:`lm_to_ours`, unflattened). ``attention_mask`` (B, L): 1 or True on valid
    tokens (default: all valid). ``inputs_embeds`` (B, L, D) replace the token embedding (a vision-language model
    scatters image features into them). ``position_ids``: what the model's rotary embedding takes, (B, L), or
    (3, B, L) for Qwen2.5-VL's 3-D positions (default: 0 … L − 1 on every axis).
    """
    count = len(stack.layers)
    wanted = [_state_index(index, count) for index in layers]
    kinds = _layer_kinds(stack.config, count)
    spans = _spans(kinds, {index for index in wanted if 0 < index < count}, max(wanted))
    rotary = _rotary_on_cpu(stack)
    multimodal = _multimodal_rope(stack.config)
    window = getattr(stack.config, "sliding_window", None)

    def states(params, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None):
        _check_tree(params)
        hidden = _embedded(params["embed_tokens"]["weight"], input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if position_ids is None:
            position_ids = _default_positions(batch, length, hidden.device, multimodal)
        position_embeddings = rotary(hidden, position_ids.to(hidden.device))
        keep = _keep(attention_mask, batch, length, hidden.device)
        masks = {kind: _attention_mask(keep, hidden.dtype, window if kind == "sliding_attention" else None) for kind in set(kinds)}
        found = {0: hidden}
        for span in spans:
            layer = _layer_fn(stack.layers[span.start])
            hidden = run_blocks(layer, params["layers"], hidden, masks[kinds[span.start]], position_embeddings, span=span)
            found[span.stop] = hidden
        if count in wanted:
            found[count] = call_module(stack.norm, params["norm"], hidden)
        return tuple(found[index] for index in wanted)

    return states


def _state_index(index: int, count: int) -> int:
    """A hidden-state index (negative ones count from the end of the ``count + 1`` states) as a non-negative one."""
    if not -(count + 1) <= index <= count:
        raise ValueError(f"hidden state {index} of a {count}-layer model: it has states 0 to {count} (or -1 to -{count + 1})")
    return index % (count + 1)


def _layer_kinds(config, count: int) -> list[str]:
    """Each layer's attention kind, ``"full_attention"`` or ``"sliding_attention"``, as the config says."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return list(kinds[:count])
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * count


def _spans(kinds: Sequence[str], stops: set[int], last: int) -> list[range]:
    """The layers to run up to state ``last`` as spans of one attention kind, split where a state is read.

    >>> _spans(["full_attention"] * 4, {2}, 4), _spans(["full_attention"] * 4, set(), 1)
    ([range(0, 2), range(2, 4)], [range(0, 1)])
    """
    needed = min(last, len(kinds))
    cuts = sorted({0, needed, *stops, *(i for i in range(1, needed) if kinds[i] != kinds[i - 1])})
    return [range(start, stop) for start, stop in zip(cuts, cuts[1:])]


def _rotary_on_cpu(stack: torch.nn.Module) -> torch.nn.Module:
    """The stack's rotary embedding built anew on the CPU: it holds no weights, only frequencies computed from the
    config, which a stack built on the meta device would hold on meta."""
    with torch.device("cpu"):
        return type(stack.rotary_emb)(config=stack.config).eval()


def _multimodal_rope(config) -> bool:
    """Whether the rotary embedding takes 3-D positions (Qwen2.5-VL's ``mrope_section``)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return "mrope_section" in rope


def _default_positions(batch: int, length: int, device, multimodal: bool) -> torch.Tensor:
    ids = torch.arange(length, device=device).expand(batch, length)
    return ids.expand(3, batch, length) if multimodal else ids


def _embedded(embedding, input_ids: torch.Tensor) -> torch.Tensor:
    table = dense(embedding)
    return torch.nn.functional.embedding(input_ids.to(table.device), table)


def _keep(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """The valid tokens (B, L) as booleans."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; the tokens are {(batch, length)}")
    return attention_mask.to(device=device, dtype=torch.bool)


def _attention_mask(keep: torch.Tensor, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """The additive attention mask (B, 1, L, L): query i sees valid keys j ≤ i (and i − j < ``window``).

    A padding query past a sliding window sees no key; its state is left unspecified (transformers' attention
    implementations disagree on it too), as prompt encoders drop padding.

    >>> _attention_mask(torch.tensor([[True, True, False]]), torch.float32, None)[0, 0].eq(0).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    """
    length = keep.shape[1]
    query = torch.arange(length, device=keep.device)[:, None]
    key = torch.arange(length, device=keep.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    allowed = allowed[None, None] & keep[:, None, None, :]
    return torch.zeros((), dtype=dtype, device=keep.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _layer_fn(module: torch.nn.Module) -> Callable:
    """``layer(block_params, states, mask, position_embeddings) -> states``: transformers' decoder layer ``module``."""

    def layer(params, hidden, mask, position_embeddings):
        out = call_module(module, params, hidden, attention_mask=mask, position_embeddings=position_embeddings)
        return out if isinstance(out, torch.Tensor) else out[0]

    return layer


def _check_tree(params) -> None:
    if not (isinstance(params, Mapping) and {"embed_tokens", "layers", "norm"} <= set(params)):
        found = sorted(params)[:4] if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "language-model params are a nested tree: params['embed_tokens']['weight'], params['layers'][i], "
            f"params['norm'] (found {found}); a flat state dict converts with dsf.tree.unflatten_dict(lm_to_ours(flat, name))"
        )
