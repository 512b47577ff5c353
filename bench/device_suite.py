"""Every GPU measurement in one short run: one table, one JSON file.

    python bench/device_suite.py --device cuda                       # full-size random weights, <= 8 minutes on one H100
    python bench/device_suite.py --device cpu --small --out o.json   # tiny configs, seconds (what tests/ runs)

Rows, in this order (random weights, nothing downloaded; ``--small`` swaps every model for a tiny config):

a. FLUX DiT small config: parity with diffusers' FluxTransformer2DModel and the dsf/diffusers time ratio
   of the forward and of forward+backward (skipped when diffusers is missing);
b. FLUX.1-dev DiT in bf16 at 1024² (4,096 image + 512 text tokens): the resident step (seconds, FLOP/s
   from the model's FLOP count, counted on ``meta``, against the card's bf16 peak and a measured
   matmul), eager and under ``compile()`` (first-call seconds apart), and against diffusers over the same weights; block offload with prefetch against the PCIe floor (bytes moved / host-to-device bandwidth
   measured here), its allocated / reserved / active peaks against two blocks + the resident
   activations, three consecutive calls' reserved memory and allocator retries, and whether copy and
   compute overlapped; fp8 storage + block offload;
c. component offload of the tiny FLUX pipeline: the peak against its largest component;
d. a LoRA training step at 1024² (rank 32 on the attention projections, checkpoint, fp8 base), resident
   and under block offload: seconds, peaks, where the LoRA gradients live, device-to-host copies seen
   by the profiler;
e. the same step with ``checkpoint(offload_activations=True)`` against without: peaks;
f. T5-XXL's encoder stored as fp8 on the CPU, streamed block by block (its layers run through ``run_blocks``);
g. Wan 2.1-T2V-14B DiT, 480×832 × 17 frames: resident against block offload;
h. which scaled-dot-product-attention kernel ran in each model (profiler op names).

Every row is guarded: a row that fails, does not fit or runs past its time budget prints why, and the
suite goes on; memory is freed between rows. Memory figures are GiB above the level before the call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

import dsf
from dsf.diffusion.losses import flow_matching_loss
from dsf.models import flux, wan
from dsf.models.flux.model import param_shapes as flux_shapes
from dsf.models.wan.model import param_shapes as wan_shapes
from dsf.training.optim import adamw
from dsf.transforms import checkpoint, fp8, lora, lora_trainable, offload
from dsf.transforms import compile as compile_blocks
from dsf.transforms.offload import count_transfers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_dit  # noqa: E402

GIB = 2**30
SUITE_SECONDS = 470  # the whole run by default, under 8 minutes (--seconds)
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))  # dense bf16 FLOP/s by device-name fragment
SDPA_KERNELS = (("flash_attention_for_cpu", "flash (cpu)"), ("flash_attention", "flash"), ("efficient_attention", "efficient"),
                ("cudnn_attention", "cudnn"), ("attention_math", "math"), ("overrideable", "overrideable"))
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The models and inputs of a run: full size on a GPU, tiny with ``--small``."""

    flux: flux.FluxConfig
    latent_size: int  # FLUX latents are (16, latent_size, latent_size): 1024² -> 128
    text_len: int
    wan: wan.WanConfig
    wan_latents: tuple  # (C, T, H, W)
    wan_text_len: int
    repeats: int


FULL = Sizes(flux.FluxConfig(), 128, 512, wan.WanConfig(), (16, 5, 60, 104), 512, repeats=3)
SMALL = Sizes(
    flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2, num_single_blocks=2,
                    context_dim=32, pooled_dim=16),
    8, 8,
    wan.WanConfig(num_heads=2, head_dim=16, ffn_dim=32, num_layers=2, text_dim=16, freq_dim=32),
    (16, 2, 4, 4), 8, repeats=2,
)


@dataclasses.dataclass
class Row:
    """One line of the table: ``status`` is ok, skipped or failed; ``reason`` says why when not ok."""

    id: str
    name: str
    status: str = "ok"
    reason: str = ""
    seconds: float = 0.0
    values: dict = dataclasses.field(default_factory=dict)


class Skip(Exception):
    """A row that cannot run here, with the reason."""


