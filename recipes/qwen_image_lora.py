"""Fine-tune Qwen-Image: a LoRA (or the whole DiT) on an image folder, with DiffSynth-Studio's training flags.

    python recipes/qwen_image_lora.py --dataset_base_path data/dogs --dataset_metadata_path data/dogs/metadata.csv \\
        --model_path /path/to/Qwen-Image --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 \\
        --lora_rank 32 --fp8_models dit,text_encoder --use_gradient_checkpointing --output_path outputs/dogs

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column. The model is a diffusers Qwen-Image pipeline folder (--model_path) or hub repo (--model_id, e.g.
Qwen/Qwen-Image); --dit, --vae and --text_encoder take other files (ComfyUI's single files) instead of the folder's.

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: DiffSynth-Studio's Qwen-Image targets by
default; --lora_checkpoint continues a LoRA file), or with --trainable_models dit the whole DiT (full fine-tuning).
--preset_lora_path merges a LoRA into the base first (differential LoRA). --fp8_models stores frozen components in
fp8; with --offload_blocks the frozen DiT's blocks wait on the CPU and stream in one at a time.

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, Qwen2.5-VL) into a cache folder, --output_path; the DiT is
                      built from its checkpoint's headers alone, never read
  sft:train           train from that cache (--dataset_base_path CACHE); the VAE and text encoder are built from
                      their headers alone, never read
  direct_distill      the student samples with the metadata's seed, num_inference_steps and cfg_scale,
                      gradients through the sampler; loss: MSE to the latents of the teacher's image (give the
                      images' own size as --height/--width)

Written under --output_path: ``step-N.safetensors`` every --save_steps steps (default: once per epoch) and at the
end (the LoRA in --lora_layout, or the whole DiT in the diffusers layout), ``log.csv``, and the resumable state in
``checkpoints/`` (every --checkpoint_steps, default --save_steps) that --resume continues from.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

import dsf
from dsf.cli.flag_types import positive_int
from dsf.cli.lora_paradigm import trained_lora
from dsf.cli.training_flags import add_dataset_flags, add_training_flags, batch_stream, train_config
from dsf.files.hub import ModelSource
from dsf.model_parts.lora_files import LAYOUTS
from dsf.models.qwen_image.pipeline import load_pipeline
from dsf.models.qwen_image.training import LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.training.cache import CachedDataset, encode_into_cache
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.transforms import checkpoint, fp8, load_lora, lora_trainable, merge_lora, offload, save_lora
from dsf.transforms.lora import TRAINED
from dsf.weight import dense_tree

TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
COMPONENTS = ("dit", "vae", "text_encoder")
FP8_COMPONENTS = ("dit", "text_encoder")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text_encoder"), "direct_distill": ()}  # kept on meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune Qwen-Image (LoRA or full) with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image and prompt")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="Qwen2.5-VL tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers Qwen-Image pipeline folder")
    models.add_argument("--model_id", help="a hub repo, e.g. Qwen/Qwen-Image")
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's")
    models.add_argument("--vae", help="a VAE file or folder instead of the pipeline's")
    models.add_argument("--text_encoder", help="a Qwen2.5-VL file or folder instead of the pipeline's")
    models.add_argument("--tokenizer", help="the tokenizer folder, with --text_encoder outside a pipeline folder")
    models.add_argument("--fp8_models", default="", help=f"comma list of frozen components stored in fp8: {FP8_COMPONENTS}")
    models.add_argument("--offload_blocks", action="store_true", help="stream the frozen DiT's blocks from the CPU")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    groups = add_training_flags(p, output_path="outputs/qwen_image_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    groups["training"].add_argument("--task", default="sft", choices=TASKS)
    groups["training"].add_argument("--trainable_models", choices=("dit",),
                                    help="dit: full fine-tuning of the DiT instead of a LoRA")
    groups["LoRA"].add_argument("--preset_lora_path", help="a LoRA merged into the base before training (differential LoRA)")
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv", "--model_path", "q",
    ...                                  "--fp8_models", "vae"]))
    Traceback (most recent call last):
    ...
    ValueError: --fp8_models takes components of ('dit', 'text_encoder'), got ['vae']
    """
    if args.model_path is None and args.model_id is None and not (args.dit and args.vae and args.text_encoder):
        raise ValueError("pass --model_path (a diffusers Qwen-Image folder), --model_id (a hub repo), or --dit, --vae "
                         "and --text_encoder")
    if args.task != "sft:train" and args.dataset_metadata_path is None:
        raise ValueError(f"--task {args.task} reads a dataset folder: pass --dataset_metadata_path")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"pass both --height and --width or neither (got {args.height}, {args.width})")
    unknown = [c for c in args.fp8_models.split(",") if c and c not in FP8_COMPONENTS]
    if unknown:
        raise ValueError(f"--fp8_models takes components of {FP8_COMPONENTS}, got {unknown}")
    if args.trainable_models and (args.lora_checkpoint or args.offload_blocks or "dit" in args.fp8_models):
        raise ValueError("--trainable_models dit trains the whole DiT: drop --lora_checkpoint, --offload_blocks and "
                         "dit from --fp8_models")


