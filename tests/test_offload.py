"""Offload: identity on one device, prefetch order, disk streaming, the vram budget and transfer accounting."""

import contextlib
import gc
import sys
import weakref

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf import ops
from dsf.files.disk import lazy_load, record_reads
from dsf.models.flux import FluxConfig, FluxDiT, init_dit
from dsf.transforms import checkpoint
from dsf.float8 import FP8
from dsf.transforms.fp8 import fp8
from dsf.transforms.offload import GIB, count_transfers, offload

offload_module = sys.modules["dsf.transforms.offload"]
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


def two_lists():
    """A FLUX-like tree: an embedding, then a list of three "double" blocks and one of two "single" blocks."""
    g = torch.Generator().manual_seed(1)
    new_block = lambda: {"w": torch.randn(DIM, DIM, generator=g) / DIM**0.5, "b": torch.randn(DIM, generator=g)}
    return {"embed": torch.randn(DIM, DIM, generator=g), "double": [new_block() for _ in range(3)],
            "single": [new_block() for _ in range(2)]}


def dit_like(params, x, lists=("double", "single"), seen=lambda where: None):
    """Embeds ``x``, then runs ``lists`` in order; ``seen(where)`` is told before the embedding and each block."""

    def seen_then_run(name):
        def run(p, h):
            seen(name)
            return block(p, h)

        return run

    seen("embed")
    h = ops.linear(x, params["embed"])
    for name in lists:
        h = dsf.run_blocks(seen_then_run(name), params[name], h)
    return h.square().mean()


def test_each_lists_first_block_is_fetched_ahead_from_the_second_call_on():
    t = offload("cpu")
    plain, x = two_lists(), torch.randn(3, DIM)
    f, params = t(dit_like), t.init(plain)
    fetched_before = []  # (what runs next, how many blocks were fetched by then)
    seen = lambda where: fetched_before.append((where, len(moved.blocks)))
    for _ in range(2):
        with count_transfers() as moved:
            assert torch.equal(f(params, x, seen=seen), dit_like(plain, x))
        assert moved.blocks == [0, 1, 2, 0, 1]  # each block fetched once: the ones fetched ahead were taken
    first_call, second_call = fetched_before[:6], fetched_before[6:]
    assert first_call == [("embed", 0), ("double", 2), ("double", 3), ("double", 3), ("single", 5), ("single", 5)]
    # double 0 is fetched before the call computes anything, single 0 while the last double block runs
    assert second_call == [("embed", 1), ("double", 2), ("double", 3), ("double", 4), ("single", 5), ("single", 5)]


def test_gradients_through_checkpoint_and_offload_are_unchanged_when_first_blocks_come_ahead():
    t = dsf.chain(checkpoint(), offload("cpu"))
    plain, x, blocks = two_lists(), torch.randn(3, DIM), r"^(double|single)/"
    params = t.init(plain)
    reference = dsf.grad(dit_like, where=blocks)(plain, x)
    fetched_at_embedding = []
    seen = lambda where: where == "embed" and fetched_at_embedding.append(len(moved.blocks))
    for _ in range(2):  # value_and_grad builds a new params tree for each call: the lists are found by path
        with count_transfers() as moved:
            grads = dsf.grad(t(dit_like), where=blocks)(params, x, seen=seen)
        assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(reference), dsf.tree.tensors(grads), strict=True))
        assert moved.blocks == [0, 1, 2, 0, 1] + [1, 0, 2, 1, 0]  # backward recomputes in reverse, as before
    assert fetched_at_embedding == [0, 1]


def test_other_params_start_nothing_ahead_and_compute_as_before():
    t = offload("cpu")
    plain, other, x = two_lists(), {"embed": torch.eye(DIM), "blocks": stack()["blocks"]}, torch.randn(3, DIM)
    f, stored, stored_other = t(dit_like), t.init(plain), t.init(other)
    both, blocks = ("double", "single"), ("blocks",)
    fetched_at_embedding = []
    seen = lambda where: where == "embed" and fetched_at_embedding.append(len(moved.blocks))
    for params, reference, lists in ((stored, plain, both), (stored_other, other, blocks), (stored, plain, both), (stored, plain, both)):
        with count_transfers() as moved:
            assert torch.equal(f(params, x, lists, seen), dit_like(reference, x, lists))
    # the other tree holds no "double" list: nothing is fetched ahead for it, nor for the call after it
    assert fetched_at_embedding == [0, 0, 0, 1]