class OverBudget(Exception):
    """A row that ran past its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`OverBudget` in this (main) thread after ``seconds``; a no-op where SIGALRM is missing."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise OverBudget(f"ran past its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Suite:
    """The rows measured so far, the device, and the time left."""

    def __init__(self, device: torch.device, small: bool, seconds: float = SUITE_SECONDS):
        self.device, self.small, self.seconds = device, small, seconds
        self.sizes = SMALL if small else FULL
        self.started = time.perf_counter()
        self.rows: list[Row] = []
        self.backends: dict[str, str] = {}
        self.shared: dict = {}  # what several rows use: the FLUX weights, the resident activations

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def run(self, row_id: str, name: str, budget: float, measure: Callable[[], dict]) -> Row:
        """Measure one row under its budget (shrunk to the suite's time left), never raising."""
        row = Row(row_id, name)
        limit = min(budget, self.left())
        start = time.perf_counter()
        if limit < 5:
            row.status, row.reason = "skipped", f"not started: {self.left():.0f} s left of the suite's {self.seconds:g} s"
        else:
            try:
                with time_limit(limit):
                    row.values = measure()
            except Skip as reason:
                row.status, row.reason = "skipped", str(reason)
            except torch.cuda.OutOfMemoryError as error:
                row.status, row.reason = "skipped", f"does not fit: {str(error).splitlines()[0]}"
            except OverBudget as error:
                row.status, row.reason = "failed", str(error)
            except Exception as error:  # a row's failure is reported, the suite goes on
                where = traceback.extract_tb(error.__traceback__)[-1]
                row.status, row.reason = "failed", f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
        row.seconds = time.perf_counter() - start
        free_memory(self.device)
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


def free_memory(device: torch.device) -> None:
    """Drop what the last row left: Python garbage, the CUDA allocators' cached device segments and pinned
    host blocks (offload rows pin tens of GB), the peaks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # pinned host blocks the caching host allocator kept


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up, synchronized on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peaks(fn: Callable, device: torch.device) -> dict:
    """``flux_dit.memory_peaks`` of one call on CUDA (GiB allocated, reserved, active above before, retries); {} elsewhere.

    The allocator's cached segments are released first, so reserved memory counts what the call itself needs.
    """
    if device.type != "cuda":
        fn()
        return {}
    free_memory(device)
    found = flux_dit.memory_peaks(fn, device)
    return {**{f"peak_{kind}_gib": round(found[kind], 3) for kind in ("allocated", "reserved", "active")},
            "alloc_retries": found["retries"]}


def sdpa_kernel(fn: Callable) -> str:
    """The scaled-dot-product-attention kernels that ran in ``fn()``, from the profiler's op names.

    >>> q = torch.randn(1, 1, 4, 8)
    >>> sdpa_kernel(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) in ("flash (cpu)", "math")
    True
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    names = {event.key for event in profile.key_averages() if "scaled_dot_product" in event.key}
    found = [next((label for fragment, label in SDPA_KERNELS if fragment in name), None) for name in sorted(names)]
    return "+".join(dict.fromkeys(label for label in found if label)) or "none seen"


def forward_flops(call: Callable, *args, **kwargs) -> int:
    """FLOPs of one call of ``call`` over ``meta`` arguments (counted by torch, nothing computed)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(*args, **kwargs)
    return counter.get_total_flops()


def bf16_peak(device: torch.device) -> float | None:
    """The card's dense bf16 FLOP/s from its name, None for an unknown card or the CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in BF16_PEAK if fragment in name), None)


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured FLOP/s of one ``size``³ matmul in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: a @ a, device, 3)
    return 2 * size**3 / seconds


