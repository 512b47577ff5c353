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
base first (differential LoRA). --fp8_models stores frozen components in fp8.

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
import datetime
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dsf
from dsf.training import distributed
from dsf.training.cache import CachedDataset, encode_into_cache
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.files.hub import ModelSource, resolve
from dsf.files.model_files import recognize_model_files, require_components
from dsf.models import flux
from dsf.models.flux import load_clip, load_dit, load_t5, load_vae
from dsf.models.flux.pipeline import FluxPipeline
from dsf.models.flux.training import (
    LORA_TARGETS,
    SampleEncoder,
    check_native_resolution,
    direct_distill_loss,
    recognize_tokenizers,
    sft_loss,
)
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.cli.lora_paradigm import trained_lora
from dsf.cli.training_flags import add_dataset_flags, add_training_flags, batch_stream, train_config, validation_options
from dsf.transforms import checkpoint, fp8, load_lora, lora_trainable, merge_lora, save_lora
from dsf.transforms.lora import TRAINED
from dsf.model_parts.lora_files import LAYOUTS
from dsf.transforms.shard import shard, unshard
from dsf.weight import dense_tree
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
MODEL_FLAGS = "--model_paths/--model_id_with_origin_paths"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune FLUX.1 (LoRA or full) with DiffSynth-Studio's flags.")
    data = add_dataset_flags(p, "image and prompt")
    data.add_argument("--data_file_keys", default="image", help="comma list of the metadata columns holding file paths")
    data.add_argument("--max_pixels", type=positive_int, default=1024 * 1024, help="bound on the image area without --height/--width")
    data.add_argument("--max_sequence_length", type=positive_int, default=512, help="T5 tokens per prompt")
    models = p.add_argument_group("models")
    models.add_argument("--model_paths", help='JSON list of local files; a list inside it is one sharded model')
    models.add_argument("--model_id_with_origin_paths", help="comma list of model_id:pattern, downloaded via dsf.files.hub")
    models.add_argument("--tokenizer_paths", help="comma list of the CLIP and T5 tokenizer folders (any order)")
    models.add_argument("--fp8_models", default="", help=f"comma list of frozen components stored in fp8: {FP8_COMPONENTS}")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="under torchrun: cpu trains over gloo, otherwise each process takes the GPU of its local rank")
    groups = add_training_flags(p, output_path="outputs/flux_lora", lora_targets=LORA_TARGETS, lora_layouts=LAYOUTS)
    groups["training"].add_argument("--task", default="sft", choices=TASKS)
    groups["training"].add_argument("--trainable_models", choices=("dit",),
                                    help="dit: full fine-tuning of the DiT instead of a LoRA")
    groups["training"].add_argument("--shard", action="store_true",
                                    help="under torchrun: split the DiT's weights over the processes")
    groups["LoRA"].add_argument("--preset_lora_path", help="a LoRA merged into the base before training (differential LoRA)")
    return p


def check_flags(args) -> None:
    if args.task != "sft:train" and args.dataset_metadata_path is None:
        raise ValueError(f"--task {args.task} reads a dataset folder: pass --dataset_metadata_path")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"pass both --height and --width or neither (got {args.height}, {args.width})")
    unknown = [c for c in args.fp8_models.split(",") if c and c not in FP8_COMPONENTS]
    if unknown:
        raise ValueError(f"--fp8_models takes components of {FP8_COMPONENTS}, got {unknown}")
    if args.trainable_models and args.lora_checkpoint:
        raise ValueError("--lora_checkpoint continues a LoRA, but --trainable_models dit trains the whole DiT; drop one")
    if args.validation_prompts and args.task not in ("sft", "direct_distill"):
        raise ValueError(f"--validation_prompts samples with the VAE and the text encoders, which --task {args.task} "
                         "does not train with; preview with --task sft or direct_distill")


def model_files(args) -> list:
    """Local paths of the model files: --model_paths, then the downloads of --model_id_with_origin_paths."""
    try:
        listed = json.loads(args.model_paths) if args.model_paths else []
    except json.JSONDecodeError as error:
        raise ValueError(f"--model_paths must be a JSON list such as '[\"a.safetensors\"]': {error}") from None
    files = [resolve(entry) for entry in listed]
    files += [resolve(ModelSource(model_id=model_id, pattern=pattern)) for model_id, pattern in model_ids(args)]
    if not files:
        raise ValueError(f"no model files: pass {MODEL_FLAGS}")
    return files


def model_ids(args) -> list[tuple[str, str]]:
    pairs = [entry.strip().partition(":") for entry in (args.model_id_with_origin_paths or "").split(",") if entry.strip()]
    wrong = [model_id + colon + pattern for model_id, colon, pattern in pairs if not (model_id and colon and pattern)]
    if wrong:
        raise ValueError(f"--model_id_with_origin_paths takes model_id:pattern entries, got {wrong}")
    return [(model_id, pattern) for model_id, _, pattern in pairs]


