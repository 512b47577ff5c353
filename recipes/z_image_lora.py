"""Fine-tune Z-Image: a LoRA (or the whole DiT) on an image folder, with DiffSynth-Studio's training flags.

    python recipes/z_image_lora.py --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --model_id Tongyi-MAI/Z-Image --height 1024 --width 1024 --learning_rate 1e-4 --num_epochs 5 \\
        --lora_rank 32 --use_gradient_checkpointing --output_path outputs/cats

The metadata (csv, json or jsonl) has an ``image`` column (paths inside --dataset_base_path) and a ``prompt``
column. The model is a diffusers Z-Image pipeline folder (--model_path) or hub repo (--model_id); --dit, --vae and
--text_encoder take other files (Comfy-Org's ``z_image_turbo_bf16.safetensors``, ``ae.safetensors``,
``qwen_3_4b.safetensors``; --tokenizer then names Z-Image's tokenizer folder). Or, as DiffSynth-Studio takes them,
--model_paths (local files) and --model_id_with_origin_paths (``model_id:pattern`` entries, e.g.
``Tongyi-MAI/Z-Image:transformer/,Tongyi-MAI/Z-Image:vae/,Tongyi-MAI/Z-Image:text_encoder/``) list the files of
the DiT, the VAE and Qwen3, recognized by their keys whatever their names (all three, though the task may build one
from its headers alone); the tokenizer is --tokenizer, else the first repo's ``tokenizer/``, else the folder beside
the text encoder's; the σ schedule of sampling (direct_distill, previews) is then Turbo's.

Z-Image-Turbo is step-distilled: a plain LoRA trained on it drifts from its 8-step behaviour. Three ways keep it:
  * train on the base model (--model_id Tongyi-MAI/Z-Image) and apply the LoRA to Turbo at inference
    (``z_image_t2i.py --model_id Tongyi-MAI/Z-Image-Turbo --lora step-N.safetensors``);
  * a differential LoRA on Turbo: --preset_lora_path merges a LoRA into the base before training (DiffSynth-Studio
    uses a de-distillation training adapter there, e.g. ostris/zimage_turbo_training_adapter); the trained LoRA
    alone is applied to Turbo at inference;
  * --task direct_distill on Turbo: the student is trained through its own few-step sampler to reach the teacher's
    images, so it is the few-step sampling itself that the LoRA keeps.

What trains: a LoRA of --lora_rank on the DiT (--lora_target_modules: diffusers or Lumina2 module names;
--lora_checkpoint continues a LoRA file), or with --trainable_models dit the whole DiT. --fp8_models stores frozen
components in fp8; --offload_models keeps them on the CPU and streams their blocks in (--vram_limit GiB resident).

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, Qwen3) into a cache folder, --output_path; the DiT is not read
  sft:train           train from that cache (--dataset_base_path CACHE); the VAE and text encoder are not read
  direct_distill      the student samples with the metadata's seed, num_inference_steps and cfg_scale columns,
                      gradients through the sampler; loss: MSE to the latents of the teacher's image (at its own size)

Written under --output_path: ``step-N.safetensors`` every --save_steps steps (default: once per epoch) and at the
end (the LoRA in --lora_layout, or the whole DiT in the diffusers layout), ``log.csv``, and the resumable state in
``checkpoints/`` that --resume continues from. --validation_prompts (sft and direct_distill) adds previews every
--validation_steps steps: ``validation/step-N/<index>.png``, sampled at --seed in --height × --width (1024 × 1024
without them) with --validation_num_inference_steps, through the paradigm's chain.

Several GPUs: the same command under ``torchrun --nproc_per_node N recipes/z_image_lora.py ...``. Each process
trains on its share of the batches (N processes with --gradient_accumulation_steps a make the updates of one with
N·a); ``--shard`` also splits the DiT's weights (and, with --trainable_models dit, its optimizer state) over the
processes. The processes download the model files in turn; process 0 prints and writes the files; sft:data_process
encodes in process 0 alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    fetch_in_turn,
    for_task,
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
from dsf.files.hub import ModelSource, resolve
from dsf.files.model_files import describe
from dsf.model_parts.lora_files import LAYOUTS
from dsf.models import z_image
from dsf.models.z_image.pipeline import load_pipeline
from dsf.models.z_image.training import LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import check_native_resolution
from dsf.transforms import load_lora, merge_lora, save_lora

TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill")
COMPONENTS = ("dit", "vae", "text_encoder")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "text_encoder"),  # components kept on meta
           "direct_distill": ()}


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
    add_model_file_flags(models)
    models.add_argument("--tokenizer", "--tokenizer_paths", dest="tokenizer",
                        help="Z-Image's tokenizer folder (with a single-file text encoder)")
    add_frozen_storage_flags(models, COMPONENTS)
    groups = add_training_flags(p, output_path="outputs/z_image_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    add_process_flags(models, groups["training"])
    add_paradigm_flags(groups, TASKS)
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]))
    Traceback (most recent call last):
    ...
    ValueError: pass --model_path (a diffusers Z-Image pipeline folder), --model_id (a hub repo), all of --dit, --vae and --text_encoder, or --model_paths/--model_id_with_origin_paths
    """
    by_pipeline = [flag for flag in ("model_path", "model_id", "dit", "vae", "text_encoder") if getattr(args, flag)]
    by_files = args.model_paths or args.model_id_with_origin_paths
    if by_files and by_pipeline:
        raise ValueError(f"{MODEL_FLAGS} list every model file; drop --{', --'.join(by_pipeline)} or pass those alone")
    if not by_files and args.model_path is None and args.model_id is None and None in (args.dit, args.vae, args.text_encoder):
        raise ValueError("pass --model_path (a diffusers Z-Image pipeline folder), --model_id (a hub repo), all of "
                         f"--dit, --vae and --text_encoder, or {MODEL_FLAGS}")
    check_training_flags(args, COMPONENTS)
    check_preview_task(args, ("sft", "direct_distill"), "the VAE and Qwen3")


