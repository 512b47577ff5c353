"""The folder a model trained from scratch is saved in (the digits and moving-digits models):
``config.json``, ``dit.safetensors``, ``text_encoder/model.safetensors`` and ``tokenizer/``.

Example:
    >>> import tempfile, torch
    >>> from dsf.models.digits.text import build_tokenizer
    >>> folder = Path(tempfile.mkdtemp()) / "model"
    >>> params = {"dit": {"w": torch.ones(2)}, "text_encoder": {"embed": torch.zeros(3, 2)}}
    >>> _ = write_model_folder(folder, {"dim": 2}, params, build_tokenizer())
    >>> config, read, tokenizer = read_model_folder(folder, "recipes/train_from_scratch.py")
    >>> config, read["dit"]["w"].tolist(), sorted(p.name for p in folder.iterdir())
    ({'dim': 2}, [1.0, 1.0], ['config.json', 'dit.safetensors', 'text_encoder', 'tokenizer'])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import dsf
from dsf.training.checkpoint import save_safetensors
from dsf.files.io import load_state_dict


def write_model_folder(folder: str | os.PathLike, config: dict, params: dict, tokenizer) -> Path:
    """Write the folder atomically: built under a temporary sibling name (removed if writing fails),
    then renamed into place, replacing an older folder; see the module example."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors(staging / "dit.safetensors", dsf.tree.flatten_dict(params["dit"]))
        (staging / "text_encoder").mkdir()
        save_safetensors(staging / "text_encoder" / "model.safetensors", dsf.tree.flatten_dict(params["text_encoder"]))
        tokenizer.save_pretrained(staging / "tokenizer")
    except BaseException:
        shutil.rmtree(staging)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def read_model_folder(folder: str | os.PathLike, recipe: str) -> tuple[dict, dict, object]:
    """``(config dict, params, tokenizer)`` of a folder :func:`write_model_folder` wrote; a folder
    without ``config.json`` is an error naming ``recipe``, the script that writes such folders.

    >>> read_model_folder("/no/such/model", "recipes/train_from_scratch.py")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/model/config.json not found: the model must be a folder written by recipes/train_from_scratch.py
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: the model must be a folder written by {recipe}")
    params = {
        "dit": dsf.tree.unflatten_dict(load_state_dict(folder / "dit.safetensors")),
        "text_encoder": dsf.tree.unflatten_dict(load_state_dict(folder / "text_encoder" / "model.safetensors")),
    }
    return json.loads(config_path.read_text()), params, PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
