"""Wan 2.1 / 2.2 text-to-video and image-to-video from the command line, with low-memory transforms.

    python recipes/wan_t2v.py --model_path /path/to/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --out cat.mp4
    python recipes/wan_t2v.py --model_id Wan-AI/Wan2.2-I2V-A14B-Diffusers --image cat.png --prompt "the cat jumps" \\
        --device cuda --dtype bfloat16 --fp8 dit,t5 --offload block --vram_limit 8 --out cat.mp4

``--model_id`` downloads into $DSF_MODEL_BASE_PATH (ModelScope, or the Hugging Face Hub with
DSF_DOWNLOAD_SOURCE=huggingface). The folder is a diffusers Wan pipeline: T2V, I2V (``--image``
required), TI2V-5B (``--image`` optional) or a two-expert A14B model; ``--dit``/``--vae`` take
other files (Wan's original or ComfyUI layout) instead of the folder's. The transforms wrap the
whole pipeline call: fp8 storage of the named components, offload of the weights to the CPU (per
component or per block, keeping ``--vram_limit`` GiB of blocks resident), and LoRA files attached
unfused (on an A14B model, to both experts).
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

import dsf
from dsf.files.hub import ModelSource
from dsf.models.wan.model import TwoExpertDiT
from dsf.models.wan.pipeline import DEFAULT_NEGATIVE_PROMPT, FPS, load_pipeline
from dsf.cli.inference_flags import add_memory_flags, add_model_flags, lora_scales, memory_transforms, storage_device
from dsf.transforms import load_lora
from dsf.files.video import write_mp4
from dsf.cli.flag_types import finite_float, positive_int


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Wan text-to-video and image-to-video.")
    add_model_flags(p, "Wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "diffusers, Wan original or ComfyUI; A14B: its folder",
                    "diffusers or Wan original", negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    p.add_argument("--image", help="image-to-video: the first frame")
    p.add_argument("--num_frames", type=positive_int, default=81, help="1 + 4k")
    p.add_argument("--height", type=positive_int, default=480)
    p.add_argument("--width", type=positive_int, default=832)
    p.add_argument("--num_inference_steps", type=positive_int, default=50)
    p.add_argument("--cfg_scale", type=finite_float, default=5.0)
    p.add_argument("--sigma_shift", type=finite_float, default=5.0)
    p.add_argument("--no_tiling", action="store_true", help="encode and decode with the VAE in one piece")
    p.add_argument("--max_sequence_length", type=positive_int, default=512, help="umT5 tokens per prompt")
    add_memory_flags(p, lora_help="a LoRA file (dsf or diffusers layout); repeatable")
    p.add_argument("--fps", type=positive_int, default=FPS)
    p.add_argument("--out", default="wan.mp4")
    return p


def with_loras(pipe, dit_params, files: list[str], scales: list[float]):
    """``dit_params`` with each LoRA file attached (to every expert of an A14B model).

    >>> from dsf.models.wan.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("t2v-a14b")
    >>> with_loras(pipe, pipe.dit_params, [], []) is pipe.dit_params
    True
    """
    for path, scale in zip(files, scales):
        if isinstance(pipe.dit, TwoExpertDiT):
            dit_params = {expert: load_lora(tree, path, scale=scale) for expert, tree in dit_params.items()}
        else:
            dit_params = load_lora(dit_params, path, scale=scale)
    return dit_params


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, dtype=getattr(torch, args.dtype), device=storage_device(args),
                         max_sequence_length=args.max_sequence_length)

    params = {**pipe.params, "dit": with_loras(pipe, pipe.dit_params, args.lora, lora_scales(args))}
    stack = memory_transforms(args)
    params = stack.init(params, dsf.random.key(args.seed))

    frames = stack(pipe.generate)(
        params, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        image=Image.open(args.image) if args.image else None, num_frames=args.num_frames, height=args.height,
        width=args.width, num_inference_steps=args.num_inference_steps, cfg_scale=args.cfg_scale,
        sigma_shift=args.sigma_shift, tiled=not args.no_tiling,
    )
    write_mp4(frames, args.out, fps=args.fps)
    print(f"wrote {args.out} ({len(frames)} frames, {args.width}x{args.height}, {args.fps} fps)")


if __name__ == "__main__":
    main(sys.argv[1:])
