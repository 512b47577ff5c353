"""Peak memory of streamed weights against resident ones.

CPU (the default; runs anywhere): writes a FLUX-like DiT of a few hundred MB (``dsf.models.flux`` at
hidden size 768, fp32) to a safetensors file, then runs four forwards in each of two fresh
subprocesses, (a) with every weight loaded in RAM and (b) streamed from the file block by block
(``offload`` over ``dsf.files.disk.lazy_load``), and prints each peak RSS (``VmHWM``) above the
process's baseline after imports, against the model's size and its largest block.

``--device cuda`` (UNVERIFIED: written on a machine without a GPU): the full-size FLUX.1-dev DiT
with random bf16 weights, one 1024² forward per step; peak allocated, reserved and active GPU memory and
seconds per step for resident, component offload, block offload, block offload + fp8, and
diffusers' group offloading (leaf level, streams) and layerwise fp8 casting on the same weights.

``--t5``: the same two modes for a T5 text-encoder encode (T5-v1.1-XXL's layout at hidden size
1024 and 8 layers, random fp32 weights, one 512-token prompt): the whole encoder loaded in RAM
against its layers streamed from the file one block at a time (``dsf.model_parts.t5_encoder``
runs them through ``dsf.run_blocks``). Both read the file through ``lazy_load`` and ``offload``, the
resident mode with a ``vram_limit`` that keeps every weight, read tensor by tensor at init.

Usage:
    python bench/memory.py
    python bench/memory.py --device cuda
    python bench/memory.py --t5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import dsf
from dsf.files.disk import lazy_load
from dsf.files.io import load_state_dict
from dsf.models.flux.config import DIFFUSERS_KEYS
from dsf.models.flux import FluxConfig, FluxDiT, init_dit, param_shapes, patchify, position_ids
from dsf.model_parts import t5_encoder
from dsf.model_parts.modules import meta_module
from dsf.models.flux.text import T5_XXL_CONFIG
from dsf.transforms.fp8 import fp8
from dsf.transforms.offload import offload

ALL_RESIDENT = 2.0**20  # GiB: offload's vram_limit that keeps every weight resident, each read once at init
T5_CPU_CONFIG = {"d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 8, "num_decoder_layers": 8}
CPU_CONFIG = FluxConfig(
    num_heads=8, head_dim=96, axes_dims_rope=(16, 40, 40), num_double_blocks=4, num_single_blocks=8, context_dim=256, pooled_dim=64
)
MB = 1e6


def peak_rss() -> int:
    """Bytes of this process's peak resident set so far (``VmHWM``; ``ru_maxrss`` would keep the parent's peak across fork).

    >>> peak_rss() > 0
    True
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flux_inputs(config: FluxConfig, size: int, dtype: torch.dtype, device: str = "cpu", text_len: int = 64) -> tuple:
    """(latents, σ, text, pooled, guidance) of one ``size``² image (latents are size/8 a side).

    >>> flux_inputs(CPU_CONFIG, 256, torch.float32)[0].shape
    torch.Size([1, 16, 32, 32])
    """
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, size // 8, size // 8, generator=g)
    text = torch.randn(1, text_len, config.context_dim, generator=g)
    pooled = torch.randn(1, config.pooled_dim, generator=g)
    tensors = (latents, torch.tensor([0.5]), text, pooled, torch.tensor([3.5]))
    return tuple(t.to(device=device, dtype=dtype if t.ndim > 1 else torch.float32) for t in tensors)


def block_bytes(config: FluxConfig, prefix: str, itemsize: int) -> int:
    """Bytes of one block (keys starting with ``prefix``).

    >>> block_bytes(CPU_CONFIG, "transformer_blocks.0.", 4) > block_bytes(CPU_CONFIG, "single_transformer_blocks.0.", 4)
    True
    """
    return sum(torch.Size(s).numel() * itemsize for k, s in param_shapes(config).items() if k.startswith(prefix))


