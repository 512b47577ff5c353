"""Train a LoRA on a FLUX.2 DiT (dev or klein), or the whole DiT, from an image folder, text-to-image or editing, with
DiffSynth-Studio's training flags.

    python recipes/flux2_lora.py --model_path /path/to/FLUX.2-klein-base-4B \\
        --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 --lora_rank 32 \\
        --use_gradient_checkpointing --fp8_models dit,text --offload_models text --output_path outputs/cats

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column; for editing, --reference_columns names the columns of the reference images (e.g. ``edit_image``), which
the DiT attends as extra tokens as it does at inference. The model comes from a diffusers folder (--model_path,
--model_id) or single files (--dit: BFL ``flux2-*.safetensors``, diffusers or ComfyUI; --vae: ``ae.safetensors``;
--text_encoder with --tokenizer).

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: BFL or diffusers module names; the default
is every attention and MLP projection; --lora_checkpoint continues a LoRA file), or with --trainable_models dit the
whole DiT (full fine-tuning). --preset_lora_path merges a LoRA into the base first (differential LoRA). Memory: --fp8_models stores the
frozen DiT and text encoder in fp8, --offload_models streams them from the CPU one block at a time (keeping
--vram_limit GiB resident), --use_gradient_checkpointing recomputes each block in backward; split training
encodes the data once without the DiT and trains without the VAE and text encoder.

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, text encoder) into a cache folder, --output_path;
                      the DiT is built from its checkpoint's headers alone, never read
  sft:train           train from that cache (--dataset_base_path CACHE); the VAE and the text encoder
                      are built from their headers alone, never read
  direct_distill      the student samples with the metadata's seed, num_inference_steps and cfg_scale (its
                      guidance scale), gradients through the sampler; loss: MSE to the latents of the teacher's
                      image, at that image's own size

Written under --output_path: ``step-N.safetensors`` every --save_steps steps (default: once per epoch) and at the
end (the LoRA in --lora_layout: ``diffusers`` for diffusers and DiffSynth-Studio, ``comfyui``/``kohya`` in BFL names
for ComfyUI; or the whole DiT in the diffusers layout), ``log.csv``, and the resumable state in ``checkpoints/`` that --resume continues from.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

import dsf
from dsf.cli.flag_types import finite_float, positive_int
from dsf.cli.lora_paradigm import trained_lora
from dsf.cli.training_flags import add_dataset_flags, add_training_flags, batch_stream, train_config
from dsf.files.hub import ModelSource
from dsf.model_parts.lora_files import LAYOUTS
from dsf.models.flux2.pipeline import load_pipeline
from dsf.models.flux2.text import MAX_TOKENS
from dsf.models.flux2.training import LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.training.cache import CachedDataset, encode_into_cache
from dsf.training.data import FolderDataset
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.training.checkpoint import save_safetensors
from dsf.transforms import checkpoint, fp8, load_lora, lora_trainable, merge_lora, offload, save_lora
from dsf.transforms.lora import TRAINED
from dsf.weight import dense_tree

FROZEN_COMPONENTS = ("dit", "text")  # what --fp8_models and --offload_models may name
TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text"), "direct_distill": ()}  # kept on meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LoRA on a FLUX.2 DiT with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image, prompt (and reference image)")
    data.add_argument("--reference_columns", default="", help="comma list of the metadata columns of reference images")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=MAX_TOKENS, help="text tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers FLUX.2 pipeline folder")
    models.add_argument("--model_id", help="a hub repo, e.g. black-forest-labs/FLUX.2-klein-base-4B")
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's (BFL, diffusers or ComfyUI layout)")
    models.add_argument("--vae", help="a VAE file or folder instead of the pipeline's (BFL ae.safetensors or diffusers)")
    models.add_argument("--text_encoder", help="a text-encoder file or folder instead of the pipeline's")
    models.add_argument("--tokenizer", help="the tokenizer folder, with --text_encoder")
    models.add_argument("--fp8_models", default="", help=f"comma list of frozen components stored in fp8: {FROZEN_COMPONENTS}")
    models.add_argument("--offload_models", default="", help=f"comma list of components streamed from the CPU block by block: "
                                                             f"{FROZEN_COMPONENTS}")
    models.add_argument("--vram_limit", type=finite_float, default=0.0, help="GiB of offloaded blocks kept resident")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    groups = add_training_flags(p, output_path="outputs/flux2_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    groups["training"].add_argument("--task", default="sft", choices=TASKS)
    groups["training"].add_argument("--trainable_models", choices=("dit",), help="dit: full fine-tuning of the DiT instead of a LoRA")
    groups["LoRA"].add_argument("--preset_lora_path", help="a LoRA merged into the base before training (differential LoRA)")
    return p


def _components(flag: str, value: str, task: str = "sft") -> list[str]:
    """The components a comma list names, less those the task never runs (kept on the meta device)."""
    chosen = [c for c in value.split(",") if c]
    unknown = [c for c in chosen if c not in FROZEN_COMPONENTS]
    if unknown:
        raise ValueError(f"{flag} takes components of {FROZEN_COMPONENTS}, got {unknown}")
    return [c for c in chosen if c not in NOT_RUN[task]]


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]))
    Traceback (most recent call last):
    ...
    ValueError: pass --model_path (a diffusers FLUX.2 pipeline folder), --model_id (a hub repo), or --dit, --vae and --text_encoder
    """
    if args.model_path is None and args.model_id is None and None in (args.dit, args.vae, args.text_encoder):
        raise ValueError("pass --model_path (a diffusers FLUX.2 pipeline folder), --model_id (a hub repo), "
                         "or --dit, --vae and --text_encoder")
    if args.task != "sft:train" and args.dataset_metadata_path is None:
        raise ValueError(f"--task {args.task} reads a dataset folder: pass --dataset_metadata_path")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"pass both --height and --width or neither (got {args.height}, {args.width})")
    if args.task == "direct_distill" and (args.height or args.reference_columns):
        raise ValueError("direct_distill trains at the teacher images' own size, without reference images: "
                         "drop --height/--width and --reference_columns (teacher images within --max_pixels, sides multiples of 16)")
    _components("--fp8_models", args.fp8_models)
    _components("--offload_models", args.offload_models)
    if args.trainable_models and args.lora_checkpoint:
        raise ValueError("--lora_checkpoint continues a LoRA, but --trainable_models dit trains the whole DiT; drop one")


