"""Qwen-Image DiT speed: dsf against diffusers' QwenImageTransformer2DModel with the same weights.

Forward and forward+backward, runs interleaved (dsf, diffusers, dsf, ...) so machine noise hits both alike;
prints the median seconds of each and the ratio dsf/diffusers (goal <= 1.0). The text is two prompts of
different lengths, zero-padded and masked, as the pipelines give them.

    python bench/qwen_image.py                      # small config, fp32, CPU
    python bench/qwen_image.py --device cuda --full # full-size random bf16 DiT at 1328x1328 (needs a GPU)

With ``--full`` both sides share one set of random bf16 weights on the GPU (40.9 GB; the reference is built on
``meta`` and filled in place, dsf's tree views its tensors), batch 1 with one 512-token prompt, and
forward+backward differentiates the last ``GRADIENT_BLOCKS`` blocks only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import dsf
from dsf.models import qwen_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_dit import print_comparison, randomly_filled, timed_passes  # noqa: E402

SMALL = dict(num_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(16, 24, 24))
GRADIENT_BLOCKS = 6  # --full: forward+backward differentiates the last 6 blocks


def reference_model(full: bool, device, dtype):
    """diffusers' QwenImageTransformer2DModel: the small config on ``device``, or the full-size one built on ``meta``
    and filled in place on ``device`` with random ``dtype`` weights."""
    from diffusers import QwenImageTransformer2DModel

    if not full:
        with torch.device(device):
            return QwenImageTransformer2DModel(**SMALL).to(dtype).eval()
    with torch.device("meta"):
        return randomly_filled(QwenImageTransformer2DModel().to(dtype), device)


def trained_subset(reference, full: bool) -> str | None:
    """The ``where`` of what forward+backward differentiates: all (None), or with ``full`` the last blocks."""
    if not full:
        reference.requires_grad_(True)
        return None
    reference.requires_grad_(False)
    chosen = range(len(reference.transformer_blocks) - GRADIENT_BLOCKS, len(reference.transformer_blocks))
    for index in chosen:
        reference.transformer_blocks[index].requires_grad_(True)
    return rf"^transformer_blocks/({'|'.join(map(str, chosen))})/"


def inputs(model, lengths: list[int], latent_size: int, device, dtype, seed: int = 0) -> dict:
    """Latents, σ, and prompts of ``lengths`` tokens zero-padded to the longest, with their mask (None: one length)."""
    k1, k2 = dsf.random.split(dsf.random.key(seed))
    longest, batch = max(lengths), len(lengths)
    mask = torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    text = dsf.random.normal(k2, (batch, longest, model.config.joint_attention_dim), device=device, dtype=dtype)
    return dict(latents=dsf.random.normal(k1, (batch, 16, latent_size, latent_size), device=device, dtype=dtype),
                timestep=torch.full((batch,), 0.7, device=device, dtype=dtype), text_embeds=text * mask[..., None],
                text_mask=None if bool(mask.all()) else mask)


def diffusers_call(model, latents, timestep, text_embeds, text_mask):
    """diffusers' packing and image shapes around its transformer (what QwenImagePipeline does per step)."""
    from diffusers import QwenImagePipeline

    b, c, h, w = latents.shape
    out = model(hidden_states=QwenImagePipeline._pack_latents(latents, b, c, h, w), encoder_hidden_states=text_embeds,
                encoder_hidden_states_mask=text_mask, timestep=timestep, img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)[:, :, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full-size DiT in bf16 at 1328x1328, one 512-token prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is the fair default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.full else torch.float32
    latent_size, lengths = (166, [512]) if args.full else (32, [64, 40])

    reference = reference_model(args.full, device, dtype)
    dit, params = qwen_image.load_dit(reference.state_dict(), config=dict(reference.config), device=device, dtype=dtype)
    x = inputs(reference, lengths, latent_size, device, dtype)
    where = trained_subset(reference, args.full)
    passes = timed_passes(lambda p: dit(p, **x), params, reference, lambda: diffusers_call(reference, **x),
                          where=where, free_both=args.full)
    print_comparison(passes, args.repeats, device,
                     f"device {device}, dtype {dtype}, {'full-size' if args.full else 'small'} config, batch {len(lengths)}, "
                     f"{latent_size // 2 * latent_size // 2} image + {lengths} text tokens",
                     f"; backward differentiates the last {GRADIENT_BLOCKS} blocks" if args.full else "")


if __name__ == "__main__":
    main()