def host_to_device_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB copy from pinned host memory to ``device``."""
    source = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(GIB, dtype=torch.uint8, device=device)
    seconds = seconds_per_call(lambda: target.copy_(source, non_blocking=True), device, 3)
    return GIB / seconds


def random_params(shapes: dict, device, dtype: torch.dtype, hidden: int) -> dict:
    """Random full-size weights made on ``device``: matrices N(0, 0.02²) (modulation tables N(0, 1/hidden)),
    1-D weights (norm scales) 1, biases 0.

    >>> tree = random_params({"a.weight": (2, 3), "a.bias": (2,), "n.weight": (3,)}, "cpu", torch.float32, 4)
    >>> tree["a"]["bias"].tolist(), tree["n"]["weight"].tolist()
    ([0.0, 0.0], [1.0, 1.0, 1.0])
    """
    generator = torch.Generator(device).manual_seed(0)
    flat = {}
    for key, shape in shapes.items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if key.endswith("scale_shift_table"):
            tensor.normal_(0, hidden**-0.5, generator=generator)
        elif len(shape) > 1:
            tensor.normal_(0, 0.02, generator=generator)
        else:
            tensor.fill_(1.0 if key.endswith(".weight") else 0.0)
        flat[key] = tensor
    return dsf.tree.unflatten_dict(flat)


def largest_block_bytes(blocks: list) -> int:
    return max(dsf.tree.nbytes(block) for block in blocks)


# ----------------------------------------------------------------------------- a: small-config parity


def parity_row(suite: Suite) -> dict:
    if importlib.util.find_spec("diffusers") is None:
        raise Skip("diffusers is not installed (pip install diffusers)")
    device, dtype = suite.device, torch.float32
    reference = flux_dit.reference_model(False, device, dtype)
    dit, params = flux.load_dit(reference.state_dict(), config={"axes_dims_rope": list(reference.config.axes_dims_rope)},
                                device=device, dtype=dtype)
    x = flux_dit.inputs(reference, 1, 16 if suite.small else 32, 16 if suite.small else 64, device, dtype)
    flux_dit.trained_subset(reference, full=False)
    passes = flux_dit.timed_passes(lambda p: dit(p, **x), params, reference, lambda: flux_dit.diffusers_call(reference, **x))
    with torch.no_grad():
        ours, theirs = passes[0][1](), passes[0][2]()
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    suite.backends["FLUX small (dsf)"] = sdpa_kernel(passes[0][1])
    suite.backends["FLUX small (diffusers)"] = sdpa_kernel(passes[0][2])
    rows = flux_dit.interleaved(passes, suite.sizes.repeats, device)
    values = {"max_relative_difference": float(f"{error:.3g}")}
    for name, ours_s, theirs_s in rows:
        values[f"{name}_dsf_s"], values[f"{name}_ratio"] = round(ours_s, 5), round(ours_s / theirs_s, 3)
    return values


# ----------------------------------------------------------------------------- b, d, e: FLUX.1-dev


def flux_inputs(suite: Suite, device) -> dict:
    """The DiT's keyword inputs at the run's size, in bf16 (fp32 with --small on the CPU)."""
    size, text, cfg = suite.sizes.latent_size, suite.sizes.text_len, suite.sizes.flux
    dtype = flux_dtype(suite)
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(1, 16, size, size, generator=g).to(device, dtype),
        timestep=torch.full((1,), 0.7, device=device),
        text_embeds=torch.randn(1, text, cfg.context_dim, generator=g).to(device, dtype),
        pooled_embeds=torch.randn(1, cfg.pooled_dim, generator=g).to(device, dtype),
        guidance=torch.full((1,), 3.5, device=device),
    )


def flux_dtype(suite: Suite) -> torch.dtype:
    return torch.float32 if suite.device.type == "cpu" else torch.bfloat16


def flux_params(suite: Suite) -> dict:
    """The run's random FLUX weights on the device, made once and shared by rows b, d and e."""
    if "flux" not in suite.shared:
        cfg = suite.sizes.flux
        suite.shared["flux"] = random_params(flux_shapes(cfg), suite.device, flux_dtype(suite), cfg.hidden_size)
    return suite.shared["flux"]


def flux_resident_row(suite: Suite) -> dict:
    device, cfg = suite.device, suite.sizes.flux
    params, x, dit = flux_params(suite), flux_inputs(suite, device), flux.FluxDiT(cfg)
    meta = {k: v.to("meta") for k, v in x.items()}
    flops = forward_flops(dit, dsf.tree.map_with_path(lambda _, t: t.to("meta"), params), **meta)
    with torch.no_grad():
        call = lambda: dit(params, **x)
        seconds = seconds_per_call(call, device, suite.sizes.repeats)
        memory = peaks(call, device)
        suite.backends["FLUX DiT (dsf)"] = sdpa_kernel(call)
    suite.shared["flux_resident_s"] = seconds
    suite.shared["flux_activations_gib"] = memory.get("peak_allocated_gib")
    achieved = flops / seconds
    peak = bf16_peak(device)
    measured = matmul_flops(device, flux_dtype(suite), 8192 if device.type == "cuda" else 256)
    return {"s_per_step": round(seconds, 4), "tflop_per_step": round(flops / 1e12, 3), "tflops": round(achieved / 1e12, 2),
            "fraction_of_bf16_peak": None if peak is None else round(achieved / peak, 3),
            "fraction_of_measured_matmul": round(achieved / measured, 3), "weights_gib": round(dsf.tree.nbytes(params) / GIB, 2),
            **memory}


