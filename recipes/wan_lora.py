"""Train a LoRA on a Wan DiT from a folder of videos and images, with DiffSynth-Studio's training flags.

    python recipes/wan_lora.py --dataset_base_path data/cats --dataset_metadata_path data/cats/metadata.csv \\
        --model_path /path/to/Wan2.1-T2V-1.3B-Diffusers --height 480 --width 832 --num_frames 81 \\
        --learning_rate 1e-4 --num_epochs 5 --lora_rank 32 --use_gradient_checkpointing --output_path outputs/cats

The metadata (csv, json or jsonl) has a ``prompt`` column and, per row, a ``video`` or an ``image``
column (paths inside --dataset_base_path). Videos give their first --num_frames frames (fewer when
shorter: the most of the form 1 + 4k), images one frame; every frame is resized to cover
--height × --width and center-cropped. Rows of different lengths batch only with --batch_size 1.

The model is a diffusers Wan pipeline folder (--model_path) or hub repo (--model_id); --dit takes
other DiT files. For an image-to-video model the first frame of each video is the conditioning
image; Wan2.2-TI2V-5B sees that frame's latents clean, at σ 0, and is scored on the other frames
(--without_first_frame trains it as text-to-video). --fp8_models stores frozen components in fp8; --offload_models
keeps them on the CPU and streams their blocks in (--vram_limit GiB resident: a 14B DiT trains on a GPU smaller than
its weights). A Wan2.2 A14B model trains one expert at a
time: --expert high_noise (or low_noise) loads that expert alone and draws σ only from its range
of the training grid (derived from the folder's boundary_ratio, or set by
--min_timestep_boundary/--max_timestep_boundary).

--task:
  sft                 train on the dataset (default)
  sft:data_process    encode every sample once (VAE, umT5, CLIP) into a cache folder, --output_path;
                      the DiT is built from its checkpoint's headers alone, never read
  sft:train           train from that cache (--dataset_base_path CACHE); the VAE and the text and
                      image encoders are built from their headers alone, never read

Written under --output_path: ``step-N.safetensors`` (the LoRA in --lora_layout) every --save_steps
steps (default: once per epoch) and at the end, ``log.csv``, and the resumable state in
``checkpoints/`` (every --checkpoint_steps, default --save_steps) that --resume continues from.
--validation_prompts (--task sft, text-to-video and TI2V models) adds previews every
--validation_steps steps: a one-frame video of each prompt at --seed in --height × --width,
``validation/step-N/<index>.png``, sampled through the paradigm's chain (one expert of an A14B
model samples every σ alone).
"""

from __future__ import annotations

import argparse
import sys

import torch

import dsf
from dsf.files.hub import ModelSource, local_source
from dsf.models.wan.pipeline import EXPERTS, holds_two_experts, load_pipeline
from dsf.models.wan.training import LORA_TARGETS, SampleEncoder, VideoDataset, expert_timestep_boundaries, sft_loss
from dsf.cli.lora_recipe import (
    add_frozen_storage_flags,
    cache_encoded_samples,
    check_preview_task,
    check_training_flags,
    chosen_paradigm,
    compute_dtype,
    for_task,
    load_devices,
    train_run,
    trained_file_writer,
    training_dataset,
)
from dsf.cli.training_flags import add_dataset_flags, add_training_flags
from dsf.training import distributed
from dsf.transforms import save_lora
from dsf.cli.flag_types import finite_float, positive_int

