"""Bad inputs, as a hostile or careless user gives them: each is refused with the right exception, a message naming
the offending thing, and no file outside the output folder changed.

Every case sets its inputs up under ``root/inputs`` (and may prepare ``root/output``, e.g. a first training run);
the files under ``root`` outside ``root/output`` are then fingerprinted, the bad call is made, and the fingerprints
must be unchanged. Cases marked ``# issue 16`` failed on the code before it (silently or with a raw error);
the others already held and are kept here so they keep holding.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dsf
from damage import DAMAGES
from dsf.cli.training_flags import add_training_flags
from dsf.files.disk import lazy_load
from dsf.files.io import load_state_dict
from dsf.models.digits import DigitsConfig, generate, new_model
from dsf.models.digits.folder import read_model_folder, write_model_folder
from dsf.models.digits.text import build_tokenizer
from dsf.models.flux.config import FluxConfig
from dsf.models.flux.keys import load_dit as load_flux_dit, ours_to_bfl
from dsf.models.flux.model import init_dit as init_flux_dit
from dsf.models.wan.keys import load_dit as load_wan_dit
from dsf.models.wan.model import init_dit as init_wan_dit
from dsf.models.wan.tiny import tiny_dit_config
from dsf.training import checkpoint
from dsf.training.data import FolderDataset, write_image_folder
from dsf.training.train import TrainConfig, train
from dsf.transforms import load_lora, lora

FLUX_CONFIG = FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2, num_single_blocks=2,
                         context_dim=8, pooled_dim=8, guidance_embeds=False)
FLUX_JSON = {"_class_name": "FluxTransformer2DModel", "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 1, "joint_attention_dim": 8, "pooled_projection_dim": 8, "axes_dims_rope": [4, 6, 6],
             "guidance_embeds": False}


@dataclass
class Case:
    """``setup(root) -> context``; ``act(context)`` must raise ``error`` whose message (with stderr) holds every string
    of ``names(context)``; ``after(context)`` checks what must still hold inside the output folder."""

    setup: Callable[[Path], dict]
    act: Callable[[dict], object]
    error: type[BaseException]
    names: Callable[[dict], list]
    after: Callable[[dict], None] = field(default=lambda context: None)


def context(root: Path, **values) -> dict:
    (root / "inputs").mkdir(exist_ok=True)
    return {"root": root, "inputs": root / "inputs", "output": root / "output", **values}


# ----------------------------------------------------------------------------- shared inputs


@functools.cache
def flux_pipeline():
    from dsf.models.flux.tiny import tiny_pipeline

    return tiny_pipeline()


@functools.cache
def digits_model():
    return new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))


def flux_flat() -> dict[str, torch.Tensor]:
    return dsf.tree.flatten_dict(init_flux_dit(FLUX_CONFIG, dsf.random.key(0)))


def flux_file(root: Path, flat: dict, with_config: bool = False) -> dict:
    c = context(root)
    save_file(flat, c["inputs"] / "diffusion_pytorch_model.safetensors")
    if with_config:
        (c["inputs"] / "config.json").write_text(json.dumps(FLUX_JSON))
    return {**c, "source": c["inputs"] / "diffusion_pytorch_model.safetensors"}


def load_flux(c: dict):
    return load_flux_dit(c["source"], None if (c["inputs"] / "config.json").exists() else {"axes_dims_rope": [4, 6, 6]})


def wan_file(root: Path, change: Callable[[dict], dict]) -> dict:
    c = context(root)
    flat = dsf.tree.flatten_dict(init_wan_dit(tiny_dit_config("t2v"), dsf.random.key(0)))
    save_file(change(flat), c["inputs"] / "model.safetensors")
    return {**c, "source": c["inputs"] / "model.safetensors"}


def image_folder(root: Path, rows: list[dict] | None = None, metadata_name: str = "metadata.json") -> dict:
    c = context(root)
    rows = rows if rows is not None else [{"image": "images/00000.png", "prompt": "a square"}]
    write_image_folder(c["inputs"], [np.zeros((8, 8), np.uint8)], [{"prompt": "a square"}])
    (c["inputs"] / metadata_name).write_text(json.dumps(rows) if metadata_name.endswith(".json")
                                            else "".join(json.dumps(row) + "\n" for row in rows))
    return {**c, "metadata": c["inputs"] / metadata_name}


def read_dataset(c: dict):
    dataset = FolderDataset(c["inputs"], c["metadata"], image_size=(8, 8))
    return [dataset[i] for i in range(len(dataset))]


def lora_target() -> dict:
    return {"q": {"weight": torch.zeros(3, 2)}}


def lora_file(root: Path, name: str, tensors: dict | None = None) -> dict:
    c = context(root)
    tensors = tensors or {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(3, 1)}
    path = c["inputs"] / name
    if name.endswith(".safetensors"):
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return {**c, "source": path}


# ----------------------------------------------------------------------------- training runs


def samples(position):
    while True:
        position += 1
        yield position, torch.tensor([2.0])


def regression(params, x, key):
    return ((params["w"] - x) ** 2).sum()


def run_config(c: dict, **changes) -> TrainConfig:
    values = dict(learning_rate=0.1, max_steps=4, checkpoint_steps=2, progress=False, output_path=str(c["output"]),
                  run_settings={"batch_size": 1})
    return TrainConfig(**{**values, **changes})


def trained_run(root: Path) -> dict:
    c = context(root)
    train(regression, {"w": torch.zeros(2)}, samples, run_config(c), key=dsf.random.key(0))
    return c


def resume(c: dict, key: int = 0, **changes):
    return train(regression, {"w": torch.zeros(2)}, samples, run_config(c, resume=True, **changes), key=dsf.random.key(key))


def nan_run(root: Path) -> dict:
    return context(root)


def train_into_nan(c: dict):
    def nan_at_step_3(position):
        while True:
            position += 1
            yield position, torch.tensor([math.nan if position == 3 else 2.0])

    train(regression, {"w": torch.zeros(2)}, nan_at_step_3, run_config(c), key=dsf.random.key(0))


# ----------------------------------------------------------------------------- command lines


def training_flags(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_training_flags(parser, output_path="outputs/x", lora_targets="to_q", lora_layouts=("diffusers",))
    return parser.parse_args(argv)


def recipe(argv: list[str]):
    from recipes_train_from_scratch import main

    return main(argv)


def flag_case(parse: Callable[[list[str]], object], argv: list[str]) -> Case:
    return Case(context, lambda c: parse(argv), SystemExit, lambda c: [argv[-2], repr(argv[-1])])


# ----------------------------------------------------------------------------- the cases


def user_files_in_the_model_folder(root: Path) -> dict:
    c = context(root)
    folder = c["output"] / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "my_notes.txt").write_text("the user's own file")
    return {**c, "folder": folder}


def write_digits_model(c: dict):
    model = digits_model()
    return write_model_folder(c["folder"], {"dim": 32}, model.params, build_tokenizer())


def model_folder_without_tokenizer(root: Path) -> dict:
    c = context(root)
    model = digits_model()
    folder = write_model_folder(c["inputs"] / "model", {"dim": 32}, model.params, build_tokenizer())
    shutil.rmtree(folder / "tokenizer")
    return {**c, "folder": folder}


def read_offline(c: dict, monkeypatch=None):
    original = socket.socket.connect

    def refuse(*args, **kwargs):
        raise AssertionError("a local model folder made a network request")

    socket.socket.connect = refuse
    try:
        return read_model_folder(c["folder"], "recipes/train_from_scratch.py")
    finally:
        socket.socket.connect = original


def decompression_bomb(root: Path) -> dict:
    c = image_folder(root)
    huge = c["inputs"] / "images" / "00000.png"
    Image.new("1", (18000, 10000)).save(huge)  # 1.8e8 pixels: over twice PIL's MAX_IMAGE_PIXELS (8.9e7)
    return {**c, "image": huge}


def replaced_after_lazy_load(root: Path) -> dict:
    c = context(root)
    path = c["inputs"] / "model.safetensors"
    save_file({"w": torch.ones(2, 3)}, path)
    tree = lazy_load(path)
    save_file({"w": torch.ones(3, 2)}, path)
    return {**c, "tree": tree, "path": path}


def truncated_safetensors(root: Path) -> dict:
    c = context(root)
    path = c["inputs"] / "model.safetensors"
    save_file({"w": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:40])
    return {**c, "path": path}


def truncated_image(root: Path) -> dict:
    c = image_folder(root)
    png = c["inputs"] / "images" / "00000.png"
    png.write_bytes(png.read_bytes()[:30])
    return {**c, "image": png}


def symlink_out_of_the_dataset(root: Path) -> dict:
    c = image_folder(root, [{"image": "images/link.png", "prompt": "a square"}])
    outside = root / "secret.png"
    Image.new("L", (8, 8)).save(outside)
    (c["inputs"] / "images" / "link.png").symlink_to(outside)
    return c


def pickle_folder(root: Path) -> dict:
    c = context(root)
    torch.save({"w": torch.ones(1)}, c["inputs"] / "pytorch_model.bin")
    return c


def pickle_file(root: Path, name: str) -> dict:
    c = context(root)
    torch.save({"w": torch.ones(1)}, c["inputs"] / name)
    return {**c, "path": c["inputs"] / name}


def damaged_checkpoints(root: Path) -> dict:
    c = trained_run(root)
    for step in checkpoint.all_steps(c["output"] / "checkpoints"):
        DAMAGES["zeroed structure"](c["output"] / "checkpoints" / str(step))
    return c


def without(flat: dict, prefix: str) -> dict:
    return {key: value for key, value in flat.items() if not key.startswith(prefix)}


def transposed(flat: dict, key: str) -> dict:
    return {**flat, key: flat[key].t().contiguous()}


NAN, INF = float("nan"), float("inf")

CASES = {
    # 1. the user's files in the model folder are never deleted  # issue 16
    "a model folder holding the user's files": Case(
        user_files_in_the_model_folder, write_digits_model, FileExistsError, lambda c: ["my_notes.txt", c["folder"]],
        after=lambda c: (c["folder"] / "my_notes.txt").read_text() == "the user's own file" or pytest.fail("deleted")),
    # 2. checkpoints  # issue 16
    "resume with every checkpoint damaged": Case(
        damaged_checkpoints, resume, checkpoint.DamagedCheckpointError, lambda c: [c["output"] / "checkpoints" / "4"]),
    # 3. model files with parts missing, wrong dtypes, transposed weights  # issue 16
    "FLUX DiT with int32 weights": Case(
        lambda root: flux_file(root, {k: v.to(torch.int32) for k, v in flux_flat().items()}), load_flux, ValueError,
        lambda c: ["context_embedder.bias", "int32"]),
    "FLUX DiT (BFL) with a transposed fused weight": Case(
        lambda root: flux_file(root, transposed(ours_to_bfl(flux_flat()), "single_blocks.0.linear1.weight")), load_flux,
        ValueError, lambda c: ["single_blocks.0.linear1.weight", "(16, 112)", "transposed"]),
    "FLUX DiT lacking its first single block": Case(
        lambda root: flux_file(root, without(flux_flat(), "single_transformer_blocks.0.")), load_flux, ValueError,
        lambda c: ["blocks missing entirely", "single_transformer_blocks.0"]),
    "FLUX DiT lacking its last block, with its config.json": Case(
        lambda root: flux_file(root, without(flux_flat(), "single_transformer_blocks.1."), with_config=True), load_flux,
        ValueError, lambda c: ["blocks missing entirely", "single_transformer_blocks.1"]),
    "FLUX DiT with a transposed weight": Case(
        lambda root: flux_file(root, transposed(flux_flat(), "transformer_blocks.0.ff.net.2.weight")), load_flux,
        ValueError, lambda c: ["transformer_blocks.0.ff.net.2.weight", "(16, 64)", "transposed"]),
    "Wan DiT with int64 weights": Case(
        lambda root: wan_file(root, lambda flat: {**flat, "blocks.0.ffn.net.0.proj.weight": torch.ones(32, 32, dtype=torch.int64)}),
        lambda c: load_wan_dit(c["source"]), ValueError, lambda c: ["blocks.0.ffn.net.0.proj.weight", "int64"]),
    # 4. non-finite scalars  # issue 16
    "FLUX cfg_scale NaN": Case(
        context, lambda c: flux_pipeline()("a cat", cfg_scale=NAN, height=16, width=16, num_inference_steps=1),
        ValueError, lambda c: ["cfg_scale", "nan"]),
    "FLUX cfg_scale inf": Case(
        context, lambda c: flux_pipeline()("a cat", cfg_scale=INF, height=16, width=16, num_inference_steps=1),
        ValueError, lambda c: ["cfg_scale", "inf"]),
    "FLUX embedded_guidance NaN": Case(
        context, lambda c: flux_pipeline()("a cat", embedded_guidance=NAN, height=16, width=16, num_inference_steps=1),
        ValueError, lambda c: ["embedded_guidance", "nan"]),
    "load_lora scale NaN": Case(
        lambda root: lora_file(root, "style.safetensors"), lambda c: load_lora(lora_target(), c["source"], scale=NAN),
        ValueError, lambda c: ["scale", "nan"]),
    "lora alpha inf": Case(context, lambda c: lora(rank=2, alpha=INF), ValueError, lambda c: ["alpha", "inf"]),
    "digits cfg_scale NaN": Case(
        context, lambda c: generate(digits_model(), ["a digit one"], seed=0, cfg_scale=NAN, num_inference_steps=1,
                                    progress=False), ValueError, lambda c: ["cfg_scale", "nan"]),
    "sample --cfg_scale nan": flag_case(lambda argv: recipe(["sample", "--model", "m", "--prompt", "p", "--out", "o",
                                                             *argv]), ["--cfg_scale", "nan"]),
    "--lora_scale inf": flag_case(lambda argv: _memory_flags(argv), ["--lora_scale", "inf"]),
    # 5. flags replaced or crashing, resume under other settings  # issue 16
    "--max_steps 0": flag_case(training_flags, ["--max_steps", "0"]),
    "--save_steps 0": flag_case(training_flags, ["--save_steps", "0"]),
    "--batch_size 0": flag_case(training_flags, ["--batch_size", "0"]),
    "--gradient_accumulation_steps 0": flag_case(training_flags, ["--gradient_accumulation_steps", "0"]),
    "--learning_rate nan": flag_case(training_flags, ["--learning_rate", "nan"]),
    "train_from_scratch --max_steps 0": flag_case(recipe, ["--max_steps", "0"]),
    "train_from_scratch --batch_size -1": flag_case(recipe, ["--batch_size", "-1"]),
    "resume with a lower max_steps": Case(
        trained_run, lambda c: resume(c, max_steps=2), ValueError, lambda c: ["max_steps=2", "step 4"]),
    "resume with another learning rate": Case(
        trained_run, lambda c: resume(c, learning_rate=0.2), ValueError, lambda c: ["learning_rate 0.1 -> 0.2"]),
    "resume with another batch size": Case(
        trained_run, lambda c: resume(c, run_settings={"batch_size": 8}), ValueError, lambda c: ["batch_size 1 -> 8"]),
    # 6. a local model folder never becomes a hub request  # issue 16
    "a model folder without tokenizer/": Case(
        model_folder_without_tokenizer, read_offline, FileNotFoundError, lambda c: [c["folder"] / "tokenizer"]),
    # 7. messages that name the file, the row, the flag  # issue 16
    "a decompression-bomb image": Case(
        decompression_bomb, read_dataset, ValueError, lambda c: [c["image"], "row 0", "decompression bomb"]),
    "prompt=None": Case(context, lambda c: flux_pipeline()(None, height=16, width=16), ValueError, lambda c: ["prompt"]),
    "a prompt list holding 5": Case(
        context, lambda c: generate(digits_model(), ["a digit", 5], seed=0, progress=False), ValueError,
        lambda c: ["prompt 1", "5"]),
    "sample --num 0": flag_case(lambda argv: recipe(["sample", "--model", "m", "--prompt", "p", "--out", "o", *argv]),
                                ["--num", "0"]),
    "load_lora of a .bin pickle": Case(
        lambda root: lora_file(root, "style.bin"), lambda c: load_lora(lora_target(), c["source"]), ValueError,
        lambda c: [c["source"], "pickle"]),
    "a metadata prompt that is a number": Case(
        lambda root: image_folder(root, [{"image": "images/00000.png", "prompt": 5}]), read_dataset, ValueError,
        lambda c: [c["metadata"], "row 0", "'prompt'", "5"]),
    "a metadata prompt that is null": Case(
        lambda root: image_folder(root, [{"image": "images/00000.png", "prompt": None}], "metadata.jsonl"), read_dataset,
        ValueError, lambda c: [c["metadata"], "row 0", "'prompt'", "None"]),
    "a file replaced after lazy_load": Case(
        replaced_after_lazy_load, lambda c: c["tree"]["w"].read(), ValueError, lambda c: [c["path"], "'w'", "(2, 3)"]),
    # what already held
    "a metadata file without the image column": Case(
        lambda root: image_folder(root, [{"picture": "images/00000.png", "prompt": "a"}]), read_dataset, ValueError,
        lambda c: [c["metadata"], "'image'"]),
    "a data path escaping with ..": Case(
        lambda root: image_folder(root, [{"image": "../secret.png", "prompt": "a"}]), read_dataset, ValueError,
        lambda c: ["../secret.png", "row 0"]),
    "an absolute data path": Case(
        lambda root: image_folder(root, [{"image": "/etc/passwd", "prompt": "a"}]), read_dataset, ValueError,
        lambda c: ["/etc/passwd", "row 0"]),
    "a symlink out of the dataset": Case(symlink_out_of_the_dataset, read_dataset, ValueError,
                                         lambda c: ["images/link.png", "symlink"]),
    "a truncated image": Case(truncated_image, read_dataset, OSError, lambda c: [c["image"], "row 0"]),
    "a missing metadata file": Case(
        context, lambda c: FolderDataset(c["inputs"], c["inputs"] / "metadata.csv"), FileNotFoundError,
        lambda c: [c["inputs"] / "metadata.csv"]),
    "a metadata file of unknown format": Case(
        lambda root: image_folder(root, metadata_name="metadata.jsonl") | {"metadata": root / "inputs" / "metadata.txt"},
        read_dataset, ValueError, lambda c: [c["metadata"], ".txt"]),
    "a truncated safetensors file": Case(truncated_safetensors, lambda c: load_state_dict(c["path"]), ValueError,
                                         lambda c: [c["path"]]),
    "a .pt pickle to load_state_dict": Case(
        lambda root: pickle_file(root, "model.pt"), lambda c: load_state_dict(c["path"]), ValueError,
        lambda c: [c["path"], "pickle"]),
    "a .ckpt pickle to lazy_load": Case(
        lambda root: pickle_file(root, "model.ckpt"), lambda c: lazy_load(c["path"]), ValueError,
        lambda c: [c["path"], "pickle"]),
    "a folder of pickles only": Case(
        pickle_folder, lambda c: load_state_dict(c["inputs"]), FileNotFoundError, lambda c: ["pytorch_model.bin"]),
    "a LoRA of another model size": Case(
        lambda root: lora_file(root, "big.safetensors", {"q.lora_A.weight": torch.ones(1, 5), "q.lora_B.weight": torch.ones(3, 1)}),
        lambda c: load_lora(lora_target(), c["source"]), ValueError, lambda c: ["q/weight", "another model size"]),
    "resume with another key": Case(trained_run, lambda c: resume(c, key=1), ValueError, lambda c: ["key"]),
    "a NaN loss": Case(nan_run, train_into_nan, FloatingPointError,
                       lambda c: ["step 3", c["output"] / "checkpoints" / "2"]),
    "a fresh run over existing checkpoints": Case(
        trained_run, lambda c: train(regression, {"w": torch.zeros(2)}, samples, run_config(c), key=dsf.random.key(0)),
        FileExistsError, lambda c: [c["output"] / "checkpoints", "resume"]),
}


def _memory_flags(argv: list[str]):
    from dsf.cli.inference_flags import add_memory_flags

    parser = argparse.ArgumentParser()
    add_memory_flags(parser, lora_help="a LoRA file")
    return parser.parse_args(argv)


def fingerprints(root: Path, skip: Path) -> dict[str, str]:
    """``{path: content digest}`` of every file and link under ``root`` outside ``skip``."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        if path.is_symlink():
            found[str(path)] = f"link to {os.readlink(path)}"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(autouse=True)
def recipe_module(monkeypatch):
    """recipes/train_from_scratch.py importable as ``recipes_train_from_scratch``."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "recipes" / "train_from_scratch.py"
    spec = importlib.util.spec_from_file_location("recipes_train_from_scratch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "recipes_train_from_scratch", module)


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_refused_naming_it_and_changes_nothing_outside_the_output(name, tmp_path, capsys):
    case = CASES[name]
    c = case.setup(tmp_path)
    before = fingerprints(tmp_path, c["output"])
    with pytest.raises(case.error) as raised:
        case.act(c)
    message = f"{raised.value}\n{capsys.readouterr().err}"
    for expected in case.names(c):
        assert str(expected) in message, f"{name}: the message does not name {expected}:\n{message}"
    assert fingerprints(tmp_path, c["output"]) == before
    case.after(c)
