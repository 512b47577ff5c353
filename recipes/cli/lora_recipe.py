"""What the fine-tuning recipes (``flux_lora.py``, ``wan_lora.py``, ``z_image_lora.py``) share, whatever the family:
the flag checks, the model files of --model_paths/--model_id_with_origin_paths, the processes of a torchrun job,
the paradigm's chain (fp8 storage, checkpointing, shards, the LoRA), the task dispatch (cache and stop, or train)
and the files a run writes. A recipe keeps what its family changes: its components, encoder, losses and previews.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_model_file_flags(parser)
    >>> args = parser.parse_args(["--model_id_with_origin_paths", "org/model:dit/,org/model:vae/"])
    >>> model_ids(args)
    [('org/model', 'dit/'), ('org/model', 'vae/')]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dsf.cli.flag_types import finite_float
from dsf.cli.lora_paradigm import trained_lora
from dsf.cli.training_flags import batch_stream, train_config, validation_options
from dsf.transforms import checkpoint, fp8, lora_trainable, offload
from dsf.transforms.lora import TRAINED
from dsf.transforms.shard import shard, unshard

import dsf
from dsf.files.hub import ModelSource, resolve
from dsf.files.model_files import recognize_model_files, require_components
from dsf.training import distributed
from dsf.training.cache import CachedDataset, encode_into_cache
from dsf.training.checkpoint import save_safetensors
from dsf.training.data import FolderDataset
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.weight import dense_tree

MODEL_FLAGS = "--model_paths/--model_id_with_origin_paths"
PATIENCE = datetime.timedelta(days=1)  # how long a rank waits for another's download or encoding

# ----------------------------------------------------------------------------- flags


def add_model_file_flags(group) -> None:
    """Add --model_paths and --model_id_with_origin_paths (model files recognized by their keys) to ``group``."""
    group.add_argument("--model_paths", help='JSON list of local files; a list inside it is one sharded model')
    group.add_argument("--model_id_with_origin_paths", help="comma list of model_id:pattern, downloaded via dsf.files.hub")


def add_process_flags(models, training) -> None:
    """Add --dtype and --device to ``models`` and --shard to ``training``: the flags of a run on one or several
    processes (under torchrun).

    >>> parser = argparse.ArgumentParser()
    >>> add_process_flags(parser, parser)
    >>> parser.parse_args(["--shard", "--device", "cpu"]).shard
    True
    """
    models.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on the CPU")
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="under torchrun: cpu trains over gloo, otherwise each process takes the GPU of its local rank")
    training.add_argument("--shard", action="store_true", help="under torchrun: split the DiT's weights over the processes")


def add_frozen_storage_flags(group, components: Sequence[str]) -> None:
    """Add --fp8_models, --offload_models and --vram_limit to ``group``: the frozen ``components`` stored in fp8,
    streamed from the CPU one block at a time, and the GiB of streamed blocks kept resident.

    >>> parser = argparse.ArgumentParser()
    >>> add_frozen_storage_flags(parser, ("dit", "text"))
    >>> parser.parse_args(["--offload_models", "dit,text", "--vram_limit", "6"]).vram_limit
    6.0
    """
    group.add_argument("--fp8_models", default="", help=f"comma list of frozen components stored in fp8: {tuple(components)}")
    group.add_argument("--offload_models", default="",
                       help=f"comma list of frozen components streamed from the CPU block by block: {tuple(components)}")
    group.add_argument("--vram_limit", type=finite_float, default=0.0, help="GiB of offloaded blocks kept resident")


def add_paradigm_flags(groups: dict, tasks: Sequence[str]) -> None:
    """Add --task (one of ``tasks``, default sft) and --trainable_models to the ``training`` group of
    :func:`dsf.cli.training_flags.add_training_flags`, and --preset_lora_path to its ``LoRA`` group.

    >>> from dsf.cli.training_flags import add_training_flags
    >>> parser = argparse.ArgumentParser()
    >>> add_paradigm_flags(add_training_flags(parser, output_path="o", lora_targets="q", lora_layouts=("dsf",)), ("sft",))
    >>> parser.parse_args(["--trainable_models", "dit"]).task
    'sft'
    """
    groups["training"].add_argument("--task", default="sft", choices=tasks)
    groups["training"].add_argument("--trainable_models", choices=("dit",), help="dit: full fine-tuning of the DiT instead of a LoRA")
    groups["LoRA"].add_argument("--preset_lora_path", help="a LoRA merged into the base before training (differential LoRA)")


def named_components(flag: str, value: str, components: Sequence[str]) -> list[str]:
    """The components a comma list names, each one of ``components``.

    >>> named_components("--offload_models", "dit,text", ("dit", "text"))
    ['dit', 'text']
    >>> named_components("--offload_models", "vae", ("dit", "text"))
    Traceback (most recent call last):
    ...
    ValueError: --offload_models takes components of ('dit', 'text'), got ['vae']
    """
    chosen = [c for c in value.split(",") if c]
    unknown = [c for c in chosen if c not in components]
    if unknown:
        raise ValueError(f"{flag} takes components of {tuple(components)}, got {unknown}")
    return chosen


def for_task(args: argparse.Namespace, not_run: Sequence[str]) -> argparse.Namespace:
    """The flags with --fp8_models and --offload_models less the components the task does not run (kept on meta).

    >>> flags = argparse.Namespace(fp8_models="dit,text", offload_models="text")
    >>> vars(for_task(flags, not_run=("text",)))
    {'fp8_models': 'dit', 'offload_models': ''}
    """
    return argparse.Namespace(**{**vars(args), **{
        name: ",".join(c for c in getattr(args, name).split(",") if c and c not in not_run)
        for name in ("fp8_models", "offload_models")
    }})


def check_training_flags(args: argparse.Namespace, fp8_components: Sequence[str]) -> None:
    """Refuse the training flags that cannot work together, naming the fix.

    >>> args = argparse.Namespace(task="sft", dataset_metadata_path="m.csv", height=32, width=None, fp8_models="")
    >>> check_training_flags(args, ("dit",))
    Traceback (most recent call last):
    ...
    ValueError: pass both --height and --width or neither (got 32, None)
    """
    if args.task != "sft:train" and args.dataset_metadata_path is None:
        raise ValueError(f"--task {args.task} reads a dataset folder: pass --dataset_metadata_path")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"pass both --height and --width or neither (got {args.height}, {args.width})")
    named_components("--fp8_models", args.fp8_models, fp8_components)
    offloaded = named_components("--offload_models", getattr(args, "offload_models", ""), fp8_components)
    if getattr(args, "trainable_models", None) and args.lora_checkpoint:
        raise ValueError("--lora_checkpoint continues a LoRA, but --trainable_models dit trains the whole DiT; drop one")
    if getattr(args, "trainable_models", None) and "dit" in offloaded:
        raise ValueError("--trainable_models dit trains the whole DiT, which --offload_models dit streams as frozen "
                         "weights: drop dit from --offload_models")


def check_preview_task(args: argparse.Namespace, tasks: Sequence[str], sampler: str, lacking: str = "does not run") -> None:
    """Refuse --validation_prompts under a task that does not load ``sampler`` (what previews sample with).

    >>> args = argparse.Namespace(validation_prompts=["a cat"], task="sft:train")
    >>> check_preview_task(args, ("sft",), "the VAE")
    Traceback (most recent call last):
    ...
    ValueError: --validation_prompts samples with the VAE, which --task sft:train does not run; preview with --task sft
    """
    if args.validation_prompts and args.task not in tasks:
        raise ValueError(f"--validation_prompts samples with {sampler}, which --task {args.task} {lacking}; "
                         f"preview with --task {' or '.join(tasks)}")


# ----------------------------------------------------------------------------- model files


def model_ids(args) -> list[tuple[str, str]]:
    """The ``(model_id, pattern)`` pairs of --model_id_with_origin_paths; see the module example."""
    pairs = [entry.strip().partition(":") for entry in (args.model_id_with_origin_paths or "").split(",") if entry.strip()]
    wrong = [model_id + colon + pattern for model_id, colon, pattern in pairs if not (model_id and colon and pattern)]
    if wrong:
        raise ValueError(f"--model_id_with_origin_paths takes model_id:pattern entries, got {wrong}")
    return [(model_id, pattern) for model_id, _, pattern in pairs]


def model_files(args) -> list:
    """Local paths of the model files: --model_paths, then the downloads of --model_id_with_origin_paths.

    >>> model_files(argparse.Namespace(model_paths="[", model_id_with_origin_paths=None))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --model_paths must be a JSON list such as '["a.safetensors"]': ...
    """
    try:
        listed = json.loads(args.model_paths) if args.model_paths else []
    except json.JSONDecodeError as error:
        raise ValueError(f"--model_paths must be a JSON list such as '[\"a.safetensors\"]': {error}") from None
    files = [resolve(entry) for entry in listed]
    files += [resolve(ModelSource(model_id=model_id, pattern=pattern)) for model_id, pattern in model_ids(args)]
    if not files:
        raise ValueError(f"no model files: pass {MODEL_FLAGS}")
    return files


def recognized_model_files(args, family, needed: Sequence[str]) -> dict:
    """``{component: model file}`` of the flags' model files (downloaded in turn), recognized by their keys with
    the ``family`` record's components; an error names the first of ``needed`` missing."""
    files = recognize_model_files(fetch_in_turn(lambda: model_files(args)), family)
    require_components(files, needed, MODEL_FLAGS, family)
    return files