def memory_transforms(args, compute_dtype) -> dsf.Transform:
    """fp8 storage and block offload of the frozen components, gradient checkpointing.

    >>> flags = ["--dataset_base_path", "d", "--fp8_models", "dit,text", "--offload_models", "text", "--device", "cpu",
    ...          "--use_gradient_checkpointing"]
    >>> memory_transforms(parser().parse_args(flags), torch.float32).name
    'chain(fp8(granularity=tensor, compute_dtype=float32), offload(device=cpu, level=block, vram_limit=0.0), checkpoint(offload_activations=False))'
    """
    stack = []
    fp8_models = _components("--fp8_models", args.fp8_models, args.task)
    offloaded = _components("--offload_models", args.offload_models, args.task)
    if fp8_models:
        stack.append(fp8(where=rf"^({'|'.join(fp8_models)})/", compute_dtype=compute_dtype))
    if offloaded:
        stack.append(offload(device=args.device, level="block", vram_limit=args.vram_limit, where=rf"^({'|'.join(offloaded)})/"))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        stack.append(checkpoint(offload_activations=args.use_gradient_checkpointing_offload))
    return dsf.chain(*stack)


def chosen_paradigm(args, compute_dtype) -> Paradigm:
    """What the flags train, as one chain: the memory transforms, then (LoRA) the adapter.

    >>> flags = ["--dataset_base_path", "d", "--fp8_models", "text", "--lora_rank", "4"]
    >>> chosen_paradigm(parser().parse_args(flags), torch.float32).transforms.name
    "chain(fp8(granularity=tensor, compute_dtype=float32), lora(rank=4, alpha=None, name='lora'))"
    >>> chosen_paradigm(parser().parse_args([*flags, "--trainable_models", "dit"]), torch.float32).name
    'full fine-tuning'
    """
    stack = memory_transforms(args, compute_dtype)
    if args.trainable_models:
        return Paradigm("full fine-tuning", stack, r"^dit/")
    return Paradigm("LoRA", dsf.chain(stack, trained_lora(args)), lora_trainable)


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    offloaded = _components("--offload_models", args.offload_models, args.task)
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline: DiT, VAE, text encoder; what the task never runs is built on the meta device from its headers,
    #    what is offloaded is loaded on the CPU.
    devices = {name: "meta" if name in NOT_RUN[args.task] else "cpu" if name in offloaded else device
               for name in ("dit", "vae", "text")}
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         dtype=dtype, device=devices, max_sequence_length=args.max_sequence_length)
    params = pipe.params
    references = [c for c in args.reference_columns.split(",") if c]
    encoder = SampleEncoder(pipe.vae, pipe.text, args.max_sequence_length, tuple(references))

    # 2. The data: images (and reference images) with their prompts, or the encoded samples of a data-processing run.
    image_size = (args.height, args.width) if args.height else None
    if args.task == "sft:train":
        dataset = CachedDataset(args.dataset_base_path, repeat=args.dataset_repeat)
    else:
        dataset = FolderDataset(args.dataset_base_path, args.dataset_metadata_path,
                                repeat=1 if args.task == "sft:data_process" else args.dataset_repeat,
                                data_file_keys=["image", *references], image_size=image_size,
                                max_pixels=None if image_size else args.max_pixels)

    # 3. Split training, stage 1: encode every sample once, cache, and stop.
    if args.task == "sft:data_process":
        stack = memory_transforms(args, dtype)
        index = encode_into_cache(args.output_path, dataset, functools.partial(stack(encoder), stack.init(params, init_key)))
        print(f"cached {len(dataset)} encoded samples: {index}")
        return Path(args.output_path)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8 storage, block offload, gradient
    #    checkpointing, the LoRA on the DiT (or the whole DiT).
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(encoder)

    # 5. The loss (flow matching on FLUX.2's training schedule, or the student's samples against the teacher's),
    #    and the data stream.
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(pipe.dit)
    data = DataFromParams(lambda initialized: batch_stream(
        dataset, args.batch_size, data_key, None if encode is None else functools.partial(encode, initialized)))

    # 6. Train: AdamW on the LoRA factors, saving the LoRA in --lora_layout.
    config = train_config(args, len(dataset))

    def save(path, trained):
        if args.trainable_models:
            save_safetensors(path, dsf.tree.flatten_dict(dense_tree(trained["dit"])))
        else:
            save_lora(trained["dit"], path, args.lora_layout, name=TRAINED)

    trained = fit(paradigm, loss, params, data, config, key=fit_key, save=save)
    print(f"trained {config.max_steps} steps; the last file is {args.output_path}/step-{config.max_steps}.safetensors")
    return trained


if __name__ == "__main__":
    main(sys.argv[1:])
