"""T5-family text encoders run layer by layer through dsf.run_blocks: block hooks, offload, checkpoint, fp8.

Tiny random T5 (FLUX.1's T5-XXL layout: block 0 alone holds the relative position bias) and umT5
(Wan's: every block holds its own) encoders from transformers, compared against those modules.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.files.disk import lazy_load
from dsf.model_parts import t5_encoder
from dsf.transform import BlockHook, Transform
from dsf.transforms import checkpoint
from dsf.float8 import FP8
from dsf.transforms.fp8 import fp8
from dsf.transforms.offload import count_transfers, offload
from dsf.weight import count_materializations

TINY = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 4, "num_decoder_layers": 1, "num_heads": 2}
LAYERS = TINY["num_layers"]
PAD = 0


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else noise / max(p[0].numel(), 1) ** 0.5)


@pytest.fixture(scope="module", params=["t5", "umt5"])
def encoder(request):
    """(module, params, encode): a transformers encoder, our params tree of it, and our encode with padding masked."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = {"t5": (T5EncoderModel, T5Config), "umt5": (UMT5EncoderModel, UMT5Config)}[request.param]
    module = model(config(**t5_encoder.XXL_CONFIG | TINY)).eval()
    _randomize(module, 0)
    flat = {k: v for k, v in module.state_dict().items() if k != t5_encoder.STACK_EMBEDDING}
    return module, dsf.tree.unflatten_dict(flat), t5_encoder.last_hidden_fn(module, PAD)


def _ids() -> torch.Tensor:
    ids = torch.randint(1, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    ids[1, 7:] = PAD
    return ids


def _reference(module, ids: torch.Tensor) -> torch.Tensor:
    keep = ids.ne(PAD)
    with torch.no_grad():
        states = module(input_ids=ids, attention_mask=keep.long()).last_hidden_state
    return states * keep[..., None]


def _watch(log: list) -> Transform:
    """A block hook inside offload's fetch: logs (block index, the block's tensors as it runs) to ``log``."""

    def wrap(call, site):
        def run(block_params, carry, *args, **kwargs):
            log.append((site.index, dsf.tree.tensors(block_params)))
            return call(block_params, carry, *args, **kwargs)

        return run

    return Transform(name="watch", hooks=(BlockHook(rank=12, wrap=wrap, name="watch"),))


def test_the_blocks_are_a_list_and_each_runs_through_run_blocks(encoder):
    module, params, encode = encoder
    ids, log = _ids(), []
    assert isinstance(params["encoder"]["block"], list) and len(params["encoder"]["block"]) == LAYERS
    with torch.no_grad():
        states = _watch(log)(encode)(params, ids)
    assert [index for index, _ in log] == list(range(LAYERS))
    assert torch.equal(states, _reference(module, ids))


def test_t5_without_padding_equals_transformers_exactly(encoder):
    module, params, _ = encoder
    ids = _ids().clamp(min=1)
    with torch.no_grad():
        assert torch.equal(t5_encoder.last_hidden_fn(module)(params, ids), module(input_ids=ids).last_hidden_state)


def test_block_offload_from_disk_keeps_about_one_layer_resident(encoder, tmp_path):
    """Each layer is read when its turn comes (one ahead), and freed before the next layer runs."""
    module, params, encode = encoder
    save_file(dsf.tree.flatten_dict(params), tmp_path / "t5.safetensors")
    t = offload("cpu")
    streamed, ids = t.init(lazy_load(tmp_path / "t5.safetensors")), _ids()
    fetched_when_running, alive_when_running = [], []
    seen: list[list[weakref.ref]] = []

    def wrap(call, site):
        def run(block_params, carry, *args, **kwargs):
            fetched_when_running.append(list(moved.blocks))
            alive_when_running.append([i for i, refs in enumerate(seen) if any(r() is not None for r in refs)])
            seen.append([weakref.ref(x) for x in dsf.tree.tensors(block_params)])
            return call(block_params, carry, *args, **kwargs)

        return run

    watch = Transform(name="watch", hooks=(BlockHook(rank=12, wrap=wrap, name="watch"),))
    with torch.no_grad(), count_transfers() as moved:
        states = dsf.chain(t, watch)(encode)(streamed, ids)
    assert torch.equal(states, _reference(module, ids))
    assert moved.blocks == list(range(LAYERS)) and moved.bytes == dsf.tree.nbytes(params)
    assert fetched_when_running == [list(range(min(i + 2, LAYERS))) for i in range(LAYERS)]
    assert alive_when_running == [[]] * LAYERS  # the layers that ran before are released


def test_checkpoint_recomputes_the_layers_in_backward_with_the_same_gradients(encoder):
    _, params, encode = encoder
    ids = _ids()
    loss = lambda p: encode(p, ids).square().sum()
    with count_materializations() as plain_count:
        value, grads = dsf.value_and_grad(loss, where="encoder")(dsf.tree.map_with_path(lambda _, x: dsf.Weight(x), params))
    with count_materializations() as hooked_count:
        hooked_value, hooked_grads = dsf.value_and_grad(checkpoint()(loss), where="encoder")(
            dsf.tree.map_with_path(lambda _, x: dsf.Weight(x), params)
        )
    block_weights = len(dsf.tree.flatten_dict(params["encoder"]["block"]))
    assert hooked_count[0] == plain_count[0] + block_weights  # every layer materialized again in backward
    assert torch.equal(value, hooked_value)
    assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(grads), dsf.tree.tensors(hooked_grads), strict=True))
    assert grads["encoder"]["block"][0]["layer"][0]["SelfAttention"]["relative_attention_bias"]["weight"].data.abs().sum() > 0


def test_checkpointed_block_offload_fetches_forward_then_reverse(encoder):
    _, params, encode = encoder
    t = offload("cpu")
    stored, ids = t.init(params), _ids()
    with count_transfers() as moved:
        dsf.grad(dsf.chain(checkpoint(), t)(lambda p: encode(p, ids).square().sum()), where="encoder")(stored)
    assert moved.blocks == list(range(LAYERS)) + list(reversed(range(LAYERS)))


def test_fp8_storage_composes_with_block_offload(encoder):
    module, params, encode = encoder
    ids, quantized = _ids(), fp8(compute_dtype=torch.float32)
    stored = quantized.init(params)
    assert stored["encoder"]["block"][1]["layer"][1]["DenseReluDense"]["wo"]["weight"].data.dtype == FP8
    with torch.no_grad():
        decoded = encode(dsf.materialize_tree(stored), ids)
        alone = quantized(encode)(stored, ids)
        t = dsf.chain(quantized, offload("cpu"))
        with count_transfers() as moved:
            streamed = t(encode)(t.init(params), ids)
    assert torch.equal(alone, decoded) and torch.equal(streamed, decoded)
    assert moved.blocks == list(range(LAYERS)) and moved.bytes < 0.4 * dsf.tree.nbytes(params)
    reference = _reference(module, ids)  # per-tensor fp8 of random weights through 4 layers: about 25% off
    assert (decoded - reference).norm() < 0.5 * reference.norm()


def test_a_flat_state_dict_is_a_clear_error(encoder):
    _, params, encode = encoder
    with pytest.raises(ValueError, match="nested tree.*dsf.tree.unflatten_dict"):
        encode(dsf.tree.flatten_dict(params), _ids())


def test_a_t5_block_output_without_the_position_bias_names_the_transformers_version():
    import transformers

    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}'s T5 block.*4.44 to 5.x"):
        t5_encoder._states_and_bias((torch.zeros(1, 2, 4),))
