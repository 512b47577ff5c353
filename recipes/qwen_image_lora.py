"""Fine-tune Qwen-Image: a LoRA (or the whole DiT) on an image folder, with DiffSynth-Studio's training flags.

    python recipes/qwen_image_lora.py --dataset_base_path data/dogs --dataset_metadata_path data/dogs/metadata.csv \\
        --model_path /path/to/Qwen-Image --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 \\
        --lora_rank 32 --fp8_models dit,text_encoder --use_gradient_checkpointing --output_path outputs/dogs

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column; with ``--extra_inputs edit_image`` (an Edit-2509/2511 model, its ``processor/`` beside) also an
``edit_image`` column, one path or a list of paths (a JSON list in a csv cell): the condition images of each sample
(``--batch_size 1``); split training encodes them into the cache (sft:data_process with --extra_inputs), and
sft:train reads them from there. The model is a diffusers Qwen-Image pipeline folder (--model_path) or hub repo
(--model_id, e.g. Qwen/Qwen-Image); --dit, --vae and --text_encoder take other files (ComfyUI's single files) instead
of the folder's.
Model files may also come from --model_paths (a JSON list of files; a list inside it is one model in shards) and
--model_id_with_origin_paths (model_id:pattern entries): each is recognized by its keys, whatever its name, as the
DiT (diffusers layout, with or without ComfyUI's prefix), the VAE or the Qwen2.5-VL text encoder; the tokenizer then
comes from --tokenizer, or from the first repo of --model_id_with_origin_paths.

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: DiffSynth-Studio's Qwen-Image targets by
default; --lora_checkpoint continues a LoRA file), or with --trainable_models dit the whole DiT (full fine-tuning).
--preset_lora_path merges a LoRA into the base first (differential LoRA). --fp8_models stores frozen components in
fp8; --offload_models keeps them on the CPU and streams their blocks (DiT blocks, Qwen2.5-VL layers) in one at a time,
--vram_limit GiB of them resident.

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
--validation_prompts (sft and direct_distill) adds previews every --validation_steps steps:
``validation/step-N/<index>.png``, sampled at --seed in --height × --width (1024 × 1024 without them) with
--validation_num_inference_steps, through the paradigm's chain.

Several GPUs: the same command under ``torchrun --nproc_per_node N recipes/qwen_image_lora.py ...``. Each process
trains on its share of the batches (N processes with --gradient_accumulation_steps a make the updates of one with
N·a); ``--shard`` also splits the DiT's weights (and, with --trainable_models dit, its optimizer state) over the
processes (the VAE and text encoder stay whole). The processes download the model files in turn; process 0 prints
and writes the files; sft:data_process encodes in process 0 alone.
"""

from __future__ import annotations

import argparse
import sys

import dsf
from dsf.cli.flag_types import positive_int
from dsf.cli.lora_recipe import (
    add_frozen_storage_flags,
    add_paradigm_flags,
    add_model_file_flags,
    add_process_flags,
    cache_encoded_samples,
    check_preview_task,
    check_training_flags,
    chosen_paradigm,
    for_task,
    hub_folders,
    join_processes,
    load_devices,
    model_ids,
    preview_images,
    recognized_model_files,
    train_run,
    trained_file_writer,
    training_dataset,
)
from dsf.cli.training_flags import add_dataset_flags, add_training_flags
from dsf.files.hub import ModelSource
from dsf.model_parts.lora_files import LAYOUTS
from dsf.models import qwen_image
from dsf.models.qwen_image.edit import load_edit_pipeline
from dsf.models.qwen_image.pipeline import load_pipeline
from dsf.models.qwen_image.training import LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.transforms import load_lora, merge_lora, save_lora

TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
COMPONENTS = ("dit", "vae", "text_encoder")
FROZEN_COMPONENTS = ("dit", "text_encoder")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text_encoder"), "direct_distill": ()}  # kept on meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune Qwen-Image (LoRA or full) with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image and prompt")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="Qwen2.5-VL tokens per prompt")
    data.add_argument("--extra_inputs", choices=("edit_image",), help="edit_image: train an Edit model on condition images")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers Qwen-Image pipeline folder")
    models.add_argument("--model_id", help="a hub repo, e.g. Qwen/Qwen-Image")
    add_model_file_flags(models)
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's")
    models.add_argument("--vae", help="a VAE file or folder instead of the pipeline's")
    models.add_argument("--text_encoder", help="a Qwen2.5-VL file or folder instead of the pipeline's")
    models.add_argument("--tokenizer", help="the tokenizer folder, with --text_encoder outside a pipeline folder")
    add_frozen_storage_flags(models, FROZEN_COMPONENTS)
    groups = add_training_flags(p, output_path="outputs/qwen_image_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    add_process_flags(models, groups["training"])
    add_paradigm_flags(groups, TASKS)
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv", "--model_path", "q",
    ...                                  "--fp8_models", "vae"]))
    Traceback (most recent call last):
    ...
    ValueError: --fp8_models takes components of ('dit', 'text_encoder'), got ['vae']
    """
    if not (args.model_path or args.model_id or args.model_paths or args.model_id_with_origin_paths
            or (args.dit and args.vae and args.text_encoder)):
        raise ValueError("pass --model_path (a diffusers Qwen-Image folder), --model_id (a hub repo), --model_paths or "
                         "--model_id_with_origin_paths (model files), or --dit, --vae and --text_encoder")
    check_training_flags(args, FROZEN_COMPONENTS)
    check_preview_task(args, ("sft", "direct_distill"), "the VAE and the text encoder", lacking="does not train with")
    if args.extra_inputs and args.task not in ("sft", "sft:data_process"):
        raise ValueError(f"--extra_inputs edit_image reads condition images, which --task {args.task} does not: use "
                         "--task sft, or sft:data_process (then sft:train reads the encoded condition images from the cache "
                         "without it)")
    if args.trainable_models and "dit" in args.fp8_models:
        raise ValueError("--trainable_models dit trains the whole DiT, which --fp8_models dit stores frozen: drop dit from "
                         "--fp8_models")


def component_sources(args) -> dict:
    """``{component: source}`` given by --dit/--vae/--text_encoder, else by the model files of --model_paths and
    --model_id_with_origin_paths (recognized by their keys); what neither gives comes from --model_path/--model_id,
    and without those every component must be given."""
    given = {name: getattr(args, name) for name in COMPONENTS if getattr(args, name)}
    if not (args.model_paths or args.model_id_with_origin_paths):
        return given
    missing = [] if args.model_path or args.model_id else [name for name in COMPONENTS if name not in given]
    return recognized_model_files(args, qwen_image.FAMILY, missing) | given


def tokenizer_folder(args):
    """--tokenizer, or the tokenizer of the first repo of --model_id_with_origin_paths when no pipeline is given."""
    if args.tokenizer or args.model_path or args.model_id or not model_ids(args):
        return args.tokenizer
    return hub_folders(args, "tokenizer/")


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    args = for_task(args, NOT_RUN[args.task])
    world, device, dtype = join_processes(args)  # under torchrun, or one process
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline; what the task never runs is built on the meta device from its checkpoint's headers; what is
    #    offloaded waits on the CPU, and a DiT split by --shard too (its shards then go to each GPU).
    devices = load_devices(args, COMPONENTS, NOT_RUN[args.task], world, device)
    load = load_edit_pipeline if args.extra_inputs else load_pipeline
    pipe = load(source, **component_sources(args), tokenizer=tokenizer_folder(args), dtype=dtype, device=devices,
                max_sequence_length=args.max_sequence_length)
    params = pipe.params

    # 2. The data: images and prompts (sizes a multiple of the DiT's), or the encoded samples of a data-processing run.
    image_size = (args.height, args.width) if args.height else None
    dataset = training_dataset(args, lambda repeat: FolderDataset(
        args.dataset_base_path, args.dataset_metadata_path, repeat=repeat, image_size=image_size,
        max_pixels=None if image_size else args.max_pixels, division=pipe.multiple))

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        return cache_encoded_samples(args, SampleEncoder(pipe, args.dataset_base_path), params, dataset, dtype, init_key)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8, shards, offload, checkpointing,
    #    the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(SampleEncoder(pipe, args.dataset_base_path))

    # 5. The loss (samples are encoded as they are drawn by the initialized encoders, unless they come from the cache).
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(pipe.dit)

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT), with previews of
    #    --validation_prompts sampled through the same chain.
    generate = None if args.task == "sft:train" else preview_images(pipe, args)
    return train_run(args, paradigm, loss, params, dataset, encode=encode, keys=(data_key, fit_key), generate=generate,
                     save=trained_file_writer(args, save_lora, save_safetensors), processes=world.size)


if __name__ == "__main__":
    main(sys.argv[1:])
