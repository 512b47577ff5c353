"""FLUX.1 DiT speed: dsf against diffusers' FluxTransformer2DModel with the same weights.

Forward and forward+backward, runs interleaved (dsf, diffusers, dsf, ...) so machine noise hits
both alike; prints the median seconds of each and the ratio dsf/diffusers (goal <= 1.0).

    python bench/flux_dit.py                      # small config, fp32, CPU
    python bench/flux_dit.py --compile            # compiled against eager on both sides, compile time apart
    python bench/flux_dit.py --device cuda --full # full-size random bf16 DiT at 1024x1024 (needs a GPU)

With ``--full`` both sides share one set of random bf16 weights on the GPU (23.8 GB; the reference
is built on ``meta`` and filled in place, dsf's tree views its tensors), and forward+backward
differentiates the last ``GRADIENT_BLOCKS`` single blocks only: two full gradient sets beside 4,608
tokens of activations would not fit 80 GB. Each side frees the other's gradients before its pass,
and peak memory is reported above the memory allocated before the pass (the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import dsf
from dsf.models import flux

SMALL = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(8, 28, 28))


GRADIENT_BLOCKS = 8  # --full: forward+backward differentiates the last 8 single blocks


def reference_model(full: bool, device, dtype):
    """diffusers' FluxTransformer2DModel: the small config built on ``device``, or the full-size one
    built on ``meta`` and filled in place on ``device`` with random ``dtype`` weights (never in fp32)."""
    from diffusers import FluxTransformer2DModel

    if not full:
        with torch.device(device):
            return FluxTransformer2DModel(**SMALL, guidance_embeds=True).to(dtype).eval()
    with torch.device("meta"):
        return randomly_filled(FluxTransformer2DModel(guidance_embeds=True).to(dtype), device)


def randomly_filled(model: torch.nn.Module, device) -> torch.nn.Module:
    """A model built on ``meta``, given storage on ``device`` and filled in place: matrices N(0, 0.02²), 1-D
    ``.weight`` entries (norm scales) ones, other vectors (biases) zeros; in eval mode."""
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.ndim >= 2:
                tensor.normal_(0, 0.02, generator=generator)
            else:
                tensor.fill_(1.0 if name.endswith(".weight") else 0.0)
    return model.eval()


def print_comparison(passes, repeats: int, device, description: str, note: str = "") -> None:
    """Print ``description``, the largest difference of the first pass's outputs (relative to diffusers' largest
    magnitude) and ``note``, then the interleaved timings and memory peaks of ``passes`` (:func:`timed_passes`)."""
    with torch.no_grad():
        ours, theirs = passes[0][1](), passes[0][2]()
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"{description}; max relative difference {error:.2e}{note}")
    memory = [(peak_memory(ours, device), peak_memory(theirs, device)) for _, ours, theirs in passes]
    rows = [(*row, *peaks) for row, peaks in zip(interleaved(passes, repeats, device), memory)]
    print(f"{'pass':18} {'dsf s':>9} {'diffusers s':>12} {'dsf/diffusers':>14} {'dsf GiB':>8} {'diffusers GiB':>14}"
          "  (GiB: peak allocated above the weights)")
    for name, ours_s, theirs_s, ours_gb, theirs_gb in rows:
        memory = f"{ours_gb:8.2f} {theirs_gb:14.2f}" if ours_gb is not None else f"{'-':>8} {'-':>14}"
        print(f"{name:18} {ours_s:9.4f} {theirs_s:12.4f} {ours_s / theirs_s:14.3f} {memory}")


def trained_subset(reference, full: bool) -> str | None:
    """The ``where`` of the parameters forward+backward differentiates: all (None), or with ``full``
    the last :data:`GRADIENT_BLOCKS` single blocks, whose ``requires_grad`` alone is set on the reference."""
    if not full:
        reference.requires_grad_(True)
        return None
    reference.requires_grad_(False)
    count = len(reference.single_transformer_blocks)
    chosen = range(count - GRADIENT_BLOCKS, count)
    for index in chosen:
        reference.single_transformer_blocks[index].requires_grad_(True)
    return rf"^single_transformer_blocks/({'|'.join(map(str, chosen))})/"


def inputs(model, batch: int, latent_size: int, text_len: int, device, dtype, seed: int = 0):
    key = dsf.random.key(seed)
    k1, k2, k3 = dsf.random.split(key, 3)
    cfg = model.config
    return dict(
        latents=dsf.random.normal(k1, (batch, 16, latent_size, latent_size), device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.7, device=device, dtype=dtype),
        text_embeds=dsf.random.normal(k2, (batch, text_len, cfg.joint_attention_dim), device=device, dtype=dtype),
        pooled_embeds=dsf.random.normal(k3, (batch, cfg.pooled_projection_dim), device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
    )


def diffusers_call(model, latents, timestep, text_embeds, pooled_embeds, guidance):
    """diffusers' packing and ids around its transformer (what FluxPipeline does per step)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(text_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
    out = model(hidden_states=packed, encoder_hidden_states=text_embeds, pooled_projections=pooled_embeds,
                timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)