FP8_COMPONENTS = ("dit", "t5", "clip")
LORA_LAYOUTS = ("diffusers", "dsf")
TASKS = ("sft", "sft:data_process", "sft:train")
NOT_RUN = {"sft": (), "sft:data_process": ("dit",), "sft:train": ("vae", "t5", "clip")}  # components kept on meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LoRA on a Wan DiT with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "video or image, and prompt", height=480, width=832)
    data.add_argument("--num_frames", type=positive_int, default=81, help="frames per video, 1 + 4k")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="umT5 tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_path", help="a diffusers Wan pipeline folder")
    models.add_argument("--model_id", help="a hub repo, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    models.add_argument("--dit", help="a DiT file or folder instead of the pipeline's")
    models.add_argument("--expert", choices=EXPERTS, help="the expert of a Wan2.2 A14B model to train")
    models.add_argument("--without_first_frame", action="store_true",
                        help="Wan2.2-TI2V-5B: train as text-to-video, without the clean first frame")
    add_frozen_storage_flags(models, FP8_COMPONENTS)
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    groups = add_training_flags(p, output_path="outputs/wan_lora", lora_targets=LORA_TARGETS, lora_layouts=LORA_LAYOUTS)
    training = groups["training"]
    training.add_argument("--task", default="sft", choices=TASKS)
    training.add_argument("--min_timestep_boundary", type=finite_float, help="fraction of the training grid (0: σ = 1)")
    training.add_argument("--max_timestep_boundary", type=finite_float, help="fraction of the training grid (1: σ = 0)")
    return p


def check_flags(args) -> None:
    """Refuse flags that cannot work together, naming the fix.

    >>> check_flags(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]))
    Traceback (most recent call last):
    ...
    ValueError: pass --model_path (a diffusers Wan pipeline folder) or --model_id (a hub repo)
    """
    if args.model_path is None and args.model_id is None:
        raise ValueError("pass --model_path (a diffusers Wan pipeline folder) or --model_id (a hub repo)")
    check_training_flags(args, FP8_COMPONENTS)
    check_preview_task(args, ("sft",), "the VAE and umT5")


def preview_frames(pipe, args):
    """``generate(params, prompts)``: the frame of a one-frame video of each prompt at --seed (video i from the
    noise ``fold_in(key(seed), i)``, the same at every preview) in --height × --width."""
    pipe.check_request(1, args.height, args.width, None)

    def generate(params, prompts):
        videos = pipe.generate(params, prompts, seed=args.seed, num_frames=1, height=args.height, width=args.width,
                               num_inference_steps=args.validation_num_inference_steps, progress=False)
        return [frames[0] for frames in videos]

    return generate


def check_expert(args, dit_source) -> None:
    """Refuse to train both experts of an A14B model at once.

    >>> check_expert(parser().parse_args(["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv"]), "/nonexistent")
    """
    if holds_two_experts(dit_source) and args.expert is None:
        raise ValueError(
            f"{dit_source} is a Wan2.2 A14B model with two experts: train one at a time with --expert high_noise "
            "(σ above the boundary) or --expert low_noise"
        )


def timestep_boundaries(args, dit_source, config) -> dict[str, float]:
    """The expert's range of the training grid, overridden by --min/--max_timestep_boundary.

    >>> from dsf.models.wan.config import WanConfig
    >>> flags = ["--dataset_base_path", "d", "--dataset_metadata_path", "m.csv", "--expert", "low_noise"]
    >>> timestep_boundaries(parser().parse_args(flags + ["--max_timestep_boundary", "0.9"]), "/nonexistent", WanConfig())
    {'min_timestep_boundary': 0.417, 'max_timestep_boundary': 0.9}
    """
    chosen = {"min_timestep_boundary": 0.0, "max_timestep_boundary": 1.0}
    if args.expert:
        chosen = expert_timestep_boundaries(dit_source, args.expert, config)
    given = {"min_timestep_boundary": args.min_timestep_boundary, "max_timestep_boundary": args.max_timestep_boundary}
    return chosen | {name: value for name, value in given.items() if value is not None}


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    args = for_task(args, NOT_RUN[args.task])
    source = args.model_path or (ModelSource(model_id=args.model_id) if args.model_id else None)
    device = torch.device(args.device)
    dtype = compute_dtype(args, device)
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The pipeline: the DiT (one expert of an A14B model), the VAE, umT5 and (Wan2.1 I2V) CLIP;
    #    what the task never runs is built on the meta device from its checkpoint's headers.
    dit_source = local_source(args.dit or source)
    if args.task != "sft:data_process":
        check_expert(args, dit_source)
    devices = load_devices(args, ("dit", "vae", "t5", "clip"), NOT_RUN[args.task], distributed.world(), device)
    pipe = load_pipeline(source, dit=args.dit, expert=args.expert, dtype=dtype, device=devices,
                         max_sequence_length=args.max_sequence_length)
    params = pipe.params
    boundaries = timestep_boundaries(args, dit_source, pipe.dit_config)

    # 2. The data: videos and images with their prompts (frames resized and cropped), or the cache.
    dataset = training_dataset(args, lambda repeat: VideoDataset(
        args.dataset_base_path, args.dataset_metadata_path, num_frames=args.num_frames, height=args.height,
        width=args.width, repeat=repeat))
    encoder = SampleEncoder(pipe, first_frame_conditioning=not args.without_first_frame)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        return cache_encoded_samples(args, encoder, params, dataset, dtype, init_key)

    # 4. The paradigm, one chain: fp8 storage of frozen components, block offload, gradient checkpointing, the LoRA
    #    (continued from --lora_checkpoint, or new).
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(encoder)

    # 5. The loss: flow matching within the expert's σ range (samples are encoded as they are drawn by the
    #    initialized encoders, unless they come from the cache).
    loss = sft_loss(pipe, **boundaries)

    # 6. Train: AdamW on the LoRA factors, saving the LoRA in --lora_layout, with previews of
    #    --validation_prompts sampled through the same chain (preview_frames checks that the model samples
    #    without an image).
    generate = preview_frames(pipe, args) if args.validation_prompts else None
    return train_run(args, paradigm, loss, params, dataset, encode=encode, save=trained_file_writer(args, save_lora),
                     keys=(data_key, fit_key), generate=generate)


if __name__ == "__main__":
    main(sys.argv[1:])
