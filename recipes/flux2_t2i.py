"""FLUX.2 (dev, klein) text-to-image and multi-reference editing from the command line, with low-memory transforms.

    python recipes/flux2_t2i.py --model_path /path/to/FLUX.2-klein-4B --prompt "a cat" --out cat.png
    python recipes/flux2_t2i.py --model_id black-forest-labs/FLUX.2-dev --prompt "the cat wears the hat" \\
        --image cat.png --image hat.png --device cuda --fp8 dit,text --offload block --vram_limit 8 --out edit.png

``--model_id`` downloads into $DSF_MODEL_BASE_PATH (ModelScope, or the Hugging Face Hub with
DSF_DOWNLOAD_SOURCE=huggingface). ``--dit``/``--vae``/``--text_encoder`` take single files (BFL
``flux2-dev.safetensors``, ``flux2-klein-4b.safetensors``, ``ae.safetensors``, ComfyUI's text-encoder files)
instead of the folder's. The transforms wrap the whole pipeline call: fp8 storage of the named components
(``dit``, ``vae``, ``text``), offload of the weights to the CPU (per component or per block: the 24B Mistral
text encoder streams one layer at a time), and LoRA files attached unfused.
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
from dsf.models.flux2.pipeline import load_pipeline
from dsf.models.flux2.text import MAX_TOKENS
from dsf.transforms import load_lora


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FLUX.2 text-to-image and editing.")
    add_model_flags(p, "FLUX.2", "black-forest-labs/FLUX.2-klein-4B", "diffusers, BFL or ComfyUI", "diffusers or BFL ae.safetensors")
    p.add_argument("--text_encoder", help="a text-encoder file or folder (Mistral3 for dev, Qwen3 for klein)")
    p.add_argument("--tokenizer", help="the tokenizer folder (the repo's tokenizer/), with --text_encoder")
    p.add_argument("--distilled", action="store_true", default=None,
                   help="a step-distilled klein (4 steps, no CFG); default: the folder's model_index.json")
    p.add_argument("--image", action="append", default=[], help="a reference image to edit from; repeatable")
    p.add_argument("--num_inference_steps", type=positive_int, help="default: dev and klein base 50, distilled klein 4")
    p.add_argument("--height", type=positive_int, help="default: the last reference image's, else 1024")
    p.add_argument("--width", type=positive_int, help="default: the last reference image's, else 1024")
    p.add_argument("--guidance_scale", type=finite_float, default=4.0,
                   help="dev: embedded guidance; klein base: classifier-free guidance; distilled klein: unused")
    p.add_argument("--max_sequence_length", type=positive_int, default=MAX_TOKENS)
    add_memory_flags(p, lora_help="a LoRA file (any layout); repeatable")
    p.add_argument("--out", default="flux2.png")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         dtype=getattr(torch, args.dtype), device=storage_device(args),
                         max_sequence_length=args.max_sequence_length, distilled=args.distilled)

    params = pipe.params
    for path, scale in zip(args.lora, lora_scales(args)):
        params = {**params, "dit": load_lora(params["dit"], path, scale=scale)}
    stack = memory_transforms(args)
    params = stack.init(params, dsf.random.key(args.seed))

    image = stack(pipe.generate)(
        params, args.prompt, images=[Image.open(path) for path in args.image], negative_prompt=args.negative_prompt,
        seed=args.seed, num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale,
    )
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