def flux_diffusers_row(suite: Suite) -> dict:
    """The resident step of dsf against diffusers' FluxTransformer2DModel at the same size, over the same tensors (the
    reference is built on ``meta`` and takes dsf's weights by assignment, so no second copy is made), interleaved."""
    if importlib.util.find_spec("diffusers") is None:
        raise Skip("diffusers is not installed (pip install diffusers)")
    from diffusers import FluxTransformer2DModel

    from dsf.models.flux.config import DIFFUSERS_KEYS

    device, cfg = suite.device, suite.sizes.flux
    params, x, dit = flux_params(suite), flux_inputs(suite, device), flux.FluxDiT(cfg)
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**{key: getattr(cfg, field) for key, field in DIFFUSERS_KEYS.items()}).eval()
    reference.load_state_dict(dsf.tree.flatten_dict(params), assign=True)
    with torch.no_grad():
        ours, theirs = lambda: dit(params, **x), lambda: flux_dit.diffusers_call(reference, **x)
        error = float((ours() - theirs()).float().abs().max() / theirs().float().abs().max())
        (_, ours_s, theirs_s), = flux_dit.interleaved([("forward", ours, theirs)], suite.sizes.repeats, device)
        suite.backends["FLUX DiT (diffusers)"] = sdpa_kernel(theirs)
    return {"dsf_s": round(ours_s, 4), "diffusers_s": round(theirs_s, 4), "dsf_x_diffusers": round(ours_s / theirs_s, 3),
            "max_relative_difference": float(f"{error:.3g}")}


def flux_compiled_row(suite: Suite) -> dict:
    """The resident step under ``compile()`` (regional: one compiled body per block kind) against eager (row b1)."""
    device, cfg = suite.device, suite.sizes.flux
    params, x = flux_params(suite), flux_inputs(suite, device)
    dit = compile_blocks()(flux.FluxDiT(cfg))
    with torch.no_grad():
        call = lambda: dit(params, **x)
        start = time.perf_counter()
        call()
        synchronize(device)
        compile_s = time.perf_counter() - start
        seconds = seconds_per_call(call, device, suite.sizes.repeats)
    eager = suite.shared.get("flux_resident_s")
    return {"s_per_step": round(seconds, 4), "first_call_s": round(compile_s, 1),
            "compiled_x_eager": None if eager is None else round(seconds / eager, 3)}


def offloaded_calls(suite: Suite, transform, stored) -> tuple[float, dict, list, int]:
    """(s per call, peaks of one call, reserved GiB after each of three calls, bytes moved per call) of the DiT under ``transform``."""
    device = suite.device
    dit, x = transform(flux.FluxDiT(suite.sizes.flux)), flux_inputs(suite, device)
    call = lambda: dit(stored, **x)
    reserved, retries = [], []
    with torch.no_grad():
        free_memory(device)
        before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
        start_retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0
        for _ in range(3):  # three consecutive calls: a new pool per call would show as growing reserved memory
            call()
            synchronize(device)
            if device.type == "cuda":
                reserved.append(round((torch.cuda.memory_reserved(device) - before) / GIB, 3))
                retries.append(torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - start_retries)
        with count_transfers() as moved:
            call()
        seconds = seconds_per_call(call, device, suite.sizes.repeats)
        memory = peaks(call, device)
    return seconds, memory, list(zip(reserved, retries)), moved.bytes