def timed(fn, device) -> float:
    """Seconds of one call: wall time on CUDA (synchronized), CPU time of this process on the CPU
    (robust to other programs sharing the machine)."""
    if device.type != "cuda":
        start = time.process_time()
        fn()
        return time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def holding_the_last_result(fn):
    """``fn`` that keeps its last result alive until its next call, the way a module keeps ``.grad``
    until ``zero_grad(set_to_none=True)``: both sides then free their old gradients right before
    computing new ones. (Dropping dsf's gradient tree at once lets glibc hand its ~37 MB back to the
    OS and page-fault it in again on the next call: +4–6 % CPU time that is the allocator, not the model.)

    >>> calls = holding_the_last_result(lambda: [0])
    >>> calls(), calls.held
    ([0], [[0]])
    """
    def call():
        call.held.clear()
        call.held.append(fn())
        return call.held[0]

    call.held = []
    return call


def interleaved(pairs, repeats: int, device) -> list[tuple[str, float, float]]:
    """(name, median dsf s, median diffusers s) of each (name, ours, theirs), runs alternating after a warm-up.

    >>> [row[0] for row in interleaved([("noop", lambda: None, lambda: None)], 1, torch.device("cpu"))]
    ['noop']
    """
    rows = []
    for name, ours, theirs in pairs:
        ours(), theirs()
        ours_times, theirs_times = [], []
        for _ in range(repeats):
            ours_times.append(timed(ours, device))
            theirs_times.append(timed(theirs, device))
        rows.append((name, statistics.median(ours_times), statistics.median(theirs_times)))
    return rows


def timed_passes(ours, params, reference, theirs, where=None, free_both: bool = False) -> list[tuple[str, Callable, Callable]]:
    """The passes both speed benches time, as (name, dsf call, diffusers call): the forward under
    no_grad, and forward+backward of the mean squared output, dsf through ``value_and_grad`` and
    diffusers through ``.backward()``, each freeing its old gradients right before computing new ones
    (with ``free_both``, the other side's too, so one gradient set is alive at a time: GPU memory).
    ``ours(params)`` and ``theirs()`` are the two forwards; ``reference`` is the diffusers module, whose
    ``requires_grad`` flags must select what ``where`` selects of ``params`` (default: everything).

    >>> passes = timed_passes(lambda p: p["w"] * 2, {"w": torch.ones(2)}, torch.nn.Linear(1, 1), lambda: torch.ones(2))
    >>> [name for name, _, _ in passes], passes[0][1]().tolist()
    (['forward', 'forward+backward'], [2.0, 2.0])
    """
    loss_and_grads = dsf.value_and_grad(lambda p: ours(p).float().square().mean(), where=where)

    def ours_forward():
        with torch.no_grad():
            return ours(params)

    def theirs_forward():
        with torch.no_grad():
            return theirs()

    ours_backward = holding_the_last_result(lambda: loss_and_grads(params))

    def ours_backward_alone():
        reference.zero_grad(set_to_none=True)
        return ours_backward()

    def theirs_backward():
        reference.zero_grad(set_to_none=True)
        if free_both:
            ours_backward.held.clear()
        theirs().float().square().mean().backward()

    return [("forward", ours_forward, theirs_forward),
            ("forward+backward", ours_backward_alone if free_both else ours_backward, theirs_backward)]


def peak_memory(fn, device) -> float | None:
    """GiB allocated at the peak of ``fn()`` above what was allocated before it (CUDA; None elsewhere)."""
    return None if device.type != "cuda" else memory_peaks(fn, device)["allocated"]


def memory_peaks(fn, device) -> dict[str, float]:
    """GiB at the peak of ``fn()`` above the level before it, on a CUDA ``device``: ``allocated`` (tensors),
    ``reserved`` (the caching allocator's segments) and ``active`` (allocated blocks plus freed ones
    whose stream has not passed their use yet), and the allocator's ``retries`` during the call (each
    an out-of-memory retry that freed every cached segment first).
    """
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_stats(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_stats(device)
    gib = lambda kind: (after.get(f"{kind}_bytes.all.peak", 0) - before.get(f"{kind}_bytes.all.current", 0)) / 2**30
    return {"allocated": gib("allocated"), "reserved": gib("reserved"), "active": gib("active"),
            "retries": after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)}


