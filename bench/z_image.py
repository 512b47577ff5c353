"""Z-Image DiT speed: dsf against diffusers' ZImageTransformer2DModel with the same weights.

Forward and forward+backward, runs interleaved (dsf, diffusers, dsf, ...) so machine noise hits
both alike; prints the median seconds of each and the ratio dsf/diffusers (goal <= 1.0).

    python bench/z_image.py                       # small config, fp32, CPU
    python bench/z_image.py --compile             # compiled against eager on both sides, compile time apart
    python bench/z_image.py --device cuda --full  # full-size random bf16 DiT at 1024x1024 (needs a GPU)

With ``--full`` both sides share one set of random bf16 weights on the GPU (12.3 GB; the reference
is built on ``meta`` and filled in place, dsf's tree views its tensors), and forward+backward
differentiates the last ``GRADIENT_BLOCKS`` layers only. Both sides get the same captions: two
prompts' worth of states of different lengths, padded per sample to multiples of 32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import dsf
from dsf.models import z_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_dit import compiled_table, print_comparison, randomly_filled, timed_passes  # noqa: E402

SMALL = dict(dim=256, n_layers=4, n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=256, axes_dims=[16, 24, 24])
GRADIENT_BLOCKS = 8  # --full: forward+backward differentiates the last 8 layers


def reference_model(full: bool, device, dtype):
    """diffusers' ZImageTransformer2DModel: the small config built on ``device``, or the full-size one built on
    ``meta`` and filled in place on ``device`` with random ``dtype`` weights (never in fp32)."""
    from diffusers import ZImageTransformer2DModel

    if not full:
        with torch.device(device):
            return ZImageTransformer2DModel(**SMALL).to(dtype).eval()
    with torch.device("meta"):
        return randomly_filled(ZImageTransformer2DModel().to(dtype), device)


def trained_subset(reference, full: bool) -> str | None:
    """The ``where`` of what forward+backward differentiates: all (None), or with ``full`` the last
    :data:`GRADIENT_BLOCKS` layers, whose ``requires_grad`` alone is set on the reference."""
    if not full:
        reference.requires_grad_(True)
        return None
    reference.requires_grad_(False)
    count = len(reference.layers)
    chosen = range(count - GRADIENT_BLOCKS, count)
    for index in chosen:
        reference.layers[index].requires_grad_(True)
    return rf"^layers/({'|'.join(map(str, chosen))})/"


def inputs(model, latent_size: int, text_lengths: tuple[int, ...], device, dtype, seed: int = 0):
    """A batch of latents and zero-padded caption states with their masks (one sample per caption length)."""
    k1, k2 = dsf.random.split(dsf.random.key(seed))
    batch, longest = len(text_lengths), max(text_lengths)
    mask = torch.arange(longest, device=device) < torch.tensor(text_lengths, device=device)[:, None]
    text = dsf.random.normal(k2, (batch, longest, model.config.cap_feat_dim), device=device, dtype=dtype)
    return dict(
        latents=dsf.random.normal(k1, (batch, 16, latent_size, latent_size), device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.7, device=device, dtype=dtype),
        text_embeds=text * mask[..., None],
        text_mask=mask,
    )


def diffusers_call(model, latents, timestep, text_embeds, text_mask):
    """What ZImagePipeline does per step: per-sample lists, padding removed, fed 1 − σ, the output negated."""
    captions = [embeds[valid] for embeds, valid in zip(text_embeds, text_mask)]
    out = model(list(latents.unsqueeze(2).unbind(0)), 1 - timestep, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full-size DiT in bf16 at 1024x1024, captions of 512 and 300 tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is the fair default)")
    parser.add_argument("--compile", action="store_true", help="compiled against eager, dsf and diffusers (regional compilation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.full else torch.float32
    latent_size, text_lengths = (128, (512, 300)) if args.full else (32, (64, 40))

    reference = reference_model(args.full, device, dtype)
    dit, params = z_image.load_dit(reference.state_dict(), config={"axes_dims": list(reference.config.axes_dims)},
                                   device=device, dtype=dtype)  # same device and dtype: dsf's tree views the reference's
    x = inputs(reference, latent_size, text_lengths, device, dtype)
    tokens = f"{(latent_size // 2) ** 2} image + {text_lengths} text tokens, batch {len(text_lengths)}"
    if args.compile:
        print(f"Z-Image DiT, {'full-size' if args.full else 'small'} config, {dtype}, {device.type} "
              f"({torch.get_num_threads()} threads), {tokens}")
        print(compiled_table(lambda p: dit(p, **x), params, reference, lambda m: diffusers_call(m, **x),
                             "to_q,to_k,to_v,to_out.0", args.repeats, device))
        return

    where = trained_subset(reference, args.full)
    passes = timed_passes(lambda p: dit(p, **x), params, reference, lambda: diffusers_call(reference, **x),
                          where=where, free_both=args.full)
    print_comparison(passes, args.repeats, device,
                     f"device {device}, dtype {dtype}, {'full-size' if args.full else 'small'} config, {tokens}",
                     f"; backward differentiates the last {GRADIENT_BLOCKS} layers" if args.full else "")


if __name__ == "__main__":
    main()
