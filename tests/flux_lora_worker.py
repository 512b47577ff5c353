"""recipes/flux_lora.py on 2 gloo ranks, for tests/test_flux_lora_distributed.py.

:func:`launch` starts the ranks with ``torch.multiprocessing.spawn``; each sets the variables that
torchrun sets, joins the job with ``dsf.training.distributed.init()`` (the recipe's own ``init()`` then
finds it joined), and runs the recipe's ``main`` once per run, in order, recording what the rank did
that the files cannot show: what it printed, which files it saved, which components it trained
sharded, which model files it downloaded, and the params ``main`` returned. Everything goes to
``folder/rank{r}.pt``. The problem (tiny model files, images, flags) lives here so that the test's
single-process references run the same one.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import importlib.util
import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsf
import dsf.training.paradigm
from dsf.training import distributed
from dsf.training.data import write_image_folder
from dsf.models.digits.training import digit_images

WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny/FLUX.1-tiny"  # the hub repo id the tiny files are stored under
SIZE, TOKENS, ROWS = 32, 24, 6
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------- the problem


def load_recipe():
    spec = importlib.util.spec_from_file_location("flux_lora", ROOT / "recipes" / "flux_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_digits(folder: Path) -> Path:
    images, labels = digit_images(SIZE)
    rgb = [np.stack([image] * 3, axis=-1) for image in images[:ROWS]]
    return write_image_folder(folder, rgb, [{"prompt": f"a digit {WORDS[labels[i]]}"} for i in range(ROWS)])


def data_flags(metadata: Path) -> list[str]:
    return ["--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata),
            "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(TOKENS)]


def model_flags(tiny: dict, components=("dit", "vae", "clip", "t5")) -> list[str]:
    return ["--model_paths", json.dumps([str(tiny[c]) for c in components]),
            "--tokenizer_paths", f"{tiny['tokenizer_2']},{tiny['tokenizer']}"]


def sft_argv(tiny: dict, metadata: Path, output: Path, *flags: str) -> list[str]:
    """A LoRA run over the 6 digits once in batches of 1: 3 steps of 2 batches (what a test compares across
    rank counts: 2 ranks each accumulating 1, or 1 accumulating 2)."""
    return [*data_flags(metadata), *model_flags(tiny), "--learning_rate", "1e-2", "--lora_rank", "4", "--num_epochs", "1",
            "--batch_size", "1", "--lora_layout", "diffusers", "--device", "cpu", "--output_path", str(output), *flags]


# ----------------------------------------------------------------------------- what a rank records


@contextlib.contextmanager
def replaced(module, name: str, make):
    original = getattr(module, name)
    setattr(module, name, make(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def recording(calls: list, original, path_at: int):
    """``original`` that records the name of the file it writes (its argument ``path_at``)."""

    def record(*args, **kwargs):
        calls.append(Path(args[path_at]).name)
        return original(*args, **kwargs)

    return record


def sharded_components(calls: list, original):
    """``train`` that records the top-level components of its params holding DTensors."""

    def train(loss, params, *args, **kwargs):
        leaves = dsf.tree.select(params, None)
        calls.append(sorted({path.split("/")[0] for path, leaf in leaves.items() if distributed.is_sharded(leaf)}))
        return original(loss, params, *args, **kwargs)

    return train


def copying_from(hub_source: Path, calls: list):
    """A stand-in for ``dsf.files.hub._download`` that copies from a local mirror of the hub, recording the files."""

    def download(model_id, folder, allow, ignore):
        source = hub_source / model_id
        copied = []
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            name = path.relative_to(source).as_posix()
            if any(fnmatch.fnmatch(name, a) for a in allow) and not any(fnmatch.fnmatch(name, i) for i in ignore):
                (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(folder) / name)
                copied.append(name)
        calls.append(copied)

    return download


def plain_tensors(tree) -> dict[str, torch.Tensor]:
    return {path: leaf.detach().clone() for path, leaf in dsf.tree.select(tree, None).items()}


def run_recipe(recipe, argv: list[str], env: dict, hub_source: Path) -> dict:
    import dsf.files.hub

    saved, trains, downloads, printed = [], [], [], io.StringIO()
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(replaced(recipe, "save_lora", lambda f: recording(saved, f, 1)))
            stack.enter_context(replaced(recipe, "save_safetensors", lambda f: recording(saved, f, 0)))
            stack.enter_context(replaced(dsf.training.paradigm, "train", lambda f: sharded_components(trains, f)))
            stack.enter_context(replaced(dsf.files.hub, "_download", lambda f: copying_from(hub_source, downloads)))
            stack.enter_context(contextlib.redirect_stdout(printed))
            returned = recipe.main(argv)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if isinstance(returned, dict):
        returned = {"params": plain_tensors(returned), "sharded": distributed.holds_shards(returned)}
    return {"printed": printed.getvalue(), "saved": saved, "sharded components": trains, "downloads": downloads,
            "returned": returned}


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, port: int, folder: str, runs: dict, hub_source: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = distributed.init(backend="gloo", timeout=datetime.timedelta(seconds=120))
    try:
        recipe = load_recipe()
        seen = {name: run_recipe(recipe, argv, env, Path(hub_source)) for name, (argv, env) in runs.items()}
        torch.save(seen, os.path.join(folder, f"rank{world.rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def launch(runs: dict[str, tuple[list[str], dict]], folder, hub_source) -> list[dict]:
    """Run the recipe with each ``(argv, environment)`` of ``runs`` on :data:`WORLD_SIZE` gloo ranks, in
    order; return what each rank saw of each run, by rank."""
    mp.spawn(_rank_main, args=(_free_port(), str(folder), runs, str(hub_source)), nprocs=WORLD_SIZE)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]