def tokenizer_folders(args) -> list:
    if args.tokenizer_paths:
        return args.tokenizer_paths.split(",")
    repo = next((model_id for model_id, _ in model_ids(args)), DEFAULT_TOKENIZER_REPO)
    return resolve(ModelSource(model_id=repo, pattern=["tokenizer/", "tokenizer_2/"]))


PATIENCE = datetime.timedelta(days=1)  # how long a rank waits for another's download or encoding


@functools.cache
def _patient_group(job_group) -> dist.ProcessGroup:
    return dist.new_group(backend="gloo", timeout=PATIENCE)


def wait_for_every_rank() -> None:
    """A barrier that outwaits one rank's long work alone (a download, the encoding of a dataset); the
    job's own collectives time out after minutes (NCCL's default: 10)."""
    if distributed.world().size > 1:
        dist.barrier(group=_patient_group(dist.group.WORLD))


def fetch_in_turn(fetch):
    """``fetch()`` (which downloads what is missing) on rank 0, then on the first rank of each other node
    (finding the files on a shared filesystem, downloading them otherwise), then on the other ranks:
    ranks downloading into one folder at once would race."""
    world = distributed.world()
    if world.size == 1:
        return fetch()
    fetched = fetch() if world.rank == 0 else None
    wait_for_every_rank()
    if world.local_rank == 0 and world.rank != 0:
        fetched = fetch()
    wait_for_every_rank()
    return fetched if world.local_rank == 0 else fetch()


def dit_load_device(args, world, device) -> torch.device:
    """Where the DiT is loaded: the CPU when ``--shard`` splits it over several processes (``shard``'s init
    then places each rank's shard on its GPU, tensor by tensor, so no GPU ever holds the whole DiT), else ``device``.

    >>> from argparse import Namespace
    >>> dit_load_device(Namespace(shard=True), distributed.World(rank=0, size=8), torch.device("cuda", 0))
    device(type='cpu')
    """
    return torch.device("cpu") if args.shard and world.size > 1 else device


def load_components(files: dict, needed, args, dtype, device, dit_device=None) -> tuple[dict, dict]:
    """``(models, params)`` of the components the task needs; the DiT on ``dit_device`` (default ``device``)."""
    models, params = {}, {}
    if "dit" in needed:
        models["dit"], params["dit"] = load_dit(files["dit"], dtype=dtype, device=dit_device or device)
    if "vae" in needed:
        models["vae"], params["vae"] = load_vae(files["vae"], dtype=dtype, device=device)
    if "clip" in needed:
        tokenizers = recognize_tokenizers(fetch_in_turn(lambda: tokenizer_folders(args)))
        models["clip"] = load_clip(files["clip"], tokenizers["clip"], dtype=dtype, device=device)
        models["t5"] = load_t5(files["t5"], tokenizers["t5"], dtype=dtype, device=device, max_length=args.max_sequence_length)
        params["clip"], params["t5"] = models["clip"].params, models["t5"].params
    return models, params


def storage_and_block_transforms(args, compute_dtype) -> dsf.Transform:
    """fp8 storage of the frozen components, gradient checkpointing, the DiT's shards."""
    stack = []
    fp8_models = [c for c in args.fp8_models.split(",") if c]
    if fp8_models:
        stack.append(fp8(where=rf"^({'|'.join(fp8_models)})/", compute_dtype=compute_dtype))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        stack.append(checkpoint(offload_activations=args.use_gradient_checkpointing_offload))
    if args.shard:  # after fp8, whose bytes it splits; a single process has nothing to split
        stack.append(shard(where=r"^dit/"))
    return dsf.chain(*stack)


def chosen_paradigm(args, compute_dtype) -> Paradigm:
    """What the flags train, as one chain: the storage and block transforms, then (LoRA) the adapter;
    its ``where`` is the one statement of what trains (fp8 over it fails at init).

    >>> flags = ["--dataset_base_path", "d", "--fp8_models", "dit,t5", "--use_gradient_checkpointing", "--lora_rank", "4"]
    >>> chosen_paradigm(parser().parse_args(flags), torch.float32).transforms.name
    "chain(fp8(granularity=tensor, compute_dtype=float32), checkpoint(offload_activations=False), lora(rank=4, alpha=None, name='lora'))"
    >>> chosen_paradigm(parser().parse_args([*flags, "--trainable_models", "dit"]), torch.float32).init({"dit": {"w": torch.ones(2, 2)}})
    Traceback (most recent call last):
    ...
    ValueError: full fine-tuning cannot train 'dit/w/data': the paradigm's transforms store it as torch.float8_e4m3fn, which gets no gradient; exclude it from the storage transform's where= (e.g. fp8's) or from the paradigm's where=, or train a LoRA over it instead
    """
    stack = storage_and_block_transforms(args, compute_dtype)
    if args.trainable_models:
        return Paradigm("full fine-tuning", stack, r"^dit/")
    return Paradigm("LoRA", dsf.chain(stack, trained_lora(args)), lora_trainable)


