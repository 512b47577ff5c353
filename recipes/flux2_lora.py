"""Train a LoRA on a FLUX.2 DiT (dev or klein), or the whole DiT, from an image folder, text-to-image or editing, with
DiffSynth-Studio's training flags.

    python recipes/flux2_lora.py --model_path /path/to/FLUX.2-klein-base-4B \\
        --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 --lora_rank 32 \\
        --use_gradient_checkpointing --fp8_models dit,text --offload_models text --output_path outputs/cats

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column; for editing, --reference_columns names the columns of the reference images (e.g. ``edit_image``), which
the DiT attends as extra tokens as it does at inference. The model comes from a diffusers folder (--model_path,
--model_id), from model files recognized by their keys, whatever their names (--model_paths, a JSON list, a list
inside it being one model in shards; --model_id_with_origin_paths, model_id:pattern entries downloaded from the hub;
the tokenizer from --tokenizer or else the first repo's ``tokenizer/``), or single files (--dit: BFL
``flux2-*.safetensors``, diffusers or ComfyUI; --vae: ``ae.safetensors``; --text_encoder with --tokenizer), which
win over the others.

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
for ComfyUI; or the whole DiT in the diffusers layout), ``log.csv``, and the resumable state in ``checkpoints/`` that --resume continues from. --validation_prompts (sft and
direct_distill) adds previews every --validation_steps steps: ``validation/step-N/<index>.png``, sampled at --seed in
--height × --width (1024 × 1024 without them) with --validation_num_inference_steps, through the paradigm's chain.

Several GPUs: the same command under ``torchrun --nproc_per_node N recipes/flux2_lora.py ...``. Each process trains on
its share of the batches (N processes with --gradient_accumulation_steps a make the updates of one with N·a, and an
epoch takes 1/N of the steps); ``--shard`` also splits the DiT's weights (and, with --trainable_models dit, its
optimizer state) over the processes (the text encoder and the VAE stay whole; it does not combine with
--offload_models dit). The processes download the model files in turn; process 0 prints and writes the files;
sft:data_process encodes in process 0 alone.
"""

from __future__ import annotations

import argparse
import sys

import dsf
from dsf.cli.flag_types import positive_int
from dsf.cli.lora_recipe import (
    MODEL_FLAGS,
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
    preview_images,
    recognized_model_files,
    train_run,
    trained_file_writer,
    training_dataset,
)
from dsf.cli.training_flags import add_dataset_flags, add_training_flags
from dsf.files.hub import ModelSource
from dsf.model_parts.lora_files import LAYOUTS
from dsf.models import flux2
from dsf.models.flux2.pipeline import load_pipeline
from dsf.models.flux2.text import MAX_TOKENS
from dsf.models.flux2.training import LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.transforms import load_lora, merge_lora, save_lora