def worker(mode: str, file: str, config: FluxConfig) -> dict:
    """One measured process: four forwards (the fastest after the first is timed), weights in RAM or streamed from ``file``."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    baseline = peak_rss()
    if mode == "ram":
        params, call = dsf.tree.unflatten_dict(load_state_dict(file)), FluxDiT(config)
    else:
        t = offload("cpu")
        params, call = t.init(lazy_load(file)), t(FluxDiT(config))
    inputs = flux_inputs(config, 256, torch.float32)
    seconds = []
    with torch.no_grad():
        for _ in range(4):
            start = time.perf_counter()
            call(params, *inputs)
            seconds.append(time.perf_counter() - start)
    return {"baseline": baseline, "peak": peak_rss(), "seconds": min(seconds[1:])}


def cpu_table(config: FluxConfig) -> str:
    """Write the model, measure both modes in subprocesses, and format the comparison."""
    with tempfile.TemporaryDirectory() as folder:
        file = str(Path(folder) / "dit.safetensors")
        params = init_dit(config, dsf.random.key(0))
        model_bytes = dsf.tree.nbytes(params)
        save_file(dsf.tree.flatten_dict(params), file)
        del params
        os.sync()  # written back, so both modes read clean page-cache pages
        fields = json.dumps(dataclasses.asdict(config))
        rows = {}
        for mode in ("ram", "disk"):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", mode, "--file", file, "--config", fields],
                capture_output=True, text=True, check=True,
            )
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    block = block_bytes(config, "transformer_blocks.0.", 4)
    title = (
        f"FLUX-like DiT, hidden {config.hidden_size}, {config.num_double_blocks} double + {config.num_single_blocks} single "
        f"blocks: {model_bytes / MB:.0f} MB fp32, largest block {block / MB:.0f} MB; 256² forward, no grad"
    )
    return ram_disk_table(title, rows, model_bytes, block, ("loaded in RAM", "block", "forward"))


def ram_disk_table(title: str, rows: dict, model_bytes: int, block: int, names: tuple[str, str, str]) -> str:
    """The peaks of the in-RAM and streamed runs (``rows["ram"]``, ``rows["disk"]``) against the model and one block;
    ``names``: what the RAM run is called, what a block is called, what one call is called."""
    resident, part, call = names
    lines = [title, f"{'weights':<22}{'peak RSS':>10}{'above baseline':>16}{'/ model':>9}{'/ ' + part:>9}{'s/' + call:>11}"]
    for mode, label in (("ram", resident), ("disk", "streamed from disk")):
        r = rows[mode]
        above = r["peak"] - r["baseline"]
        lines.append(
            f"{label:<22}{r['peak'] / MB:>8.0f}MB{above / MB:>14.0f}MB{above / model_bytes:>9.2f}"
            f"{above / block:>9.2f}{r['seconds']:>11.2f}"
        )
    ram, disk = (rows[m]["peak"] - rows[m]["baseline"] for m in ("ram", "disk"))
    lines.append(
        f"disk / RAM: {disk / ram:.2f}× the memory above baseline, {rows['disk']['seconds'] / rows['ram']['seconds']:.2f}× the time"
    )
    return "\n".join(lines)


def t5_module(config: dict):
    """FLUX.1's T5-XXL encoder module on the meta device with ``config`` over its sizes (only the code is used)."""
    from transformers import T5Config, T5EncoderModel

    return meta_module(T5EncoderModel, T5Config(**T5_XXL_CONFIG | config))


def t5_worker(mode: str, file: str, config: dict) -> dict:
    """One measured process: three encodes of a 512-token prompt (the fastest after the first is timed), weights in RAM or streamed."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    encode = t5_encoder.last_hidden_fn(t5_module(config))
    baseline = peak_rss()
    t = offload("cpu", vram_limit=ALL_RESIDENT if mode == "ram" else 0)
    params, encode = t.init(lazy_load(file)), t(encode)
    ids = torch.randint(2, 32128, (1, 512), generator=torch.Generator().manual_seed(0))
    seconds = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            encode(params, ids)
            seconds.append(time.perf_counter() - start)
    return {"baseline": baseline, "peak": peak_rss(), "seconds": min(seconds[1:])}


def t5_table(config: dict) -> str:
    """Write a random T5 encoder of ``config``, measure both modes in subprocesses, and format the comparison."""
    shapes = t5_encoder.encoder_shapes(t5_module(config))
    with tempfile.TemporaryDirectory() as folder:
        file = str(Path(folder) / "t5.safetensors")
        g = torch.Generator().manual_seed(0)
        flat = {k: torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s) for k, s in shapes.items()}
        model_bytes = sum(t.nbytes for t in flat.values())
        block = sum(t.nbytes for k, t in flat.items() if k.startswith("encoder.block.1."))
        save_file(flat, file)
        del flat
        os.sync()
        rows = {}
        for mode in ("ram", "disk"):
            done = subprocess.run(
                [sys.executable, __file__, "--t5-worker", mode, "--file", file, "--config", json.dumps(config)],
                capture_output=True, text=True, check=True,
            )
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    title = (f"T5-v1.1-XXL layout, d_model {config['d_model']}, {config['num_layers']} layers: {model_bytes / MB:.0f} MB fp32, "
             f"one layer {block / MB:.0f} MB; one 512-token encode, no grad")
    return ram_disk_table(title, rows, model_bytes, block, ("all resident", "layer", "encode"))


def random_flux_params(config: FluxConfig, device: str) -> dict:
    """Full-size random bf16 weights drawn on ``device`` (N(0, 0.02²) matrices, unit norm scales, zero biases)."""
    torch.manual_seed(0)
    flat = {}
    for key, shape in param_shapes(config).items():
        tensor = torch.empty(shape, dtype=torch.bfloat16, device=device)
        flat[key] = tensor.normal_(0, 0.02) if len(shape) == 2 else tensor.fill_(1.0 if key.endswith(".weight") else 0.0)
    return dsf.tree.unflatten_dict(flat)


def timed(call, steps: int = 3) -> tuple[float, float, float, float]:
    """(peak GiB allocated, reserved, active, seconds per call) over ``steps`` calls after one warm-up.

    Reserved memory is what the caching allocator holds (what another process cannot use); active
    counts freed blocks that a stream has not passed yet. Block offload that let the CPU run ahead of
    the copies would show here, not in the allocated peak.
    """
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    active = torch.cuda.memory_stats().get("active_bytes.all.peak", 0)
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30, active / 2**30, seconds


def diffusers_call(model, inputs: tuple):
    """A no-argument call of diffusers' FluxTransformer2DModel on the same inputs as dsf's DiT."""
    latents, sigma, text, pooled, guidance = inputs
    height, width = latents.shape[-2:]
    ids = position_ids(text.shape[1], height // 2, width // 2, device=latents.device)
    kwargs = {
        "hidden_states": patchify(latents), "encoder_hidden_states": text, "pooled_projections": pooled,
        "timestep": sigma, "img_ids": ids[text.shape[1] :], "txt_ids": ids[: text.shape[1]], "guidance": guidance,
        "return_dict": False,
    }
    return lambda: model(**kwargs)


def diffusers_model(config: FluxConfig, flat: dict):
    """diffusers' FluxTransformer2DModel of ``config`` holding ``flat`` (our keys are its keys) without copying."""
    from diffusers import FluxTransformer2DModel

    fields = {theirs: getattr(config, ours) for theirs, ours in DIFFUSERS_KEYS.items()}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**fields, "axes_dims_rope": list(config.axes_dims_rope)})
    model.load_state_dict(flat, assign=True)
    return model.eval()


