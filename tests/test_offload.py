"""Offload: identity on one device, prefetch order, disk streaming, the vram budget and transfer accounting."""

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf import ops
from dsf.files.disk import lazy_load, record_reads
from dsf.models.flux import FluxConfig, FluxDiT, init_dit
from dsf.transforms import checkpoint
from dsf.transforms.fp8 import FP8, fp8
from dsf.transforms.offload import GIB, count_transfers, offload
from dsf.weight import Stage, Weight, map_weights, stage

CFG = FluxConfig(
    num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2, num_single_blocks=2, context_dim=32, pooled_dim=16
)
BLOCKS, DIM = 4, 8


def flux_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g).to(dtype)
    return latents, torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g), torch.full((2,), 3.5)


def stack():
    g = torch.Generator().manual_seed(0)
    blocks = [{"w": torch.randn(DIM, DIM, generator=g) / DIM**0.5, "b": torch.randn(DIM, generator=g)} for _ in range(BLOCKS)]
    return {"blocks": blocks, "head": torch.randn(DIM, DIM, generator=g)}


def block(p, h):
    return torch.tanh(ops.linear(h, p["w"], p["b"]))


def loss(params, x, block_fn=block):
    return ops.linear(dsf.run_blocks(block_fn, params["blocks"], x), params["head"]).square().mean()


def block_bytes(params):
    return dsf.tree.nbytes(params["blocks"][0])


def test_offload_to_the_same_device_equals_the_plain_function_exactly():
    params = init_dit(CFG, dsf.random.key(0))
    dit, inputs = FluxDiT(CFG), flux_inputs()
    reference = dit(params, *inputs)
    for t in (offload("cpu"), offload("cpu", vram_limit=1e-5), offload("cpu", level="component")):
        assert torch.equal(t(dit)(t.init(params), *inputs), reference), t.name
    x, plain = torch.randn(3, DIM), stack()
    t = dsf.chain(offload("cpu"), checkpoint())
    v1, g1 = dsf.value_and_grad(loss, where="blocks")(plain, x)
    v2, g2 = dsf.value_and_grad(t(loss), where="blocks")(t.init(plain), x)
    assert torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(g1), dsf.tree.tensors(g2), strict=True))


def test_prefetch_runs_forward_then_reverse_in_checkpoint_backward():
    t = offload("cpu")
    params, x = t.init(stack()), torch.randn(3, DIM)
    fetched_when_running = []

    def watched(p, h):
        fetched_when_running.append(list(moved.blocks))
        return block(p, h)

    with count_transfers() as moved:
        t(loss)(params, x, watched)
    assert fetched_when_running == [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]  # block i runs with i + 1 fetched
    with count_transfers() as moved:
        dsf.grad(dsf.chain(checkpoint(), t)(loss), where="blocks")(params, x)
    assert moved.blocks == [0, 1, 2, 3, 3, 2, 1, 0]
    with count_transfers() as moved:
        dsf.grad(t(loss), where="blocks")(params, x)
    assert moved.blocks == [0, 1, 2, 3]  # without checkpointing, backward keeps the fetched weights


def test_bytes_moved_per_forward_and_per_checkpointed_step():
    t = offload("cpu")
    plain = stack()
    params, x = t.init(plain), torch.randn(3, DIM)
    with count_transfers() as moved:
        t(loss)(params, x)
    assert moved.bytes == dsf.tree.nbytes(plain) and moved.tensors == 2 * BLOCKS + 1
    with count_transfers() as moved:
        dsf.grad(dsf.chain(checkpoint(), t)(loss), where="blocks")(params, x)
    assert moved.bytes == dsf.tree.nbytes(plain["head"]) + 2 * dsf.tree.nbytes(plain["blocks"])


def test_vram_limit_keeps_the_first_blocks_resident():
    plain, x = stack(), torch.randn(3, DIM)
    reference = loss(plain, x)
    two_blocks_and_head = (2 * block_bytes(plain) + dsf.tree.nbytes(plain["head"])) / GIB
    for vram_limit, streamed in ((0, [0, 1, 2, 3]), (two_blocks_and_head, [2, 3]), (1.0, [])):
        t = offload("cpu", vram_limit=vram_limit)
        params = t.init(plain)
        with count_transfers() as moved:
            assert torch.equal(t(loss)(params, x), reference)
        assert moved.blocks == streamed
        assert moved.bytes == len(streamed) * block_bytes(plain) + (dsf.tree.nbytes(plain["head"]) if vram_limit == 0 else 0)
        assert [isinstance(b["w"], Weight) for b in params["blocks"]] == [i in streamed for i in range(BLOCKS)]