def first_call_seconds(fn) -> float:
    """Wall seconds of ``fn``'s first call: mostly compilation, which runs in worker processes too."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(calls, repeats: int, device) -> list[float]:
    """The median seconds of each of ``calls``, timed in turn (a, b, c, a, b, c, ...) after one warm-up each.

    >>> len(interleaved_medians([lambda: None, lambda: None], 1, torch.device("cpu")))
    2
    """
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, seconds in zip(calls, times):
            seconds.append(timed(call, device))
    return [statistics.median(seconds) for seconds in times]


def compiled_reference(reference):
    """A copy of the diffusers module with regional compilation: ``compile_repeated_blocks()`` where
    the installed diffusers has it, else each repeated block compiled."""
    import copy

    model = copy.deepcopy(reference)
    if hasattr(model, "compile_repeated_blocks") and getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks()
    else:
        for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            for block in getattr(model, name, []):
                block.compile()
    return model


def compiled_table(forward, params, reference, reference_call, lora_targets: str, repeats: int, device) -> str:
    """dsf with ``dsf.transforms.compile`` against diffusers with regional compilation, both against
    their eager selves, all four interleaved after warm-up; compile time (first-call wall seconds)
    apart; then the LoRA + checkpoint training step compiled against eager.

    ``forward(params)`` is dsf's model call on fixed inputs, ``reference_call(module)`` diffusers'.
    """
    from dsf.transforms import checkpoint, compile, lora, lora_trainable

    compiled_module = compiled_reference(reference)
    eager = timed_passes(forward, params, reference, lambda: reference_call(reference))
    compiled = timed_passes(compile()(forward), params, compiled_module, lambda: reference_call(compiled_module))
    compile_seconds = [(name, first_call_seconds(ours), first_call_seconds(theirs)) for name, ours, theirs in compiled]
    lines = [f"{'pass':18} {'dsf eager s':>12} {'dsf comp. s':>12} {'diff. eager s':>14} {'diff. comp. s':>14} "
             f"{'dsf/diff. comp.':>16} {'comp./eager dsf':>16} {'comp./eager diff.':>18}"]
    for (name, ours_eager, theirs_eager), (_, ours_compiled, theirs_compiled) in zip(eager, compiled):
        oe, oc, te, tc = interleaved_medians([ours_eager, ours_compiled, theirs_eager, theirs_compiled], repeats, device)
        lines.append(f"{name:18} {oe:12.4f} {oc:12.4f} {te:14.4f} {tc:14.4f} {oc / tc:16.3f} {oc / oe:16.3f} {tc / te:18.3f}")
    lines.append("compile (first-call wall s): " + "; ".join(
        f"{name} dsf {ours:.1f}, diffusers {theirs:.1f}" for name, ours, theirs in compile_seconds))

    adapter = lora(rank=16, targets=lora_targets)
    trained = adapter.init(params, dsf.random.key(1))
    steps = []
    for tx in (dsf.chain(adapter, checkpoint()), dsf.chain(adapter, checkpoint(), compile())):
        grads = dsf.value_and_grad(tx(lambda p: forward(p).float().square().mean()), where=lora_trainable)
        steps.append(holding_the_last_result(lambda grads=grads: grads(trained)))
    step_compile = first_call_seconds(steps[1])
    eager_step, compiled_step = interleaved_medians(steps, repeats, device)
    lines.append(f"LoRA rank 16 ({lora_targets}) + checkpoint training step: eager {eager_step:.4f} s, compiled "
                 f"{compiled_step:.4f} s, compiled/eager {compiled_step / eager_step:.3f} (compile {step_compile:.1f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full-size dev DiT in bf16 at 1024x1024, 512 text tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is the fair default)")
    parser.add_argument("--compile", action="store_true", help="compiled against eager, dsf and diffusers (regional compilation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.full else torch.float32
    latent_size, text_len = (128, 512) if args.full else (32, 64)

    reference = reference_model(args.full, device, dtype)
    dit, params = flux.load_dit(reference.state_dict(), config={"axes_dims_rope": list(reference.config.axes_dims_rope)},
                                device=device, dtype=dtype)  # same device and dtype: dsf's tree views the reference's tensors
    x = inputs(reference, 1, latent_size, text_len, device, dtype)
    if args.compile:
        print(f"FLUX.1 DiT, {'full-size dev' if args.full else 'small'} config, {dtype}, {device.type} "
              f"({torch.get_num_threads()} threads), {latent_size // 2 * latent_size // 2} image + {text_len} text tokens")
        print(compiled_table(lambda p: dit(p, **x), params, reference, lambda m: diffusers_call(m, **x),
                             "to_q,to_k,to_v,to_out.0", args.repeats, device))
        return

    where = trained_subset(reference, args.full)
    passes = timed_passes(lambda p: dit(p, **x), params, reference, lambda: diffusers_call(reference, **x),
                          where=where, free_both=args.full)
    print_comparison(passes, args.repeats, device,
                     f"device {device}, dtype {dtype}, {'full-size dev' if args.full else 'small'} config, "
                     f"{latent_size // 2 * latent_size // 2} image + {text_len} text tokens",
                     f"; backward differentiates the last {GRADIENT_BLOCKS} single blocks" if args.full else "")


if __name__ == "__main__":
    main()
