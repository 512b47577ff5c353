"""dsf.model_parts.decoder_lm against transformers at fp32: Qwen3 (model and causal-LM layouts), Qwen2.5-VL's language
model with 3-D positions, Mistral3's language model with a sliding window; batched prompts with padding; layers run
one at a time through run_blocks (so fp8 and block offload stream them), and only as many as the states asked for
need."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

import dsf
from dsf.model_parts.decoder_lm import hidden_states_fn, lm_shapes, lm_to_ours, stack_of
from dsf.transforms import fp8, offload
from dsf.transforms.offload import count_transfers
from dsf.tree import flatten_dict, unflatten_dict

TEXT = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 4, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**TEXT))


def qwen25_vl():
    rope = {"rope_type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000.0}
    vision = {"depth": 1, "hidden_size": 16, "out_hidden_size": 16, "num_heads": 2, "intermediate_size": 32}
    text = {key: value for key, value in TEXT.items() if key != "head_dim"}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision))


def mistral3():
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8}
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config={**TEXT, "sliding_window": 3}, vision_config=vision))


MODELS = {"qwen3": qwen3, "qwen2.5-vl": qwen25_vl, "mistral3": mistral3}


def tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return ids.masked_fill(mask == 0, 0), mask


def loaded(make):
    torch.manual_seed(0)
    model = make().eval()
    for parameter in model.parameters():  # norms start at one: perturb them so a missed norm shows
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    return model, unflatten_dict(lm_to_ours(model.state_dict(), type(model).__name__))


def reference_states(model, **inputs):
    with torch.no_grad():
        stack = stack_of(model)
        return stack(**inputs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("name", MODELS)
def test_every_hidden_state_equals_transformers_with_padding(name):
    model, params = loaded(MODELS[name])
    ids, mask = tokens()
    expected = reference_states(model, input_ids=ids, attention_mask=mask)
    layers = tuple(range(len(expected))) + (-2, -1)
    got = hidden_states_fn(stack_of(model), layers)(params, ids, mask)
    valid = mask.bool()  # a padding query past Mistral's sliding window sees no key: its state is unspecified
    for index, state in zip(layers, got):
        torch.testing.assert_close(state[valid], expected[index][valid], rtol=1e-5, atol=1e-5, msg=f"state {index}")


def test_qwen25_vl_takes_3d_positions_and_input_embeddings():
    model, params = loaded(qwen25_vl)
    ids, mask = tokens()
    generator = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 9, (3, 2, 7), generator=generator)
    embeds = torch.randn(2, 7, 16, generator=generator)
    expected = reference_states(model, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)[-1]
    (got,) = hidden_states_fn(stack_of(model), (-1,))(params, attention_mask=mask, inputs_embeds=embeds, position_ids=positions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_causal_lm_layout_and_the_bare_model_layout_read_the_same_params():
    model, params = loaded(qwen3)
    bare = Qwen3Model(model.config)
    bare.load_state_dict(flatten_dict(params))
    assert sorted(lm_to_ours(bare.state_dict(), "Qwen3")) == sorted(lm_to_ours(model.state_dict(), "Qwen3"))
    assert lm_shapes(stack_of(model)) == {key: tuple(value.shape) for key, value in flatten_dict(params).items()}


def test_layers_run_through_run_blocks_and_only_the_needed_ones():
    model, params = loaded(qwen3)
    ids, mask = tokens()
    ran = []

    def counting(block_call, site):
        def call(block, carry, *args, **kwargs):
            ran.append(site.path)
            return block_call(block, carry, *args, **kwargs)

        return call

    seen = dsf.Transform("seen", hooks=(dsf.transform.BlockHook(wrap=counting, rank=0, blocks="layers"),))
    (state,) = seen(hidden_states_fn(stack_of(model), (2,)))(params, ids, mask)
    assert ran == ["layers/0", "layers/1"]
    torch.testing.assert_close(state, reference_states(model, input_ids=ids, attention_mask=mask)[2], rtol=1e-5, atol=1e-5)


def test_a_stack_built_on_meta_runs_on_loaded_params():
    model, params = loaded(qwen3)
    ids, mask = tokens()
    with torch.device("meta"):
        meta = Qwen3ForCausalLM(model.config)
    (got,) = hidden_states_fn(stack_of(meta), (-1,))(params, ids, mask)
    torch.testing.assert_close(got, reference_states(model, input_ids=ids, attention_mask=mask)[-1], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    model, params = loaded(qwen3)
    with pytest.raises(ValueError, match="hidden state 9 of a 4-layer model"):
        hidden_states_fn(stack_of(model), (9,))
    with pytest.raises(ValueError, match="nested tree"):
        hidden_states_fn(stack_of(model), (-1,))(flatten_dict(params), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        hidden_states_fn(stack_of(model), (-1,))(params, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="holds no decoder stack"):
        stack_of(torch.nn.Linear(1, 1))


def test_layers_stream_under_fp8_and_block_offload():
    model, params = loaded(qwen3)
    ids, mask = tokens()
    stack = dsf.chain(fp8(where=r"^layers/", compute_dtype=torch.float32), offload(device="cpu"))
    encode = hidden_states_fn(stack_of(model), (-1,))
    with count_transfers() as moved:
        (got,) = stack(encode)(stack.init(params), ids, mask)
    (plain,) = encode(params, ids, mask)
    assert moved.blocks == list(range(len(params["layers"])))  # each layer fetched once, in order
    assert 0 < (got - plain).norm() / plain.norm() < 0.1  # fp8 storage: near, not equal