def storage_and_block_transforms(args, compute_dtype) -> dsf.Transform:
    """fp8 storage of the frozen components, the DiT's blocks offloaded, gradient checkpointing.

    >>> flags = ["--dataset_base_path", "d", "--model_path", "q", "--fp8_models", "dit", "--offload_blocks",
    ...          "--use_gradient_checkpointing", "--device", "cpu"]
    >>> storage_and_block_transforms(parser().parse_args(flags), torch.float32).name
    'chain(fp8(granularity=tensor, compute_dtype=float32), offload(device=cpu, level=block, vram_limit=0.0), checkpoint(offload_activations=False))'
    """
    stack = []
    fp8_models = [c for c in args.fp8_models.split(",") if c]
    if fp8_models:
        stack.append(fp8(where=rf"^({'|'.join(fp8_models)})/", compute_dtype=compute_dtype))
    if args.offload_blocks:
        stack.append(offload(device=args.device, level="block", where=r"^dit/"))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        stack.append(checkpoint(offload_activations=args.use_gradient_checkpointing_offload))
    return dsf.chain(*stack)


def chosen_paradigm(args, compute_dtype) -> Paradigm:
    """What the flags train, as one chain: the storage and block transforms, then (LoRA) the adapter."""
    stack = storage_and_block_transforms(args, compute_dtype)
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
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline; what the task never runs is built on the meta device from its checkpoint's headers,
    #    and with --offload_blocks the DiT waits on the CPU.
    devices = {name: "meta" if name in NOT_RUN[args.task] else device for name in COMPONENTS}
    devices["dit"] = "cpu" if args.offload_blocks and devices["dit"] != "meta" else devices["dit"]
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         dtype=dtype, device=devices, max_sequence_length=args.max_sequence_length)
    params = pipe.params

    # 2. The data: images and prompts, or the encoded samples of a data-processing run.
    image_size = (args.height, args.width) if args.height else None
    if args.task == "sft:train":
        dataset = CachedDataset(args.dataset_base_path, repeat=args.dataset_repeat)
    else:
        dataset = FolderDataset(args.dataset_base_path, args.dataset_metadata_path,
                                repeat=1 if args.task == "sft:data_process" else args.dataset_repeat,
                                image_size=image_size, max_pixels=None if image_size else args.max_pixels,
                                division=pipe.multiple)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        stack = storage_and_block_transforms(args, dtype)
        encode = stack(SampleEncoder(pipe))
        index = encode_into_cache(args.output_path, dataset, functools.partial(encode, stack.init(params, init_key)))
        print(f"cached {len(dataset)} encoded samples: {index}")
        return Path(args.output_path)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8, offload, checkpointing, the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(SampleEncoder(pipe))

    # 5. The loss, and the data stream (samples are encoded as they are drawn, unless they come from the cache).
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(pipe.dit)
    data = DataFromParams(lambda initialized: batch_stream(
        dataset, args.batch_size, data_key, None if encode is None else functools.partial(encode, initialized)))

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT).
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
