"""FLUX.1 text-to-image (and image-to-image) from the command line, with low-memory transforms.

    python recipes/flux_t2i.py --model_path /path/to/FLUX.1-dev --prompt "a cat" --out cat.png
    python recipes/flux_t2i.py --model_id black-forest-labs/FLUX.1-dev --prompt "a cat" \\
        --device cuda --dtype bfloat16 --fp8 dit,t5 --offload block --vram_limit 8 --out cat.png

``--model_id`` downloads into $DSF_MODEL_BASE_PATH (ModelScope, or the Hugging Face Hub with
DSF_DOWNLOAD_SOURCE=huggingface). ``--dit``/``--vae`` take single files (BFL ``flux1-dev.safetensors``,
``ae.safetensors``) instead of the folder's. The transforms wrap the whole pipeline call:
fp8 storage of the named components, offload of the weights to the CPU (per component or per
block, keeping ``--vram_limit`` GiB of blocks resident), and LoRA files attached unfused.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

import dsf
from dsf.files.hub import ModelSource
from dsf.models.flux.pipeline import load_pipeline
from dsf.cli.inference_flags import add_memory_flags, add_model_flags, lora_scales, memory_transforms, storage_device
from dsf.transforms import load_lora
from dsf.cli.flag_types import finite_float, positive_int


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FLUX.1 text-to-image.")
    add_model_flags(p, "FLUX.1", "black-forest-labs/FLUX.1-dev", "diffusers, BFL or ComfyUI", "diffusers or BFL ae.safetensors")
    p.add_argument("--num_inference_steps", type=positive_int, default=30)
    p.add_argument("--height", type=positive_int, default=1024)
    p.add_argument("--width", type=positive_int, default=1024)
    p.add_argument("--embedded_guidance", type=finite_float, default=3.5)
    p.add_argument("--cfg_scale", type=finite_float, default=1.0)
    p.add_argument("--input_image", help="image-to-image: the starting image")
    p.add_argument("--denoising_strength", type=finite_float, default=1.0)
    add_memory_flags(p, lora_help="a LoRA file (any layout); repeatable")
    p.add_argument("--out", default="flux.png")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, dtype=getattr(torch, args.dtype), device=storage_device(args))

    params = pipe.params
    for path, scale in zip(args.lora, lora_scales(args)):
        params = {**params, "dit": load_lora(params["dit"], path, scale=scale)}
    stack = memory_transforms(args)
    params = stack.init(params, dsf.random.key(args.seed))

    image = stack(pipe.generate)(
        params, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
        embedded_guidance=args.embedded_guidance, cfg_scale=args.cfg_scale,
        input_image=Image.open(args.input_image) if args.input_image else None,
        denoising_strength=args.denoising_strength,
    )
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