def flux_offload_row(suite: Suite, with_fp8: bool) -> dict:
    device = suite.device
    params = flux_params(suite)
    transform = dsf.chain(fp8(compute_dtype=flux_dtype(suite)), offload(device)) if with_fp8 else offload(device)
    start = time.perf_counter()
    stored = transform.init(params)  # fp8: quantized on the device, then both stored in pinned host memory
    init_s = time.perf_counter() - start
    seconds, memory, three_calls, moved = offloaded_calls(suite, transform, stored)
    values = {"s_per_step": round(seconds, 4), "init_s": round(init_s, 1), "gib_moved_per_step": round(moved / GIB, 2),
              "reserved_gib_and_retries_after_calls_1_2_3": three_calls, **memory}
    resident = suite.shared.get("flux_resident_s")
    if resident is not None:
        values["x_resident"] = round(seconds / resident, 2)
    if device.type != "cuda":
        return values
    if "h2d_bytes_per_s" not in suite.shared:
        suite.shared["h2d_bytes_per_s"] = host_to_device_bandwidth(device)
    bandwidth = suite.shared["h2d_bytes_per_s"]
    floor = moved / bandwidth
    block = largest_block_bytes(flux_params(suite)["transformer_blocks"]) * (0.5 if with_fp8 else 1.0)
    activations = suite.shared.get("flux_activations_gib") or 0.0
    expected = 2 * block / GIB + activations
    values.update({"h2d_gb_per_s": round(bandwidth / 1e9, 1), "pcie_floor_s": round(floor, 4), "x_pcie_floor": round(seconds / floor, 2),
                   "two_blocks_plus_activations_gib": round(expected, 2),
                   "peak_reserved_over_expected": round(memory["peak_reserved_gib"] / expected, 2)})
    if resident is not None:  # serial would take resident + floor, full overlap max(resident, floor)
        hidden = (resident + floor - seconds) / min(resident, floor)
        values["copy_compute_overlap"] = round(min(max(hidden, 0.0), 1.0), 2)
    return values


def flux_training_step(suite: Suite, transform) -> Callable[[], dict]:
    """One LoRA training step (loss, gradients, AdamW update) of the DiT under ``transform`` over the run's weights."""
    device, cfg = suite.device, suite.sizes.flux
    stored = transform.init(flux_params(suite), dsf.random.key(0))
    dit, x = transform(flux.FluxDiT(cfg)), flux_inputs(suite, device)
    cond = {k: x[k] for k in ("text_embeds", "pooled_embeds", "guidance")}
    loss = lambda p, key: flow_matching_loss(dit, p, x["latents"], key, cond)
    loss_and_grads = dsf.value_and_grad(loss, where=lora_trainable)
    optimizer = adamw(1e-4)
    trainable = dsf.tree.select(stored, lora_trainable)
    state = {"opt": optimizer.init(trainable), "trainable": trainable, "grads": None}

    def step() -> dict:
        params = dsf.tree.map_with_path(lambda path, leaf: state["trainable"].get(path, leaf), stored)
        state["grads"] = None
        _, grads = loss_and_grads(params, dsf.random.key(1))
        flat = dsf.tree.select(grads, lora_trainable)
        state["trainable"], state["opt"] = optimizer.update(flat, state["opt"], state["trainable"])
        state["grads"] = flat
        return flat

    return step