def test_block_weights_live_on_the_device_only_while_their_block_runs():
    t = offload("meta")
    params = t.init(stack())
    devices = []

    def on_meta(p, h):
        devices.append({p["w"].device.type, p["b"].device.type})
        return h @ p["w"] + p["b"]

    out = t(lambda p, h: dsf.run_blocks(on_meta, p["blocks"], h))(params, torch.ones(1, DIM, device="meta"))
    assert out.device.type == "meta" and devices == [{"meta"}] * BLOCKS
    assert {w.data.device.type for b in params["blocks"] for w in b.values()} == {"cpu"}


def test_component_offload_moves_the_params_for_the_call_only():
    t = offload("meta", level="component")
    plain = stack()
    params = t.init(plain)
    seen = []
    f = t(lambda p, x: seen.append({leaf.device.type for leaf in dsf.tree.tensors(p)}) or x)
    with count_transfers() as moved:
        f(params, 1)
        f(params, 2)
    assert seen == [{"meta"}, {"meta"}]
    assert moved.bytes == 2 * dsf.tree.nbytes(plain) and moved.blocks == []
    assert all(a is b for a, b in zip(dsf.tree.tensors(params), dsf.tree.tensors(plain), strict=True))


def test_disk_offload_reads_each_block_when_it_runs(tmp_path):
    plain, x = stack(), torch.randn(3, DIM)
    save_file(dsf.tree.flatten_dict(plain), tmp_path / "stack.safetensors")
    t = offload("cpu")
    with record_reads() as reads:
        params = t.init(lazy_load(tmp_path / "stack.safetensors"))
    assert reads == []

    def logged(p, h):
        reads.append("run")
        return block(p, h)

    with record_reads() as reads:
        assert torch.equal(t(loss)(params, x, logged), loss(plain, x))
    keys = lambda i: [f"blocks.{i}.b", f"blocks.{i}.w"]
    expected = keys(0) + keys(1) + ["run"] + keys(2) + ["run"] + keys(3) + ["run", "run", "head"]
    assert reads == expected  # each tensor read once, one block ahead of its run


def test_disk_offload_of_flux_equals_in_ram(tmp_path):
    params = init_dit(CFG, dsf.random.key(0))
    save_file(dsf.tree.flatten_dict(params), tmp_path / "dit.safetensors")
    dit, inputs = FluxDiT(CFG), flux_inputs()
    lazy = lazy_load(tmp_path / "dit.safetensors")
    with pytest.raises(TypeError, match="offload"):
        dit(lazy, *inputs)
    with pytest.raises(ValueError, match="on disk"):
        fp8().init(lazy)
    t = offload("cpu")
    with record_reads() as reads:
        out = t(dit)(t.init(lazy), *inputs)
    assert torch.equal(out, dit(params, *inputs))
    assert sorted(reads) == sorted(dsf.tree.flatten_dict(params))


def test_fp8_and_offload_commute_and_stream_fp8_bytes():
    params = init_dit(CFG, dsf.random.key(0), dtype=torch.bfloat16)
    dit, inputs = FluxDiT(CFG), flux_inputs(torch.bfloat16)
    outputs, moved_bytes = [], []
    for transforms in ((fp8(), offload("cpu")), (offload("cpu"), fp8())):
        t = dsf.chain(*transforms)
        stored = t.init(params)
        assert stored["transformer_blocks"][0]["ff"]["net"]["2"]["weight"].data.dtype == FP8
        with count_transfers() as moved:
            outputs.append(t(dit)(stored, *inputs))
        moved_bytes.append(moved.bytes)
    assert torch.equal(outputs[0], outputs[1]) and moved_bytes[0] == moved_bytes[1]
    assert moved_bytes[0] < 0.6 * dsf.tree.nbytes(params)


@stage("adapt")
class Shift(Stage):
    """A trainable adapt stage for the test: ``w + up @ down``."""

    down: torch.Tensor
    up: torch.Tensor

    def apply(self, value):
        return value + self.up @ self.down


def test_adapt_factors_train_through_fp8_block_offload_and_checkpoint():
    g = torch.Generator().manual_seed(5)
    factors = lambda _, w: Weight(w).with_stage(Shift(torch.randn(1, DIM, generator=g), torch.randn(DIM, 1, generator=g)))
    params, x = map_weights(factors, stack(), r"^blocks/\d+/w$"), torch.randn(3, DIM)
    quantized = fp8(where="blocks", compute_dtype=torch.float32)
    t = dsf.chain(checkpoint(), offload("cpu"), quantized)
    reference = dsf.grad(loss, where="adapt")(quantized.init(params), x)
    grads = dsf.grad(t(loss), where="adapt")(t.init(params), x)
    pairs = list(zip(dsf.tree.tensors(reference), dsf.tree.tensors(grads), strict=True))
    assert len(pairs) == 2 * BLOCKS and all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in pairs)