def test_a_first_block_fetched_ahead_and_not_used_is_freed(monkeypatch):
    fetched = []
    fetch = offload_module._fetch_block
    monkeypatch.setattr(offload_module, "_fetch_block", lambda block, index: _kept_block(fetched, fetch(block, index)))
    t = dsf.chain(checkpoint(), offload("meta"))
    params, x = t.init(two_lists()), torch.ones(3, DIM, device="meta", requires_grad=True)
    f, alive = t(dit_like), []
    count_alive = lambda where: where == "single" and alive.append(sum(ref() is not None for ref in fetched) // 2)
    f(params, x, ("double", "single"))
    with count_transfers() as moved:
        f(params, x, ("single",), count_alive)
    assert moved.blocks == [0, 0, 1]  # double 0 ahead, as the call before began with it, then the single blocks
    assert alive == [2, 1]  # double 0 is dropped when single 0 runs instead
    fetched.clear()
    with count_transfers() as moved:
        out = f(params, x, ("double", "single", "double", "single"))  # two steps: the call learns single -> double
    # single 0 ahead (the call before began with it) and dropped; the first step as the first call,
    # the second with single 0 and then double 0 fetched ahead, though no step follows
    assert moved.blocks == [0] + [0, 1, 2, 0, 1] + [0, 1, 2, 0, 1] + [0]
    gc.collect()
    assert sum(ref() is not None for ref in fetched) == 0  # freed when the call returned, though its graph lives on
    with count_transfers() as moved:
        out.backward()
    assert moved.blocks == [1, 0, 2, 1, 0] * 2  # backward, with a fresh preparer, recomputes in reverse as before


def _kept_block(refs, block):
    refs.extend(weakref.ref(record.data) for record in block.values())
    return block


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


def test_component_offload_moves_one_component_at_a_time_for_the_call_only():
    t = offload("meta", level="component")
    plain = {"dit": stack(), "vae": {"w": torch.randn(DIM, DIM)}}
    params = t.init(plain)
    dit_copies, alive_when_vae_runs = [], []

    def watched(p, h):
        dit_copies.extend(weakref.ref(w) for w in p.values())
        return h @ p["w"] + p["b"]

    def pipeline(p, x):
        for _ in range(3):  # three denoising steps: the DiT moves once
            x = dsf.run_blocks(watched, p["dit"]["blocks"], x)
        vae = dsf.materialize(p["vae"]["w"])
        alive_when_vae_runs.append(sum(ref() is not None for ref in dit_copies))
        return x @ vae

    f = t(pipeline)
    with count_transfers() as moved:
        f(params, torch.ones(1, DIM, device="meta"))
        f(params, torch.ones(1, DIM, device="meta"))
    assert moved.components == ["dit", "vae", "dit", "vae"]
    assert moved.bytes == 2 * (dsf.tree.nbytes(plain["dit"]["blocks"]) + dsf.tree.nbytes(plain["vae"]))
    assert alive_when_vae_runs == [0, 0]  # the DiT left the device when the VAE entered
    assert {x.device.type for x in dsf.tree.tensors(params)} == {"cpu"}


def test_component_offload_of_the_pipeline_gives_its_image_moving_each_component_once():
    from dsf.models.flux.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    kwargs = dict(height=32, width=32, num_inference_steps=3, progress=False)
    reference = pipe.generate(pipe.params, "a cat", **kwargs)
    t = offload("cpu", level="component")
    with count_transfers() as moved:
        image = t(pipe.generate)(t.init(pipe.params), "a cat", **kwargs)
    assert sorted(moved.components) == ["clip", "dit", "t5", "vae"] and moved.components[-2:] == ["dit", "vae"]
    assert moved.bytes <= dsf.tree.nbytes(pipe.params)  # weights never used (the VAE's encoder) never move
    assert image.tobytes() == reference.tobytes()


class FakeCuda:
    """Stands in for torch.cuda's stream API on a machine without a GPU, logging every call."""

    def __init__(self, log):
        self.log, self.made = log, 0
        self.compute = FakeStream("compute", log)

    def Stream(self, device):
        self.made += 1
        return FakeStream(f"side{self.made}", self.log)

    def current_stream(self, device=None):
        return self.compute

    @contextlib.contextmanager
    def stream(self, stream):
        self.log.append(f"enter {stream.name}")
        yield
        self.log.append(f"leave {stream.name}")


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def record_event(self):
        self.events += 1
        return f"{self.name} event {self.events}"

    def wait_event(self, event):
        self.log.append(f"{self.name} waits {event}")


def test_cuda_prefetch_waits_for_compute_then_copies_on_one_side_stream(monkeypatch):
    log = []
    fake = FakeCuda(log)
    for name in ("Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(offload_module, "_uses_streams", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda *a: log.append("record_stream"), raising=False)
    t = offload("meta")
    params = t.init(stack())

    def computed(p, h):
        log.append("compute")
        return h @ p["w"] + p["b"]

    f = t(lambda p, h: dsf.run_blocks(computed, p["blocks"], h))
    for _ in range(2):
        f(params, torch.ones(1, DIM, device="meta"))
    copy = ["side1 waits compute", "enter side1", "leave side1"]  # the copy of i + 1 waits for what compute was given: up to i - 1
    expected = lambda first: (copy + ["compute"]
                              + [f"compute waits side1 event {first}"] + copy + ["compute"]
                              + [f"compute waits side1 event {first + 1}"] + copy + ["compute"]
                              + [f"compute waits side1 event {first + 2}", "compute"])
    # one side stream for every call, and no record_stream; the first call fetches block 0 in line,
    # the second copies it on the side stream at its start, as the first call ran it first
    assert log == expected(1) + copy + ["compute waits side1 event 4"] + expected(5)
    assert fake.made == 1


def test_block_prefetch_keeps_two_fetched_blocks_alive(monkeypatch):
    fetched = []
    fetch = offload_module._fetched
    monkeypatch.setattr(offload_module, "_fetched", lambda record, device: _kept(fetched, fetch(record, device)))
    t = offload("meta")
    params = t.init(stack())
    alive = []

    def counted(p, h):
        alive.append(sum(ref() is not None for ref in fetched) // 2)  # two tensors a block
        return h @ p["w"] + p["b"]

    t(lambda p, h: dsf.run_blocks(counted, p["blocks"], h))(params, torch.ones(1, DIM, device="meta"))
    assert alive == [2, 2, 2, 1]


def _kept(refs, record):
    refs.append(weakref.ref(record.data))
    return record


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


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_factors_and_their_gradients_stay_on_the_compute_device_in_either_order(lora_first):
    from dsf.transforms import lora, lora_trainable

    pair = [lora(rank=2, where=r"^blocks/\d+/weight$"), offload("meta")]
    t = dsf.chain(*(pair if lora_first else pair[::-1]))
    plain = stack()
    plain["blocks"] = [{"weight": b["w"], "b": b["b"]} for b in plain["blocks"]]
    adapted_block = lambda p, h: torch.tanh(ops.linear(h, p["weight"], p["b"]))
    params = t.init(plain, dsf.random.key(0))
    factors = dsf.tree.select(params, lora_trainable)
    assert len(factors) == 2 * BLOCKS and {x.device.type for x in factors.values()} == {"meta"}
    assert {w.data.device.type for b in params["blocks"] for w in b.values()} == {"cpu"}
    with count_transfers() as moved:
        grads = dsf.grad(t(loss), where=lora_trainable)(params, torch.ones(3, DIM, device="meta"), adapted_block)
    assert {x.device.type for x in dsf.tree.tensors(grads)} == {"meta"}
    assert moved.bytes == dsf.tree.nbytes(plain)  # the factors never travel


def test_cuda_storage_is_one_exactly_sized_page_locked_buffer_per_block(monkeypatch):
    registered, unregistered = {}, []
    monkeypatch.setattr(offload_module, "_register", lambda pointer, size: registered.update({pointer: size}) or True)
    monkeypatch.setattr(offload_module, "_unregister", unregistered.append)
    plain = stack()
    stored = offload("cuda").init(plain)  # nothing here touches a GPU: storage is host memory
    for block, original in zip(stored["blocks"], plain["blocks"]):
        assert len({w.data.untyped_storage().data_ptr() for w in block.values()}) == 1  # views of one buffer
        assert all(torch.equal(w.data, original[name]) for name, w in block.items())
    aligned = lambda tensor: -(-tensor.nbytes // offload_module.BUFFER_ALIGNMENT) * offload_module.BUFFER_ALIGNMENT
    block_size = aligned(plain["blocks"][0]["w"]) + aligned(plain["blocks"][0]["b"])
    assert sorted(registered.values()) == sorted([aligned(plain["head"])] + [block_size] * BLOCKS)
    del stored, block
    gc.collect()
    assert sorted(unregistered) == sorted(registered)  # each buffer unregistered once its last view is gone


def test_disk_offload_opens_each_file_once_per_call(tmp_path, monkeypatch):
    import dsf.files.disk as disk

    plain, x = stack(), torch.randn(3, DIM)
    save_file(dsf.tree.flatten_dict(plain), tmp_path / "stack.safetensors")
    opened = []
    real_open = disk.safe_open
    monkeypatch.setattr(disk, "safe_open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for level in ("block", "component"):
        t = offload("cpu", level=level)
        params = t.init(lazy_load(tmp_path / "stack.safetensors"))
        opened.clear()
        with record_reads() as reads:
            for _ in range(2):
                assert torch.equal(t(loss)(params, x), loss(plain, x))
        assert len(reads) == 2 * (2 * BLOCKS + 1) and len(opened) == 2, level  # one open per call, not per tensor