def device_to_host_copies(fn: Callable, device: torch.device) -> int | None:
    """The device-to-host memcpy kernels the CUDA profiler saw during ``fn()`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        synchronize(device)
    return sum(event.count for event in profile.key_averages() if "DtoH" in event.key or "Device -> Pinned" in event.key
               or "Device -> Pageable" in event.key)


def lora_step_row(suite: Suite, offloaded: bool) -> dict:
    device = suite.device
    parts = [lora(rank=32, targets=LORA_TARGETS), fp8(compute_dtype=flux_dtype(suite)), checkpoint()]
    step = flux_training_step(suite, dsf.chain(*parts, *([offload(device)] if offloaded else [])))
    seconds = seconds_per_call(step, device, 2)
    memory = peaks(step, device)
    grads = step()
    return {"s_per_step": round(seconds, 3), "lora_gradient_devices": sorted({g.device.type for g in grads.values()}),
            "lora_factors": len(grads), "dtoh_copies_per_step": device_to_host_copies(step, device),
            "blocks": suite.sizes.flux.num_double_blocks + suite.sizes.flux.num_single_blocks, **memory}


def activation_offload_row(suite: Suite) -> dict:
    values = {}
    for on in (False, True):
        parts = [lora(rank=32, targets=LORA_TARGETS), fp8(compute_dtype=flux_dtype(suite)), checkpoint(offload_activations=on)]
        step = flux_training_step(suite, dsf.chain(*parts))
        seconds = seconds_per_call(step, suite.device, 1)
        memory = peaks(step, suite.device)
        label = "on" if on else "off"
        values[f"{label}_s_per_step"] = round(seconds, 3)
        values.update({f"{label}_{k}": v for k, v in memory.items() if k != "alloc_retries"})
        del step
        free_memory(suite.device)
    return values


# ----------------------------------------------------------------------------- c: component offload


def component_offload_row(suite: Suite) -> dict:
    from dsf.models.flux.tiny import tiny_pipeline

    device, pipe = suite.device, tiny_pipeline()
    params = dsf.tree.map_with_path(lambda _, t: t.to(device), pipe.params) if device.type == "cuda" else pipe.params
    sizes = {name: dsf.tree.nbytes(tree) for name, tree in pipe.params.items()}
    t = offload(device, level="component")
    stored = t.init(params)
    del params
    generate = torch.no_grad()(lambda: t(pipe.generate)(stored, "a cat", height=64, width=64, num_inference_steps=2, progress=False))
    with count_transfers() as moved:
        generate()
    memory = peaks(generate, device) if device.type == "cuda" else {}
    values = {"components_in_order": moved.components, "largest_component_mib": round(max(sizes.values()) / 2**20, 2),
              "all_components_mib": round(sum(sizes.values()) / 2**20, 2), **memory}
    if memory:
        values["peak_over_largest_component"] = round(memory["peak_allocated_gib"] * GIB / max(sizes.values()), 2)
    return values


# ----------------------------------------------------------------------------- f: T5-XXL


def t5_row(suite: Suite) -> dict:
    """T5-XXL's encoder (4.8 B parameters; tiny with --small) stored on the CPU in bf16, as fp8, streamed block by block to
    the device: seconds and peaks of one 512-token encode, against the bytes of one block and of the whole encoder."""
    from transformers import T5Config, T5EncoderModel

    from dsf.model_parts import t5_encoder
    from dsf.model_parts.modules import meta_module

    device, dtype = suite.device, flux_dtype(suite)
    suite.shared.pop("flux", None)
    free_memory(device)
    small = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4} if suite.small else {}
    module = meta_module(T5EncoderModel, T5Config(**t5_encoder.XXL_CONFIG | {"vocab_size": 32128} | small))
    params = random_params(t5_encoder.encoder_shapes(module), "cpu", dtype, module.config.d_model)
    encode = t5_encoder.last_hidden_fn(module, pad_token_id=0)
    stack = dsf.chain(fp8(compute_dtype=dtype), offload(device))
    stored = stack.init(params)
    whole_gib = dsf.tree.nbytes(params) / GIB
    block_gib = largest_block_bytes(params["encoder"]["block"]) / GIB
    del params
    ids = torch.randint(2, 32128, (1, 512 if not suite.small else 16), generator=torch.Generator().manual_seed(0)).to(device)
    call = lambda: stack(encode)(stored, ids)
    with torch.no_grad():
        seconds = seconds_per_call(call, device, suite.sizes.repeats)
        memory = peaks(call, device)
        suite.backends["T5-XXL encoder (transformers blocks)"] = sdpa_kernel(call)
    return {"s_per_encode": round(seconds, 4), "bf16_encoder_gib": round(whole_gib, 2), "bf16_block_gib": round(block_gib, 3),
            **memory}


# ----------------------------------------------------------------------------- g: Wan 2.1-14B


def wan_row(suite: Suite) -> dict:
    device, cfg, sizes = suite.device, suite.sizes.wan, suite.sizes
    dtype = flux_dtype(suite)
    suite.shared.pop("flux", None)
    free_memory(device)
    params = random_params(wan_shapes(cfg), device, dtype, cfg.hidden_size)
    g = torch.Generator().manual_seed(0)
    x = dict(latents=torch.randn(1, *sizes.wan_latents, generator=g).to(device, dtype), timestep=torch.full((1,), 0.7, device=device),
             text_embeds=torch.randn(1, sizes.wan_text_len, cfg.text_dim, generator=g).to(device, dtype))
    dit = wan.WanDiT(cfg)
    with torch.no_grad():
        resident = functools.partial(dit, params, **x)
        resident_s = seconds_per_call(resident, device, sizes.repeats)
        resident_memory = peaks(resident, device)
        suite.backends["Wan DiT (dsf)"] = sdpa_kernel(resident)
    t = offload(device)
    stored = t.init(params)
    del params, resident
    free_memory(device)
    streamed = t(dit)
    with torch.no_grad():
        offload_s = seconds_per_call(lambda: streamed(stored, **x), device, sizes.repeats)
        offload_memory = peaks(lambda: streamed(stored, **x), device)
    tokens = sizes.wan_latents[1] * (sizes.wan_latents[2] // 2) * (sizes.wan_latents[3] // 2)
    return {"video_tokens": tokens, "resident_s": round(resident_s, 4), "offload_s": round(offload_s, 4),
            "offload_x_resident": round(offload_s / resident_s, 2),
            **{f"resident_{k}": v for k, v in resident_memory.items()}, **{f"offload_{k}": v for k, v in offload_memory.items()}}


# ----------------------------------------------------------------------------- the run


def run_suite(device: torch.device, small: bool, seconds: float = SUITE_SECONDS) -> Suite:
    suite = Suite(device, small, seconds)
    suite.run("a", "FLUX DiT small config: parity and dsf/diffusers time", 60, lambda: parity_row(suite))
    suite.run("b1", "FLUX.1-dev DiT bf16 1024²: resident step", 60, lambda: flux_resident_row(suite))
    suite.run("b5", "FLUX.1-dev DiT bf16 1024²: resident step, dsf against diffusers", 60, lambda: flux_diffusers_row(suite))
    suite.run("b2", "FLUX.1-dev DiT: block offload with prefetch", 100, lambda: flux_offload_row(suite, with_fp8=False))
    suite.run("b3", "FLUX.1-dev DiT: fp8 storage + block offload", 60, lambda: flux_offload_row(suite, with_fp8=True))
    suite.run("c", "tiny FLUX pipeline: component offload", 30, lambda: component_offload_row(suite))
    suite.run("d1", "LoRA step 1024² (ckpt, fp8 base), resident", 60, lambda: lora_step_row(suite, offloaded=False))
    suite.run("d2", "LoRA step 1024² (ckpt, fp8 base), block offload", 60, lambda: lora_step_row(suite, offloaded=True))
    suite.run("e", "checkpoint(offload_activations) off / on", 50, lambda: activation_offload_row(suite))
    suite.run("f", "T5-XXL encoder: fp8 + block offload", 90, lambda: t5_row(suite))
    suite.run("b4", "FLUX.1-dev DiT bf16 1024²: resident step, compiled", 120, lambda: flux_compiled_row(suite))
    suite.run("g", "Wan 2.1-T2V-14B DiT, 480x832x17: resident vs block offload", 120, lambda: wan_row(suite))
    suite.shared.clear()
    suite.run("h", "SDPA kernel per model", 10, lambda: dict(suite.backends) or _raise(Skip("no model ran")))
    return suite


def _raise(error: Exception):
    raise error


def format_row(row: Row) -> str:
    values = ", ".join(f"{k}={v}" for k, v in row.values.items())
    detail = row.reason if row.status != "ok" else values
    return f"{row.id:<3} {row.name:<62} {row.status:<8} {row.seconds:6.1f}s  {detail}"


def write_json(path: str, suite: Suite) -> None:
    """The rows as JSON at ``path``, written under a temporary name and renamed."""
    device = torch.cuda.get_device_name(suite.device) if suite.device.type == "cuda" else "cpu"
    document = {"device": device, "torch": torch.__version__, "small": suite.small,
                "seconds": round(time.perf_counter() - suite.started, 1), "rows": [dataclasses.asdict(r) for r in suite.rows]}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1, default=str))
    os.replace(temporary, target)


def main(argv: list[str] | None = None) -> Suite:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny configs (seconds; what the CPU test runs)")
    parser.add_argument("--out", default="outputs/device_suite.json")
    parser.add_argument("--seconds", type=float, default=SUITE_SECONDS, help="the whole run's time budget")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; run --device cpu --small here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = "tiny configs in place of the named models" if args.small else "full-size random weights"
    print(f"device suite on {device} ({sizes}); GiB are peaks above the level before the call", flush=True)
    print(f"{'id':<3} {'measurement':<62} {'status':<8} {'time':>7}  values / reason", flush=True)
    suite = run_suite(device, args.small, args.seconds)
    write_json(args.out, suite)
    failed = sum(row.status == "failed" for row in suite.rows)
    print(f"{len(suite.rows)} rows ({failed} failed) in {time.perf_counter() - suite.started:.0f} s; JSON: {args.out}")
    return suite


if __name__ == "__main__":
    main()
