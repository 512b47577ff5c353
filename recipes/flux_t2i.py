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
from dsf.hub import ModelSource
from dsf.models.flux.pipeline import load_pipeline
from dsf.transforms import fp8, load_lora, offload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FLUX.1 text-to-image.")
    p.add_argument("--model_path", help="a diffusers FLUX.1 pipeline folder")
    p.add_argument("--model_id", help="a hub repo, e.g. black-forest-labs/FLUX.1-dev")
    p.add_argument("--dit", help="a DiT file or folder (diffusers, BFL or ComfyUI layout)")
    p.add_argument("--vae", help="a VAE file or folder (diffusers or BFL ae.safetensors)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--embedded_guidance", type=float, default=3.5)
    p.add_argument("--cfg_scale", type=float, default=1.0)
    p.add_argument("--input_image", help="image-to-image: the starting image")
    p.add_argument("--denoising_strength", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp8", default="", help="components stored in float8, e.g. dit,t5")
    p.add_argument("--offload", default="none", choices=("none", "component", "block"))
    p.add_argument("--vram_limit", type=float, default=0.0, help="GiB of blocks kept resident with --offload block")
    p.add_argument("--lora", action="append", default=[], help="a LoRA file (any layout); repeatable")
    p.add_argument("--lora_scale", type=float, action="append", default=[])
    p.add_argument("--out", default="flux.png")
    return p


def transforms(args) -> dsf.Transform:
    compute_dtype = getattr(torch, args.dtype)
    stack = []
    components = [c for c in args.fp8.split(",") if c]
    if components:
        stack.append(fp8(where=rf"^({'|'.join(components)})/", compute_dtype=compute_dtype))
    if args.offload != "none":
        stack.append(offload(device=args.device, level=args.offload, vram_limit=args.vram_limit))
    return dsf.chain(*stack)


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    storage_device = "cpu" if args.offload != "none" else args.device
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, dtype=getattr(torch, args.dtype), device=storage_device)

    params = pipe.params
    scales = args.lora_scale + [1.0] * (len(args.lora) - len(args.lora_scale))
    for path, scale in zip(args.lora, scales):
        params = {**params, "dit": load_lora(params["dit"], path, scale=scale)}
    stack = transforms(args)
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