def dsf_row(name: str, t, stored: dict, config: FluxConfig, inputs: tuple) -> tuple:
    """(name, peak GiB allocated, reserved, active, s/step) of dsf's DiT under transform ``t`` over ``stored``."""
    dit = t(FluxDiT(config))
    return (name, *timed(lambda: dit(stored, *inputs)))


def diffusers_row(name: str, model, inputs: tuple) -> tuple:
    """(name, peak GiB allocated, reserved, active, s/step) of a prepared diffusers model."""
    return (name, *timed(diffusers_call(model, inputs)))


def cuda_table(config: FluxConfig) -> str:
    """Peak GPU memory and s/step of every variant (UNVERIFIED, see the module docstring)."""
    inputs = flux_inputs(config, 1024, torch.bfloat16, "cuda", text_len=512)
    with torch.no_grad():
        params = random_flux_params(config, "cuda")
        rows = [dsf_row("dsf resident", dsf.chain(), params, config, inputs)]
        with_fp8 = dsf.chain(fp8(), offload("cuda"))
        stored_fp8 = with_fp8.init(params)  # quantized on the GPU, then stored in pinned memory
        params = dsf.tree.map_with_path(lambda _, x: x.cpu(), params)
        torch.cuda.empty_cache()
        rows.append(dsf_row("dsf block offload + fp8", with_fp8, stored_fp8, config, inputs))
        del stored_fp8
        for name, t in (("dsf component offload", offload("cuda", level="component")), ("dsf block offload", offload("cuda"))):
            rows.append(dsf_row(name, t, t.init(params), config, inputs))
        flat = dsf.tree.flatten_dict(params)
        grouped = diffusers_model(config, flat)
        grouped.enable_group_offload(torch.device("cuda"), offload_type="leaf_level", use_stream=True, non_blocking=True)
        rows.append(diffusers_row("diffusers group offload", grouped, inputs))
        del grouped
        torch.cuda.empty_cache()
        cast = diffusers_model(config, flat).to("cuda")
        cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        rows.append(diffusers_row("diffusers layerwise fp8", cast, inputs))
    lines = [
        f"FLUX.1-dev DiT, random bf16, 1024² forward ({torch.cuda.get_device_name()}); UNVERIFIED bench code",
        f"{'variant':<26}{'allocated':>10}{'reserved':>9}{'active':>8}{'s/step':>8}{'× resident':>12}  (peak GiB)",
    ]
    lines += [f"{name:<26}{gib:>10.2f}{reserved:>9.2f}{active:>8.2f}{sec:>8.3f}{sec / rows[0][-1]:>12.2f}"
              for name, gib, reserved, active, sec in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", choices=("ram", "disk"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--t5", action="store_true", help="measure a T5 text-encoder encode instead of the DiT (CPU)")
    parser.add_argument("--t5-worker", choices=("ram", "disk"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.t5_worker:
        print(json.dumps(t5_worker(args.t5_worker, args.file, json.loads(args.config))))
        return
    if args.t5:
        print(t5_table(T5_CPU_CONFIG))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.file, FluxConfig(**json.loads(args.config)))))
    elif args.device == "cuda":
        print(cuda_table(FluxConfig()))
    else:
        print(cpu_table(CPU_CONFIG))


if __name__ == "__main__":
    main()