def pipeline_sources(args) -> dict:
    """``load_pipeline``'s sources: the pipeline folder (--model_id downloaded in turn) with --dit, --vae,
    --text_encoder and --tokenizer over it, or the files of --model_paths/--model_id_with_origin_paths recognized
    by their keys.

    >>> from argparse import Namespace
    >>> pipeline_sources(Namespace(model_paths=None, model_id_with_origin_paths=None, model_id=None, model_path="z",
    ...                            dit="d.safetensors", vae=None, text_encoder=None, tokenizer=None))
    {'source': 'z', 'dit': 'd.safetensors', 'vae': None, 'text_encoder': None, 'tokenizer': None}
    """
    if args.model_paths or args.model_id_with_origin_paths:
        files = recognized_model_files(args, z_image.FAMILY, COMPONENTS)
        tokenizer = args.tokenizer or hub_folders(args, "tokenizer/") or tokenizer_beside(files["text_encoder"])
        if tokenizer is None:
            raise ValueError(f"no Z-Image tokenizer: the text encoder {describe(files['text_encoder'])} has no "
                             "tokenizer/ folder beside it; pass --tokenizer (a folder holding Z-Image's tokenizer files)")
        return {"source": None, **{name: files[name] for name in COMPONENTS}, "tokenizer": tokenizer}
    source = args.model_path
    if args.model_id:
        source = fetch_in_turn(lambda: resolve(ModelSource(model_id=args.model_id)))
    return {"source": source, "dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder,
            "tokenizer": args.tokenizer}


def tokenizer_beside(text_encoder) -> Path | None:
    """The ``tokenizer/`` folder beside a diffusers pipeline's ``text_encoder/`` folder (given as the folder or
    its files), or ``None``.

    >>> tokenizer_beside("/models/qwen_3_4b.safetensors") is None
    True
    """
    first = Path(text_encoder if isinstance(text_encoder, (str, os.PathLike)) else text_encoder[0])
    folder = first if first.is_dir() else first.parent
    beside = folder.parent / "tokenizer"
    return beside if folder.name == "text_encoder" and beside.is_dir() else None


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    args = for_task(args, NOT_RUN[args.task])
    world, device, dtype = join_processes(args)  # under torchrun, or one process
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline: the DiT, the VAE and Qwen3; what the task never runs is built on meta from its headers, what
    #    --offload_models streams and the DiT that --shard splits on the CPU.
    devices = load_devices(args, COMPONENTS, NOT_RUN[args.task], world, device)
    pipe = load_pipeline(**pipeline_sources(args), dtype=dtype, device=devices, max_sequence_length=args.max_sequence_length)
    params = pipe.params

    # 2. The data: images and prompts (at the teacher images' own size for direct_distill), or the encoded samples.
    dataset = training_dataset(args, image_folder(args))
    if args.task == "direct_distill":
        image_size = (args.height, args.width) if args.height else None
        check_native_resolution([paths["image"] for paths in dataset.data_file_paths], image_size, args.max_pixels,
                                division=pipe.multiple)
    sample_encoder = SampleEncoder(pipe.vae, pipe.text_encoder, args.max_sequence_length)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        return cache_encoded_samples(args, sample_encoder, params, dataset, dtype, init_key)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first (differential LoRA), then fp8, shards,
    #    offload, checkpointing, the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(sample_encoder)

    # 5. The loss: flow matching, or the student's few-step samples against the teacher's images.
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(pipe.dit)

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT), with
    #    previews of --validation_prompts sampled through the same chain.
    save = trained_file_writer(args, save_lora, save_safetensors)
    previews = None if args.task == "sft:train" else preview_images(pipe, args)
    return train_run(args, paradigm, loss, params, dataset, encode=encode, save=save, keys=(data_key, fit_key),
                     generate=previews, processes=world.size)


if __name__ == "__main__":
    main(sys.argv[1:])
