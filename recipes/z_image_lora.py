"""Fine-tune Z-Image: a LoRA (or the whole DiT) on an image folder, with DiffSynth-Studio's training flags.

    python recipes/z_image_lora.py --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --model_id Tongyi-MAI/Z-Image --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 \\
        --lora_rank 32 --use_gradient_checkpointing --output_path outputs/cats

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column. The model is a diffusers Z-Image pipeline folder (--model_path) or hub repo (--model_id); --dit, --vae and
--text_encoder take other files (Comfy-Org's ``z_image_turbo_bf16.safetensors``, ``ae.safetensors``,
``qwen_3_4b.safetensors``; --tokenizer then names Z-Image's tokenizer folder).

Z-Image-Turbo is step-distilled: a plain LoRA trained on it drifts from its 8-step behaviour. Two ways keep it:
  * train on the base model (--model_id Tongyi-MAI/Z-Image) and apply the LoRA to Turbo at inference
    (``z_image_t2i.py --model_id Tongyi-MAI/Z-Image-Turbo --lora step-N.safetensors``);
  * a differential LoRA on Turbo: --preset_lora_path merges a LoRA into the base before training (DiffSynth-Studio
    uses a de-distillation training adapter there, e.g. ostris/zimage_turbo_training_adapter); the trained LoRA
    alone is applied to Turbo at inference.

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: diffusers or Lumina2 module names;
--lora_checkpoint continues a LoRA file), or with --trainable_models dit the whole DiT. --fp8_models stores frozen
components in fp8.

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, Qwen3) into a cache folder, --output_path; the DiT is not read
  sft:train           train from that cache (--dataset_base_path CACHE); the VAE and text encoder are not read

Written under --output_path: ``step-N.safetensors`` every --save_steps steps (default: once per epoch) and at the
end (the LoRA in --lora_layout, or the whole DiT in the diffusers layout), ``log.csv``, and the resumable state in
``checkpoints/`` that --resume continues from.
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
from dsf.models.z_image.pipeline import load_pipeline
from dsf.models.z_image.training import LORA_TARGETS, SampleEncoder, sft_loss
from dsf.training.cache import CachedDataset, encode_into_cache
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.transforms import checkpoint, fp8, load_lora, lora_trainable, merge_lora, save_lora
from dsf.transforms.lora import TRAINED
from dsf.weight import dense_tree

TASKS = ("sft", "sft:data_process", "sft:train")
COMPONENTS = ("dit", "vae", "text_encoder")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text_encoder")}  # components kept on meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune Z-Image (LoRA or full) with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image and prompt")
    data.add_argument("--data_file_keys", default="image", help="comma list of the metadata columns holding file paths")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="Qwen3 tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers Z-Image pipeline folder")
    models.add_argument("--model_id", help="a hub repo: Tongyi-MAI/Z-Image (base) or Tongyi-MAI/Z-Image-Turbo")
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's (diffusers or Lumina2/ComfyUI layout)")
    models.add_argument("--vae", help="a VAE file or folder instead of the pipeline's")
    models.add_argument("--text_encoder", help="a Qwen3 file or folder instead of the pipeline's (qwen_3_4b.safetensors)")
    models.add_argument("--tokenizer", help="Z-Image's tokenizer folder (with a single-file --text_encoder)")
    models.add_argument("--fp8_models", default="", help=f"comma list of frozen components stored in fp8: {COMPONENTS}")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    groups = add_training_flags(p, output_path="outputs/z_image_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    groups["training"].add_argument("--task", default="sft", choices=TASKS)
    groups["training"].add_argument("--trainable_models", choices=("dit",), help="dit: full fine-tuning of the DiT")
    groups["LoRA"].add_argument("--preset_lora_path", help="a LoRA merged into the base before training (differential LoRA)")
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]))
    Traceback (most recent call last):
    ...
    ValueError: pass --model_path (a diffusers Z-Image pipeline folder), --model_id (a hub repo) or all of --dit, --vae and --text_encoder
    """
    if args.model_path is None and args.model_id is None and None in (args.dit, args.vae, args.text_encoder):
        raise ValueError("pass --model_path (a diffusers Z-Image pipeline folder), --model_id (a hub repo) or all of "
                         "--dit, --vae and --text_encoder")
    if args.task != "sft:train" and args.dataset_metadata_path is None:
        raise ValueError(f"--task {args.task} reads a dataset folder: pass --dataset_metadata_path")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"pass both --height and --width or neither (got {args.height}, {args.width})")
    unknown = [c for c in args.fp8_models.split(",") if c and c not in COMPONENTS]
    if unknown:
        raise ValueError(f"--fp8_models takes components of {COMPONENTS}, got {unknown}")
    if args.trainable_models and args.lora_checkpoint:
        raise ValueError("--lora_checkpoint continues a LoRA, but --trainable_models dit trains the whole DiT; drop one")


def storage_and_block_transforms(args, compute_dtype) -> dsf.Transform:
    """fp8 storage of the frozen components, gradient checkpointing.

    >>> flags = ["--dataset_base_path", "d", "--fp8_models", "text_encoder", "--use_gradient_checkpointing"]
    >>> storage_and_block_transforms(parser().parse_args(flags), torch.float32).name
    'chain(fp8(granularity=tensor, compute_dtype=float32), checkpoint(offload_activations=False))'
    """
    stack = []
    fp8_models = [c for c in args.fp8_models.split(",") if c]
    if fp8_models:
        stack.append(fp8(where=rf"^({'|'.join(fp8_models)})/", compute_dtype=compute_dtype))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        stack.append(checkpoint(offload_activations=args.use_gradient_checkpointing_offload))
    return dsf.chain(*stack)


def chosen_paradigm(args, compute_dtype) -> Paradigm:
    """What the flags train, as one chain: the storage and block transforms, then (LoRA) the adapter.

    >>> chosen_paradigm(parser().parse_args(["--dataset_base_path", "d", "--lora_rank", "4"]), torch.float32).transforms.name
    "chain(lora(rank=4, alpha=None, name='lora'))"
    """
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

    # 1. The pipeline: the DiT, the VAE and Qwen3; what the task never runs is built on meta from its headers.
    devices = {name: "meta" if name in NOT_RUN[args.task] else device for name in COMPONENTS}
    pipe = load_pipeline(source, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         dtype=dtype, device=devices, max_sequence_length=args.max_sequence_length)
    params = pipe.params

    # 2. The data: images and prompts, or the encoded samples of a data-processing run.
    image_size = (args.height, args.width) if args.height else None
    if args.task == "sft:train":
        dataset = CachedDataset(args.dataset_base_path, repeat=args.dataset_repeat)
    else:
        dataset = FolderDataset(
            args.dataset_base_path, args.dataset_metadata_path,
            repeat=1 if args.task == "sft:data_process" else args.dataset_repeat,
            data_file_keys=args.data_file_keys.split(","), image_size=image_size,
            max_pixels=None if image_size else args.max_pixels,
        )
    sample_encoder = SampleEncoder(pipe.vae, pipe.text_encoder, args.max_sequence_length)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        stack = storage_and_block_transforms(args, dtype)
        index = encode_into_cache(args.output_path, dataset, functools.partial(stack(sample_encoder), stack.init(params, init_key)))
        print(f"cached {len(dataset)} encoded samples: {index}")
        return Path(args.output_path)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first (differential LoRA), then fp8,
    #    checkpointing, the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(sample_encoder)

    # 5. The loss, and the data stream (samples encoded as they are drawn, unless they come from the cache).
    loss = sft_loss(pipe.dit)
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
