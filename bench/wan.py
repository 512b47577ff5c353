"""Wan DiT speed: dsf against diffusers' WanTransformer3DModel with the same weights.

Default: a small random Wan DiT in fp32 on the CPU (``--device cuda``: on a GPU); forward and
forward+backward, runs interleaved (dsf, diffusers, dsf, ...) so machine noise hits both alike;
prints the median seconds of each and the ratio dsf/diffusers (goal <= 1.0).

``--device cuda --full`` (UNVERIFIED: written on a machine without a GPU): Wan2.1-T2V-1.3B with
random bf16 weights at 480p and 81 frames (latents 16×21×60×104, 32,760 video + 512 text tokens);
seconds per denoising step (one forward) and peak GPU memory for diffusers resident, dsf resident,
dsf block offload (``dsf.transforms.offload``) and dsf fp8 storage (``dsf.transforms.fp8``).

    python bench/wan.py                         # small config, fp32, CPU
    python bench/wan.py --compile               # compiled against eager on both sides, compile time apart
    python bench/wan.py --device cuda --full    # 1.3B at 480p x 81 frames (needs a GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

import dsf
from dsf.models import wan
from dsf.transforms.fp8 import fp8
from dsf.transforms.offload import offload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_dit import compiled_table, interleaved, peak_memory, timed, timed_passes  # noqa: E402

SMALL = dict(num_attention_heads=4, attention_head_dim=64, text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=4)
FULL = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)  # Wan2.1-T2V-1.3B
SMALL_SHAPE, SMALL_TEXT_LEN = (16, 5, 16, 16), 64  # latents (C, T, H, W): 5·8·8 = 320 video tokens
FULL_SHAPE, FULL_TEXT_LEN = (16, 21, 60, 104), 512  # 81 frames at 480×832: 21·30·52 = 32,760 video tokens


def reference_model(full: bool, device, dtype):
    """diffusers' WanTransformer3DModel at the small or the 1.3B config, random weights.

    >>> reference_model(False, "cpu", torch.float32).config.num_layers
    4
    """
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**(FULL if full else SMALL))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def ours_from(reference, text_len: int):
    """``(dit, params)``: dsf's Wan DiT over the reference's own state dict, attending to ``text_len`` text tokens.

    >>> dit, params = ours_from(reference_model(False, "cpu", torch.float32), 64)
    >>> dit.config.text_len, dit.config.hidden_size, len(params["blocks"])
    (64, 256, 4)
    """
    first = next(reference.parameters())
    dit, params = wan.load_dit(dict(reference.state_dict()), config={"attention_head_dim": reference.config.attention_head_dim},
                               device=first.device, dtype=first.dtype)  # same device and dtype: views, no copy
    return wan.WanDiT(dataclasses.replace(dit.config, text_len=text_len)), params


def inputs(shape: tuple, text_len: int, text_dim: int, device, dtype, seed: int = 0) -> dict:
    """One video's latents (1, C, T, H, W), σ (1,) and text states (1, text_len, text_dim).

    >>> {k: tuple(v.shape) for k, v in inputs((16, 1, 2, 2), 3, 8, "cpu", torch.float32).items()}
    {'latents': (1, 16, 1, 2, 2), 'timestep': (1,), 'text_embeds': (1, 3, 8)}
    """
    latent_key, text_key = dsf.random.split(dsf.random.key(seed))
    return dict(
        latents=dsf.random.normal(latent_key, (1, *shape), device=device, dtype=dtype),
        timestep=torch.full((1,), 0.7, device=device),
        text_embeds=dsf.random.normal(text_key, (1, text_len, text_dim), device=device, dtype=dtype),
    )


def diffusers_call(model, latents, timestep, text_embeds):
    """diffusers' transformer as its Wan pipeline calls it: the timestep is σ·1000.

    >>> with torch.no_grad():
    ...     diffusers_call(reference_model(False, "cpu", torch.float32), **inputs((16, 1, 2, 2), 3, 256, "cpu", torch.float32)).shape
    torch.Size([1, 16, 1, 2, 2])
    """
    return model(hidden_states=latents, timestep=timestep * 1000, encoder_hidden_states=text_embeds, return_dict=False)[0]


def ratio_table(repeats: int, device: torch.device) -> str:
    """The small config's forward and forward+backward ratios in fp32, with the parity error.

    >>> ratio_table(1, torch.device("cpu")).splitlines()[-1].split()[0]
    'forward+backward'
    """
    dtype = torch.float32
    reference = reference_model(False, device, dtype)
    dit, params = ours_from(reference, SMALL_TEXT_LEN)
    x = inputs(SMALL_SHAPE, SMALL_TEXT_LEN, reference.config.text_dim, device, dtype)

    reference.requires_grad_(True)
    passes = timed_passes(lambda p: dit(p, **x), params, reference, lambda: diffusers_call(reference, **x))
    with torch.no_grad():
        ours, theirs = passes[0][1](), passes[0][2]()
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    rows = interleaved(passes, repeats, device)
    tokens = SMALL_SHAPE[1] * (SMALL_SHAPE[2] // 2) * (SMALL_SHAPE[3] // 2)
    lines = [
        f"Wan DiT, small config {SMALL}, fp32, {device.type} ({torch.get_num_threads()} threads); {tokens} video + "
        f"{SMALL_TEXT_LEN} text tokens; max relative difference {error:.2e}",
        f"{'pass':18} {'dsf s':>9} {'diffusers s':>12} {'dsf/diffusers':>14}",
    ]
    lines += [f"{name:18} {ours:9.4f} {theirs:12.4f} {ours / theirs:14.3f}" for name, ours, theirs in rows]
    return "\n".join(lines)


def timed_row(name: str, call, steps: int, device) -> tuple[str, float, float | None]:
    """(name, median s per step, peak GiB on CUDA) of a no-argument forward ``call`` under no_grad, after a warm-up.

    >>> timed_row("noop", lambda: None, 1, torch.device("cpu"))[::2]
    ('noop', None)
    """
    with torch.no_grad():
        call()
        seconds = statistics.median(timed(call, device) for _ in range(steps))
        return name, seconds, peak_memory(call, device)


def dsf_row(name: str, transform, cpu_params, start, dit, x: dict, steps: int, device):
    """:func:`timed_row` of ``transform(dit)`` over ``transform.init`` of the params moved to ``start``.

    >>> dsf_row("identity", dsf.chain(), {"w": torch.ones(1)}, "cpu", lambda p: p["w"], {}, 1, torch.device("cpu"))[::2]
    ('identity', None)
    """
    stored = transform.init(dsf.tree.map_with_path(lambda _, p: p.to(start), cpu_params))
    wrapped = transform(dit)
    return timed_row(name, lambda: wrapped(stored, **x), steps, device)


def variants_table(steps: int, device: torch.device, full: bool = True) -> str:
    """s/step and peak GiB of diffusers resident and dsf resident, fp8 and block offload (with ``full``:
    the 1.3B DiT at 480p × 81 frames in bf16; UNVERIFIED on CUDA, see the module docstring).

    >>> variants_table(1, torch.device("cpu"), full=False).splitlines()[-1].split()[:3]
    ['dsf', 'block', 'offload']
    """
    dtype = torch.bfloat16 if full else torch.float32
    shape, text_len = (FULL_SHAPE, FULL_TEXT_LEN) if full else (SMALL_SHAPE, SMALL_TEXT_LEN)
    reference = reference_model(full, "cpu", dtype)
    dit, cpu_params = ours_from(reference, text_len)
    x = inputs(shape, text_len, reference.config.text_dim, device, dtype)
    reference.to(device)
    rows = [timed_row("diffusers resident", lambda: diffusers_call(reference, **x), steps, device)]
    reference.to("cpu")
    for name, transform, start in (
        ("dsf resident", dsf.chain(), device),
        ("dsf fp8", fp8(compute_dtype=dtype), device),
        ("dsf block offload", offload(device), "cpu"),
    ):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(dsf_row(name, transform, cpu_params, start, dit, x, steps, device))
    title = "Wan2.1-T2V-1.3B DiT, random bf16, 480p x 81 frames" if full else f"Wan DiT {SMALL}, fp32"
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"{title}, one forward per step ({where}); UNVERIFIED bench code on CUDA",
        f"{'variant':<20}{'s/step':>9}{'peak GiB':>10}{'x diffusers s':>15}",
    ]
    lines += [f"{name:<20}{sec:>9.3f}{'-' if gib is None else f'{gib:.2f}':>10}{sec / rows[0][1]:>15.3f}"
              for name, sec, gib in rows]
    return "\n".join(lines)


def compiled_ratio_table(repeats: int, device: torch.device) -> str:
    """The small config compiled against eager, dsf and diffusers (see ``flux_dit.compiled_table``)."""
    reference = reference_model(False, device, torch.float32)
    dit, params = ours_from(reference, SMALL_TEXT_LEN)
    x = inputs(SMALL_SHAPE, SMALL_TEXT_LEN, reference.config.text_dim, device, torch.float32)
    title = f"Wan DiT, small config {SMALL}, fp32, {device.type} ({torch.get_num_threads()} threads)"
    table = compiled_table(lambda p: dit(p, **x), params, reference, lambda m: diffusers_call(m, **x),
                           "to_q,to_k,to_v,to_out.0", repeats, device)
    return f"{title}\n{table}"


def main() -> None:
    """Parse the command line and print the table of the chosen mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--full", action="store_true", help="Wan2.1-T2V-1.3B in bf16 at 480p x 81 frames (with --device cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is the fair default)")
    parser.add_argument("--compile", action="store_true", help="compiled against eager, dsf and diffusers (regional compilation)")
    args = parser.parse_args()
    if args.full and args.device != "cuda":
        parser.error("--full runs the 1.3B DiT on a GPU: pass --device cuda --full")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile:
        print(compiled_ratio_table(args.repeats, device))
        return
    print(variants_table(args.repeats, device) if args.full else ratio_table(args.repeats, device))


if __name__ == "__main__":
    main()
