"""Fine-tune FLUX.1: a LoRA (or the whole DiT) on an image folder, with DiffSynth-Studio's training flags.

    python recipes/flux_lora.py --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,\\
    black-forest-labs/FLUX.1-dev:ae.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,\\
    black-forest-labs/FLUX.1-dev:text_encoder_2/*.safetensors" \\
        --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 --lora_rank 32 \\
        --use_gradient_checkpointing --output_path outputs/cats

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a
``prompt`` column. Model files are recognized by their keys, whatever their names: the DiT (BFL,
diffusers or ComfyUI layout), the VAE (BFL/LDM or diffusers), the CLIP and T5 text encoders. A list
inside --model_paths is one model in shards. Tokenizers come from --tokenizer_paths (folders,
recognized by their files) or else from the first repo of --model_id_with_origin_paths
(FLUX.1-dev's when there is none).

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: BFL or diffusers module
names; --lora_checkpoint continues a LoRA file, whose targets and rank then apply), or with
--trainable_models dit the whole DiT (full fine-tuning). --preset_lora_path merges a LoRA into the
base first (differential LoRA). --fp8_models stores frozen components in fp8; --offload_models keeps them on the
CPU and streams their blocks in (--vram_limit GiB resident).

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, T5, CLIP) into a cache folder, --output_path; needs no DiT
  sft:train           train from that cache (--dataset_base_path CACHE) without the VAE and text encoders
  direct_distill      the student samples with the metadata's seed, num_inference_steps and cfg_scale,
                      gradients through the sampler; loss: MSE to the latents of the teacher's image

Written under --output_path: ``step-N.safetensors`` every --save_steps steps (default: once per
epoch) and at the end (the LoRA in --lora_layout, or the whole DiT in the diffusers layout),
``log.csv``, and the resumable state in ``checkpoints/`` (every --checkpoint_steps, default
--save_steps) that --resume continues from. --validation_prompts (sft and direct_distill) adds
previews every --validation_steps steps: ``validation/step-N/<index>.png``, sampled at --seed in
--height × --width (1024 × 1024 without them) with --validation_num_inference_steps, through the
paradigm's chain.

Several GPUs: the same command under ``torchrun --nproc_per_node N recipes/flux_lora.py ...``.
Each process trains on its share of the batches (N processes with --gradient_accumulation_steps a
make the updates of one with N·a, and an epoch takes 1/N of the steps); ``--shard`` also splits the
DiT's weights (and, with --trainable_models dit, its optimizer state) over the processes (the text
encoders and the VAE stay whole). The processes download the model files in turn (never two into
one folder at once); process 0 prints and writes the files; sft:data_process encodes in process 0 alone.
"""

from __future__ import annotations

import argparse
import sys


import dsf
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import check_native_resolution
from dsf.models import flux
from dsf.models.flux import load_clip, load_dit, load_t5, load_vae
from dsf.models.flux.pipeline import FluxPipeline
from dsf.models.flux.training import (
    LORA_TARGETS,
    SampleEncoder,
    direct_distill_loss,
    recognize_tokenizers,
    sft_loss,
)
from dsf.cli.lora_recipe import (
    add_frozen_storage_flags,
    add_paradigm_flags,
    add_model_file_flags,
    add_process_flags,
    cache_encoded_samples,
    check_preview_task,
    check_training_flags,
    chosen_paradigm,
    hub_folders,
    image_folder,
    join_processes,
    load_devices,
    preview_images,
    recognized_model_files,
    train_run,
    trained_file_writer,
    training_dataset,
)
from dsf.cli.training_flags import add_dataset_flags, add_training_flags
from dsf.transforms import load_lora, merge_lora, save_lora
from dsf.model_parts.lora_files import LAYOUTS
from dsf.cli.flag_types import positive_int

TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
NEEDED = {  # the components each task loads
    "sft": ("dit", "vae", "clip", "t5"),
    "sft:data_process": ("vae", "clip", "t5"),
    "sft:train": ("dit",),
    "direct_distill": ("dit", "vae", "clip", "t5"),
}
FP8_COMPONENTS = ("dit", "t5", "clip")
DEFAULT_TOKENIZER_REPO = "black-forest-labs/FLUX.1-dev"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune FLUX.1 (LoRA or full) with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image and prompt")
    data.add_argument("--data_file_keys", default="image", help="comma list of the metadata columns holding file paths")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="T5 tokens per prompt")
    models = p.add_argument_group("models")
    add_model_file_flags(models)
    models.add_argument("--tokenizer_paths", help="comma list of the CLIP and T5 tokenizer folders (any order)")
    add_frozen_storage_flags(models, FP8_COMPONENTS)
    groups = add_training_flags(p, output_path="outputs/flux_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    add_process_flags(models, groups["training"])
    add_paradigm_flags(groups, TASKS)
    return p


def check_flags(args) -> None:
    check_training_flags(args, FP8_COMPONENTS)
    check_preview_task(args, ("sft", "direct_distill"), "the VAE and the text encoders", lacking="does not train with")


def tokenizer_folders(args) -> list:
    if args.tokenizer_paths:
        return args.tokenizer_paths.split(",")
    return hub_folders(args, ["tokenizer/", "tokenizer_2/"], DEFAULT_TOKENIZER_REPO)


def load_components(files: dict, needed, args, dtype, devices: dict) -> tuple[dict, dict]:
    """``(models, params)`` of the components the task needs, each on its device of ``devices``."""
    models, params = {}, {}
    if "dit" in needed:
        models["dit"], params["dit"] = load_dit(files["dit"], dtype=dtype, device=devices["dit"])
    if "vae" in needed:
        models["vae"], params["vae"] = load_vae(files["vae"], dtype=dtype, device=devices["vae"])
    if "clip" in needed:
        tokenizers = recognize_tokenizers(tokenizer_folders(args))
        models["clip"] = load_clip(files["clip"], tokenizers["clip"], dtype=dtype, device=devices["clip"])
        models["t5"] = load_t5(files["t5"], tokenizers["t5"], dtype=dtype, device=devices["t5"],
                               max_length=args.max_sequence_length)
        params["clip"], params["t5"] = models["clip"].params, models["t5"].params
    return models, params


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    world, device, dtype = join_processes(args)  # under torchrun, or one process
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The model files, recognized by their keys; only the components the task needs are loaded.
    needed = NEEDED[args.task]
    files = recognized_model_files(args, flux.FAMILY, needed)
    devices = load_devices(args, NEEDED["sft"], (), world, device)
    models, params = load_components(files, needed, args, dtype, devices)

    # 2. The data: images and prompts, or the encoded samples of a data-processing run.
    dataset = training_dataset(args, image_folder(args))
    if args.task == "direct_distill":
        image_size = (args.height, args.width) if args.height else None
        check_native_resolution([paths["image"] for paths in dataset.data_file_paths], image_size, args.max_pixels)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        encoder = SampleEncoder(models["vae"], models["clip"], models["t5"], args.max_sequence_length)
        return cache_encoded_samples(args, encoder, params, dataset, dtype, init_key)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8, shards, offload, checkpointing,
    #    the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(
        SampleEncoder(models["vae"], models["clip"], models["t5"], args.max_sequence_length)
    )

    # 5. The loss (samples are encoded as they are drawn by the initialized encoders, unless they come from the cache).
    pipe = None if args.task == "sft:train" else FluxPipeline(
        models["dit"], params["dit"], models["vae"], params["vae"], models["clip"], models["t5"],
        max_sequence_length=args.max_sequence_length)
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(models["dit"])

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT), with
    #    previews of --validation_prompts sampled through the same chain.
    save = trained_file_writer(args, save_lora, save_safetensors)
    return train_run(args, paradigm, loss, params, dataset, encode=encode, save=save, keys=(data_key, fit_key),
                     generate=None if pipe is None else preview_images(pipe, args), processes=world.size)


if __name__ == "__main__":
    main(sys.argv[1:])
