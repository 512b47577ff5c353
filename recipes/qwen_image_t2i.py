"""Qwen-Image text-to-image (and image-to-image) from the command line, with low-memory transforms.

    python recipes/qwen_image_t2i.py --model_path /path/to/Qwen-Image --prompt "a sign that says hello" --out sign.png
    python recipes/qwen_image_t2i.py --model_id Qwen/Qwen-Image --prompt "a cat" \\
        --device cuda --dtype bfloat16 --fp8 dit,text_encoder --offload block --vram_limit 8 --out cat.png

``--model_id`` downloads into $DSF_MODEL_BASE_PATH (ModelScope, or the Hugging Face Hub with
DSF_DOWNLOAD_SOURCE=huggingface). ``--dit``/``--vae``/``--text_encoder`` take single files (ComfyUI's
``qwen_image_bf16.safetensors``, ``qwen_image_vae.safetensors``, ``qwen_2.5_vl_7b.safetensors``) instead of the
folder's. The defaults are the model card's: 1328×1328, 50 steps, true CFG 4 against the negative prompt " ".
The transforms wrap the whole pipeline call: fp8 storage of the named components, offload of the weights to the
CPU (per component or per block, keeping ``--vram_limit`` GiB of blocks resident), and LoRA files attached unfused.
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
from dsf.models.qwen_image.pipeline import CFG_SCALE, HEIGHT, NEGATIVE_PROMPT, NUM_INFERENCE_STEPS, WIDTH, load_pipeline
from dsf.transforms import load_lora


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Qwen-Image text-to-image.")
    add_model_flags(p, "Qwen-Image", "Qwen/Qwen-Image", "diffusers or ComfyUI", "diffusers or original Wan",
                    negative_prompt=NEGATIVE_PROMPT)
    p.add_argument("--text_encoder", help="a Qwen2.5-VL file or folder (e.g. ComfyUI's qwen_2.5_vl_7b.safetensors)")
    p.add_argument("--tokenizer", help="the tokenizer folder, with --text_encoder outside a pipeline folder")
    p.add_argument("--num_inference_steps", type=positive_int, default=NUM_INFERENCE_STEPS)
    p.add_argument("--height", type=positive_int, default=HEIGHT)
    p.add_argument("--width", type=positive_int, default=WIDTH)
    p.add_argument("--cfg_scale", type=finite_float, default=CFG_SCALE)
    p.add_argument("--input_image", help="image-to-image: the starting image")
    p.add_argument("--denoising_strength", type=finite_float, default=1.0)
    add_memory_flags(p, lora_help="a LoRA file (any layout); repeatable")
    p.add_argument("--out", default="qwen_image.png")
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
        input_image=Image.open(args.input_image) if args.input_image else None,
        denoising_strength=args.denoising_strength,
    )
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
