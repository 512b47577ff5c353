"""Z-Image text-to-image (and image-to-image) from the command line, with low-memory transforms.

    python recipes/z_image_t2i.py --model_path /path/to/Z-Image-Turbo --prompt "a cat" --out cat.png
    python recipes/z_image_t2i.py --model_id Tongyi-MAI/Z-Image-Turbo --prompt "a cat" \\
        --device cuda --dtype bfloat16 --fp8 text_encoder --offload block --vram_limit 8 --out cat.png
    python recipes/z_image_t2i.py --model_id Tongyi-MAI/Z-Image --prompt "a cat" --num_inference_steps 50 \\
        --cfg_scale 4 --negative_prompt "blurry" --out cat.png

Turbo (the default settings) samples 8 steps without guidance; the base model 50 steps with --cfg_scale 4
(diffusers' guidance_scale g is --cfg_scale g + 1), optionally --cfg_normalization / --cfg_truncation as
diffusers' ZImagePipeline has them. ``--model_id`` downloads into $DSF_MODEL_BASE_PATH. ``--dit``/``--vae``/
``--text_encoder`` take single files (Comfy-Org's ``z_image_turbo_bf16.safetensors``, ``ae.safetensors``,
``qwen_3_4b.safetensors``; then --tokenizer names Z-Image's tokenizer folder) instead of the folder's. The
transforms wrap the whole pipeline call: fp8 storage of the named components, offload of the weights to the
CPU (per component or per block, keeping ``--vram_limit`` GiB of blocks resident), LoRA files attached unfused.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

import dsf
from dsf.cli.flag_types import finite_float, positive_int
from dsf.cli.inference_flags import add_memory_flags, add_model_flags, lora_scales, memory_transforms, storage_device
from dsf.files.hub import ModelSource
from dsf.models.z_image.pipeline import TURBO_STEPS, load_pipeline
from dsf.transforms import load_lora


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Z-Image text-to-image.")
    add_model_flags(p, "Z-Image", "Tongyi-MAI/Z-Image-Turbo", "diffusers, or Lumina2-style original/ComfyUI",
                    "diffusers or BFL ae.safetensors")
    p.add_argument("--text_encoder", help="the Qwen3 text encoder's file or folder (e.g. qwen_3_4b.safetensors)")
    p.add_argument("--tokenizer", help="Z-Image's tokenizer folder (needed with a single-file --text_encoder)")
    p.add_argument("--num_inference_steps", type=positive_int, default=TURBO_STEPS)
    p.add_argument("--height", type=positive_int, default=1024)
    p.add_argument("--width", type=positive_int, default=1024)
    p.add_argument("--cfg_scale", type=finite_float, default=1.0, help="1: no guidance (Turbo); 4 for the base model")
    p.add_argument("--cfg_normalization", type=finite_float, default=0.0, help="cap the guided norm at this × the conditional's")
    p.add_argument("--cfg_truncation", type=finite_float, default=1.0, help="no guidance once 1 − σ passes this")
    p.add_argument("--input_image", help="image-to-image: the starting image")
    p.add_argument("--denoising_strength", type=finite_float, default=1.0)
    add_memory_flags(p, lora_help="a LoRA file (any layout); repeatable")
    p.add_argument("--out", default="z_image.png")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         dtype=getattr(torch, args.dtype), device=storage_device(args))

    params = pipe.params
    for path, scale in zip(args.lora, lora_scales(args)):
        params = {**params, "dit": load_lora(params["dit"], path, scale=scale)}
    stack = memory_transforms(args)
    params = stack.init(params, dsf.random.key(args.seed))

    image = stack(pipe.generate)(
        params, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        num_inference_steps=args.num_inference_steps, height=args.height, width=args.width, cfg_scale=args.cfg_scale,
        cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation,
        input_image=Image.open(args.input_image) if args.input_image else None,
        denoising_strength=args.denoising_strength,
    )
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
