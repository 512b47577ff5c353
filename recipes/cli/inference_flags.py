"""The low-memory flags of the generation recipes: storage dtype and device, fp8 storage, offload,
LoRA files; the transform stack they describe and the device the weights are loaded onto.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_memory_flags(parser, lora_help="a LoRA file; repeatable")
    >>> args = parser.parse_args(["--device", "cpu", "--fp8", "dit,t5", "--offload", "block", "--lora", "a.safetensors"])
    >>> memory_transforms(args).name
    'chain(fp8(granularity=tensor, compute_dtype=bfloat16), offload(device=cpu, level=block, vram_limit=0.0))'
    >>> storage_device(args), lora_scales(args)
    ('cpu', [1.0])
"""

from __future__ import annotations

import argparse

import torch

import dsf
from dsf.cli.flag_types import non_negative_int
from dsf.transforms import fp8, offload
from dsf.cli.flag_types import finite_float


def add_model_flags(parser: argparse.ArgumentParser, family: str, example_repo: str, dit_layouts: str, vae_layouts: str,
                    negative_prompt: str = "") -> None:
    """Add where the model comes from (--model_path, --model_id, --dit, --vae), --prompt, --negative_prompt and --seed.

    >>> parser = argparse.ArgumentParser()
    >>> add_model_flags(parser, "FLUX.1", "black-forest-labs/FLUX.1-dev", "diffusers, BFL or ComfyUI", "diffusers or BFL")
    >>> parser.parse_args(["--prompt", "a cat", "--dit", "flux1-dev.safetensors"]).dit
    'flux1-dev.safetensors'
    """
    parser.add_argument("--model_path", help=f"a diffusers {family} pipeline folder")
    parser.add_argument("--model_id", help=f"a hub repo, e.g. {example_repo}")
    parser.add_argument("--dit", help=f"a DiT file or folder ({dit_layouts} layout)")
    parser.add_argument("--vae", help=f"a VAE file or folder ({vae_layouts} layout)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=negative_prompt)
    parser.add_argument("--seed", type=non_negative_int, default=0)


def add_memory_flags(parser: argparse.ArgumentParser, lora_help: str) -> None:
    """Add --dtype, --device, --fp8, --offload, --vram_limit, --lora (``lora_help``) and --lora_scale; see the module example."""
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp8", default="", help="components stored in float8, e.g. dit,t5")
    parser.add_argument("--offload", default="none", choices=("none", "component", "block"))
    parser.add_argument("--vram_limit", type=finite_float, default=0.0, help="GiB of blocks kept resident with --offload block")
    parser.add_argument("--lora", action="append", default=[], help=lora_help)
    parser.add_argument("--lora_scale", type=finite_float, action="append", default=[], help="one per --lora (default 1)")


def memory_transforms(args: argparse.Namespace) -> dsf.Transform:
    """fp8 storage of the --fp8 components and --offload of the weights, chained; see the module example."""
    stack = []
    components = [c for c in args.fp8.split(",") if c]
    if components:
        stack.append(fp8(where=rf"^({'|'.join(components)})/", compute_dtype=getattr(torch, args.dtype)))
    if args.offload != "none":
        stack.append(offload(device=args.device, level=args.offload, vram_limit=args.vram_limit))
    return dsf.chain(*stack)


def storage_device(args: argparse.Namespace) -> str:
    """Where the weights are loaded: the CPU when they are offloaded, else --device."""
    return "cpu" if args.offload != "none" else args.device


def lora_scales(args: argparse.Namespace) -> list[float]:
    """One scale per --lora file: the given --lora_scale values, then 1."""
    return args.lora_scale + [1.0] * (len(args.lora) - len(args.lora_scale))