FROZEN_COMPONENTS = ("dit", "text")  # what --fp8_models and --offload_models may name
TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text"), "direct_distill": ()}  # kept on meta
COMPONENT_FLAGS = {"dit": "dit", "vae": "vae", "text": "text_encoder"}  # component: the flag of its own file


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LoRA on a FLUX.2 DiT with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image, prompt (and reference image)")
    data.add_argument("--reference_columns", default="", help="comma list of the metadata columns of reference images")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=MAX_TOKENS, help="text tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers FLUX.2 pipeline folder")
    models.add_argument("--model_id", help="a hub repo, e.g. black-forest-labs/FLUX.2-klein-base-4B")
    add_model_file_flags(models)
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's (BFL, diffusers or ComfyUI layout)")
    models.add_argument("--vae", help="a VAE file or folder instead of the pipeline's (BFL ae.safetensors or diffusers)")
    models.add_argument("--text_encoder", help="a text-encoder file or folder instead of the pipeline's")
    models.add_argument("--tokenizer", help="the tokenizer folder, with --text_encoder or --model_paths")
    add_frozen_storage_flags(models, FROZEN_COMPONENTS)
    groups = add_training_flags(p, output_path="outputs/flux2_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    add_process_flags(models, groups["training"])
    add_paradigm_flags(groups, TASKS)
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]))
    Traceback (most recent call last):
    ...
    ValueError: pass --model_path (a diffusers FLUX.2 pipeline folder), --model_id (a hub repo), --model_paths/--model_id_with_origin_paths (model files), or --dit, --vae and --text_encoder
    """
    model_files = args.model_paths or args.model_id_with_origin_paths
    if args.model_path is None and args.model_id is None and not model_files and None in (args.dit, args.vae, args.text_encoder):
        raise ValueError("pass --model_path (a diffusers FLUX.2 pipeline folder), --model_id (a hub repo), "
                         f"{MODEL_FLAGS} (model files), or --dit, --vae and --text_encoder")
    if args.model_paths and not (args.tokenizer or args.model_path or args.model_id or args.model_id_with_origin_paths):
        raise ValueError("--model_paths gives no tokenizer: pass --tokenizer (the tokenizer/ folder of the FLUX.2 repo)")
    check_training_flags(args, FROZEN_COMPONENTS)
    if args.task == "direct_distill" and (args.height or args.reference_columns):
        raise ValueError("direct_distill trains at the teacher images' own size, without reference images: "
                         "drop --height/--width and --reference_columns (teacher images within --max_pixels, sides multiples of 16)")
    check_preview_task(args, ("sft", "direct_distill"), "the VAE and the text encoder")


def component_sources(args) -> dict:
    """``{dit, vae, text_encoder, tokenizer}`` for :func:`load_pipeline`: --dit, --vae, --text_encoder and
    --tokenizer, else the model files of --model_paths/--model_id_with_origin_paths recognized by their keys
    (all three needed without --model_path/--model_id) and the first repo's ``tokenizer/``."""
    chosen = {flag: getattr(args, flag) for flag in COMPONENT_FLAGS.values()}
    tokenizer = args.tokenizer
    if args.model_paths or args.model_id_with_origin_paths:
        without_pipeline = args.model_path is None and args.model_id is None
        needed = [c for c, flag in COMPONENT_FLAGS.items() if chosen[flag] is None and without_pipeline]
        files = recognized_model_files(args, flux2.FAMILY, needed)
        chosen = {flag: chosen[flag] or files.get(c) for c, flag in COMPONENT_FLAGS.items()}
        tokenizer = tokenizer or hub_folders(args, "tokenizer/")
    return {**chosen, "tokenizer": tokenizer}


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    args = for_task(args, NOT_RUN[args.task])
    world, device, dtype = join_processes(args)  # under torchrun, or one process
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline: DiT, VAE, text encoder; what the task never runs is built on the meta device from its headers,
    #    what is offloaded is loaded on the CPU, and a DiT split by --shard too (its shards then go to each GPU).
    devices = load_devices(args, ("dit", "vae", "text"), NOT_RUN[args.task], world, device)
    pipe = load_pipeline(source, **component_sources(args), dtype=dtype, device=devices,
                         max_sequence_length=args.max_sequence_length)
    params = pipe.params
    references = [c for c in args.reference_columns.split(",") if c]
    encoder = SampleEncoder(pipe.vae, pipe.text, args.max_sequence_length, tuple(references))

    # 2. The data: images (and reference images) with their prompts, or the encoded samples of a data-processing run.
    image_size = (args.height, args.width) if args.height else None
    dataset = training_dataset(args, lambda repeat: FolderDataset(
        args.dataset_base_path, args.dataset_metadata_path, repeat=repeat, data_file_keys=["image", *references],
        image_size=image_size, max_pixels=None if image_size else args.max_pixels))

    # 3. Split training, stage 1: encode every sample once (fp8 storage, offload, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        return cache_encoded_samples(args, encoder, params, dataset, dtype, init_key)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8 storage, shards, block offload,
    #    gradient checkpointing, the LoRA on the DiT (or the whole DiT).
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(encoder)

    # 5. The loss: flow matching on FLUX.2's training schedule, or the student's samples against the teacher's.
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(pipe.dit)

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT), with
    #    previews of --validation_prompts sampled through the same chain.
    save = trained_file_writer(args, save_lora, save_safetensors)
    previews = None if args.task == "sft:train" else preview_images(pipe, args)
    return train_run(args, paradigm, loss, params, dataset, encode=encode, save=save, keys=(data_key, fit_key),
                     generate=previews, processes=world.size)


if __name__ == "__main__":
    main(sys.argv[1:])