def preview_images(pipe: FluxPipeline, args):
    """``generate(params, prompts)``: the pipeline's images of ``prompts`` at --seed (image i from the noise
    ``fold_in(key(seed), i)``, the same at every preview) in --height × --width, or 1024 × 1024."""
    size = {"height": args.height or 1024, "width": args.width or 1024}

    def generate(params, prompts):
        return pipe.generate(params, prompts, seed=args.seed, num_inference_steps=args.validation_num_inference_steps,
                             progress=False, **size)

    return generate


def save_lora_file(layout: str):
    return lambda path, params: save_lora(params["dit"], path, layout, name=TRAINED)


def save_dit_file(path, params) -> None:
    save_safetensors(path, dsf.tree.flatten_dict(dense_tree(params["dit"])))


def main(argv: list[str]):
    """Run the task; returns the trained params (the cache folder for sft:data_process)."""
    args = parser().parse_args(argv)
    check_flags(args)
    world = distributed.init(backend="gloo" if torch.device(args.device).type == "cpu" else None)  # under torchrun
    device = world.device if world.size > 1 else torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    init_key, data_key, fit_key = dsf.random.split(dsf.random.key(args.seed), 3)

    # 1. The model files, recognized by their keys; only the components the task needs are loaded.
    needed = NEEDED[args.task]
    files = recognize_model_files(fetch_in_turn(lambda: model_files(args)), flux.FAMILY)
    require_components(files, needed, MODEL_FLAGS, flux.FAMILY)
    models, params = load_components(files, needed, args, dtype, device, dit_device=dit_load_device(args, world, device))

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
    if args.task == "direct_distill":
        check_native_resolution([paths["image"] for paths in dataset.data_file_paths], image_size, args.max_pixels)

    # 3. Split training, stage 1: encode every sample once (fp8 storage, checkpointing), cache, and stop.
    if args.task == "sft:data_process":
        stack = storage_and_block_transforms(args, dtype)
        encode = stack(SampleEncoder(models["vae"], models["clip"], models["t5"], args.max_sequence_length))
        if world.rank == 0:  # one process encodes and writes the cache
            index = encode_into_cache(args.output_path, dataset, functools.partial(encode, stack.init(params, init_key)))
            print(f"cached {len(dataset)} encoded samples: {index}")
        wait_for_every_rank()
        return Path(args.output_path)

    # 4. The paradigm, one chain: a preset LoRA merged into the base first, then fp8, checkpointing, shards, the LoRA.
    if args.preset_lora_path:
        params["dit"] = merge_lora(load_lora(params["dit"], args.preset_lora_path))
    paradigm = chosen_paradigm(args, dtype)
    encode = None if args.task == "sft:train" else paradigm.transforms(
        SampleEncoder(models["vae"], models["clip"], models["t5"], args.max_sequence_length)
    )

    # 5. The loss, and the data stream (samples are encoded as they are drawn by the initialized
    #    encoders, unless they come from the cache).
    pipe = None if args.task == "sft:train" else FluxPipeline(
        models["dit"], params["dit"], models["vae"], params["vae"], models["clip"], models["t5"],
        max_sequence_length=args.max_sequence_length)
    loss = direct_distill_loss(pipe) if args.task == "direct_distill" else sft_loss(models["dit"])

    data = DataFromParams(lambda initialized: batch_stream(
        dataset, args.batch_size, data_key, None if encode is None else functools.partial(encode, initialized)))

    # 6. Train: AdamW on the LoRA factors (or the DiT), saving the LoRA in --lora_layout (or the DiT), with
    #    previews of --validation_prompts sampled through the same chain.
    config = train_config(args, len(dataset), processes=world.size)
    save = save_dit_file if args.trainable_models else save_lora_file(args.lora_layout)
    previews = {} if pipe is None else validation_options(args, config, paradigm.transforms(preview_images(pipe, args)))
    trained = unshard(fit(paradigm, loss, params, data, config, key=fit_key, save=save, **previews))  # on every rank
    if world.rank == 0:
        print(f"trained {config.max_steps} steps; the last file is {args.output_path}/step-{config.max_steps}.safetensors")
    return trained


if __name__ == "__main__":
    main(sys.argv[1:])