def hub_folders(args, patterns, default_repo: str | None = None):
    """``patterns`` (e.g. the tokenizer folders) of the first repo of --model_id_with_origin_paths, or of
    ``default_repo``, downloaded in turn; ``None`` with neither.

    >>> hub_folders(argparse.Namespace(model_id_with_origin_paths=None), "tokenizer/") is None
    True
    """
    repo = next((model_id for model_id, _ in model_ids(args)), default_repo)
    if repo is None:
        return None
    return fetch_in_turn(lambda: resolve(ModelSource(model_id=repo, pattern=patterns)))


# ----------------------------------------------------------------------------- processes


def join_processes(args) -> tuple[distributed.World, torch.device, torch.dtype]:
    """``(world, device, dtype)``: the torchrun job this process joins (gloo for --device cpu; a single process
    outside torchrun), the device it computes on and the --dtype (bfloat16 on CUDA, float32 on the CPU)."""
    world = distributed.init(backend="gloo" if torch.device(args.device).type == "cpu" else None)
    device = world.device if world.size > 1 else torch.device(args.device)
    return world, device, compute_dtype(args, device)


def compute_dtype(args, device: torch.device) -> torch.dtype:
    """--dtype, by default bfloat16 on CUDA and float32 elsewhere.

    >>> compute_dtype(argparse.Namespace(dtype=None), torch.device("cpu"))
    torch.float32
    """
    return getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


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
    ranks downloading into one folder at once would race.

    >>> fetch_in_turn(lambda: "files")  # a single process fetches once
    'files'
    """
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
    return torch.device("cpu") if getattr(args, "shard", False) and world.size > 1 else device


def load_devices(args, components, not_run, world, device) -> dict:
    """Where each component is loaded: the meta device when the task does not run it (built from its headers), the
    CPU when --offload_models streams it, the DiT as :func:`dit_load_device` says, the rest on ``device``.

    >>> from argparse import Namespace
    >>> args = Namespace(shard=False, offload_models="t5")
    >>> load_devices(args, ("dit", "vae", "t5"), ("vae",), distributed.World(), "cuda")
    {'dit': 'cuda', 'vae': 'meta', 't5': 'cpu'}
    """
    offloaded = getattr(args, "offload_models", "").split(",")
    placed = {"dit": dit_load_device(args, world, device)}
    return {name: "meta" if name in not_run else "cpu" if name in offloaded else placed.get(name, device)
            for name in components}


# ----------------------------------------------------------------------------- the paradigm


def storage_and_block_transforms(args, compute_dtype) -> dsf.Transform:
    """fp8 storage of the frozen components (--fp8_models), the DiT's shards (--shard), their block offload
    (--offload_models, keeping --vram_limit GiB resident), gradient checkpointing; the flags a recipe lacks add
    nothing.

    >>> args = argparse.Namespace(fp8_models="t5", use_gradient_checkpointing=True, use_gradient_checkpointing_offload=False)
    >>> storage_and_block_transforms(args, torch.float32).name
    'chain(fp8(granularity=tensor, compute_dtype=float32), checkpoint(offload_activations=False))'
    """
    stack = []
    fp8_models = [c for c in args.fp8_models.split(",") if c]
    if fp8_models:
        stack.append(fp8(where=rf"^({'|'.join(fp8_models)})/", compute_dtype=compute_dtype))
    if getattr(args, "shard", False):  # after fp8, whose bytes it splits; before offload, so a rank pins its rows alone
        stack.append(shard(where=r"^dit/"))
    offloaded = [c for c in getattr(args, "offload_models", "").split(",") if c]  # where the recipe has them
    if offloaded:
        stack.append(offload(device=args.device, level="block", vram_limit=getattr(args, "vram_limit", 0.0),
                             where=rf"^({'|'.join(offloaded)})/"))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        stack.append(checkpoint(offload_activations=args.use_gradient_checkpointing_offload))
    return dsf.chain(*stack)


def chosen_paradigm(args, compute_dtype) -> Paradigm:
    """What the flags train, as one chain: the storage and block transforms, then (LoRA) the adapter;
    its ``where`` is the one statement of what trains (fp8 over it fails at init). --trainable_models dit (where
    the recipe has it) trains the whole DiT instead.

    >>> args = argparse.Namespace(fp8_models="", use_gradient_checkpointing=False, use_gradient_checkpointing_offload=False,
    ...                           lora_checkpoint=None, lora_rank=4, lora_alpha=None, lora_target_modules="q")
    >>> chosen_paradigm(args, torch.float32).transforms.name
    "chain(chain(), lora(rank=4, alpha=None, name='lora'))"
    """
    stack = storage_and_block_transforms(args, compute_dtype)
    if getattr(args, "trainable_models", None):
        return Paradigm("full fine-tuning", stack, r"^dit/")
    return Paradigm("LoRA", dsf.chain(stack, trained_lora(args)), lora_trainable)


def trained_file_writer(args, write_lora: Callable, write_safetensors: Callable = save_safetensors) -> Callable:
    """``save(path, params)`` of a run: the trained LoRA in --lora_layout (``write_lora(dit_params, path, layout,
    name=...)``), or with --trainable_models dit the whole DiT (``write_safetensors(path, tensors)``)."""
    if getattr(args, "trainable_models", None):
        return lambda path, params: write_safetensors(path, dsf.tree.flatten_dict(dense_tree(params["dit"])))
    return lambda path, params: write_lora(params["dit"], path, args.lora_layout, name=TRAINED)


# ----------------------------------------------------------------------------- the task


def training_dataset(args, folder_dataset: Callable[[int], Any]):
    """The dataset of the task: the cache folder for sft:train, else ``folder_dataset(repeat)`` (each sample once
    for sft:data_process, --dataset_repeat times otherwise)."""
    if args.task == "sft:train":
        return CachedDataset(args.dataset_base_path, repeat=args.dataset_repeat)
    return folder_dataset(1 if args.task == "sft:data_process" else args.dataset_repeat)


def image_folder(args) -> Callable[[int], FolderDataset]:
    """``folder_dataset(repeat)`` of an image and prompt folder: --data_file_keys, resized to --height × --width or
    within --max_pixels."""
    image_size = (args.height, args.width) if args.height else None
    return lambda repeat: FolderDataset(
        args.dataset_base_path, args.dataset_metadata_path, repeat=repeat, data_file_keys=args.data_file_keys.split(","),
        image_size=image_size, max_pixels=None if image_size else args.max_pixels,
    )


def cache_encoded_samples(args, sample_encoder, params, dataset, compute_dtype, key) -> Path:
    """sft:data_process: every sample encoded once (through fp8 storage and checkpointing) into the cache folder
    --output_path by process 0 alone, the others waiting; returns the folder."""
    stack = storage_and_block_transforms(args, compute_dtype)
    if distributed.world().rank == 0:
        index = encode_into_cache(args.output_path, dataset, functools.partial(stack(sample_encoder), stack.init(params, key)))
        print(f"cached {len(dataset)} encoded samples: {index}")
    wait_for_every_rank()
    return Path(args.output_path)


def train_run(args, paradigm: Paradigm, loss, params, dataset, *, encode, save, keys, generate=None,
              processes: int = 1):
    """Train: AdamW on what ``paradigm`` trains, over ``dataset`` in batches (each item through
    ``encode(initialized params, item)`` as it is drawn, unless ``encode`` is None: cached samples), ``save`` at the
    save steps, previews of --validation_prompts by ``generate(params, prompts)`` through the paradigm's chain;
    ``keys``: the data and fit keys. Returns the trained params whole on every rank; process 0 prints."""
    data_key, fit_key = keys
    data = DataFromParams(lambda initialized: batch_stream(
        dataset, args.batch_size, data_key, None if encode is None else functools.partial(encode, initialized)))
    config = train_config(args, len(dataset), processes=processes)
    previews = {} if generate is None else validation_options(args, config, paradigm.transforms(generate))
    trained = unshard(fit(paradigm, loss, params, data, config, key=fit_key, save=save, **previews))  # on every rank
    if distributed.world().rank == 0:
        print(f"trained {config.max_steps} steps; the last file is {args.output_path}/step-{config.max_steps}.safetensors")
    return trained


def preview_images(pipe, args):
    """``generate(params, prompts)``: the pipeline's images of ``prompts`` at --seed (image i from the noise
    ``fold_in(key(seed), i)``, the same at every preview) in --height × --width, or 1024 × 1024."""
    size = {"height": args.height or 1024, "width": args.width or 1024}

    def generate(params, prompts):
        return pipe.generate(params, prompts, seed=args.seed, num_inference_steps=args.validation_num_inference_steps,
                             progress=False, **size)

    return generate
