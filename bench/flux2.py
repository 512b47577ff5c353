"""FLUX.2 DiT speed: dsf against diffusers' Flux2Transformer2DModel with the same weights.

Forward and forward+backward, runs interleaved (dsf, diffusers, dsf, ...) so machine noise hits both alike; prints
the median seconds of each and the ratio dsf/diffusers (goal <= 1.0). One reference image rides along as extra
tokens, as in editing.

    python bench/flux2.py                          # small config, fp32, CPU
    python bench/flux2.py --device cuda --full     # full-size klein-4B in bf16 at 1024x1024 (needs a GPU)
    python bench/flux2.py --device cuda --full --variant dev   # FLUX.2-dev (64 GB of bf16 weights: an 80 GB GPU)

With ``--full`` both sides share one set of random bf16 weights on the GPU (the reference is built on ``meta`` and
filled in place, dsf's tree views its tensors), and forward+backward differentiates the last ``GRADIENT_BLOCKS``
single blocks only. Peak memory is reported above the memory allocated before the pass (the weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import dsf
from dsf.models import flux2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_dit import GRADIENT_BLOCKS, print_comparison, randomly_filled, timed_passes, trained_subset  # noqa: E402

SMALL = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=384,
             axes_dims_rope=(16, 16, 16, 16))
FULL = {  # the hub configs
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False),
    "dev": {},
}


def reference_model(config: dict, full: bool, device, dtype):
    """diffusers' Flux2Transformer2DModel: small on ``device``, or full-size built on ``meta`` and filled in place."""
    from diffusers import Flux2Transformer2DModel

    if not full:
        with torch.device(device):
            return Flux2Transformer2DModel(**config).to(dtype).eval()
    with torch.device("meta"):
        return randomly_filled(Flux2Transformer2DModel(**config).to(dtype), device)


def inputs(model, size: int, reference_size: int, text_len: int, device, dtype) -> dict:
    keys = dsf.random.split(dsf.random.key(0), 3)
    cfg = model.config
    return dict(
        latents=dsf.random.normal(keys[0], (1, cfg.in_channels, size, size), device=device, dtype=dtype),
        timestep=torch.full((1,), 0.7, device=device, dtype=dtype),
        text_embeds=dsf.random.normal(keys[1], (1, text_len, cfg.joint_attention_dim), device=device, dtype=dtype),
        guidance=torch.full((1,), 4.0, device=device, dtype=dtype) if cfg.guidance_embeds else None,
        reference_latents=[dsf.random.normal(keys[2], (1, cfg.in_channels, reference_size, reference_size),
                                             device=device, dtype=dtype)],
    )


def diffusers_call(model, latents, timestep, text_embeds, guidance, reference_latents):
    """diffusers' packing and ids around its transformer (what Flux2Pipeline does per step)."""
    from diffusers import Flux2Pipeline

    tokens, ids = Flux2Pipeline._pack_latents(latents), Flux2Pipeline._prepare_latent_ids(latents).to(latents.device)
    ref_ids = Flux2Pipeline._prepare_image_ids(reference_latents).to(latents.device)
    tokens = torch.cat([tokens, *(Flux2Pipeline._pack_latents(r) for r in reference_latents)], dim=1)
    ids = torch.cat([ids, ref_ids], dim=1)
    out = model(hidden_states=tokens, encoder_hidden_states=text_embeds, timestep=timestep, guidance=guidance, img_ids=ids,
                txt_ids=Flux2Pipeline._prepare_text_ids(text_embeds).to(latents.device), return_dict=False)[0]
    return out[:, : latents.shape[2] * latents.shape[3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full-size DiT in bf16 at 1024x1024 (+ a 1024x1024 reference)")
    parser.add_argument("--variant", choices=tuple(FULL), default="klein-4b", help="with --full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is the fair default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.full else torch.float32
    size, reference_size, text_len = (64, 64, 512) if args.full else (16, 8, 64)

    reference = reference_model(FULL[args.variant] if args.full else SMALL, args.full, device, dtype)
    dit, params = flux2.load_dit(reference.state_dict(), config={"axes_dims_rope": list(reference.config.axes_dims_rope)},
                                 device=device, dtype=dtype)  # same device and dtype: dsf's tree views the reference's tensors
    x = inputs(reference, size, reference_size, text_len, device, dtype)
    where = trained_subset(reference, args.full)
    ours_tokens = lambda p: dit(p, **x).flatten(2).transpose(1, 2)  # (B, h·w, C), as diffusers returns
    passes = timed_passes(ours_tokens, params, reference, lambda: diffusers_call(reference, **x), where=where,
                          free_both=args.full)
    print_comparison(passes, args.repeats, device,
                     f"FLUX.2 DiT ({args.variant if args.full else 'small'} config), device {device}, dtype {dtype}, "
                     f"{size * size} image + {reference_size ** 2} reference + {text_len} text tokens",
                     f"; backward differentiates the last {GRADIENT_BLOCKS} single blocks" if args.full else "")


if __name__ == "__main__":
    main()
