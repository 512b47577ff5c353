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

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import dsf
from dsf.training.checkpoint import remove_stale_temporaries, save_safetensors
from dsf.files.io import load_state_dict
from dsf.files.loading import load_tokenizer


def write_model_folder(folder: str | os.PathLike, config: dict, params: dict, tokenizer) -> Path:
    """Write the folder atomically: built under a temporary sibling name (removed if writing fails), then swapped
    into place in one step, replacing an older model folder; see the module example.

    A folder at ``folder`` holding anything this function would not write (the user's own files) is refused
    with an error listing them, before anything is replaced; staging folders a killed write left are removed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent, re.escape(folder.name), suffix="")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors(staging / "dit.safetensors", dsf.tree.flatten_dict(params["dit"]))
        (staging / "text_encoder").mkdir()
        save_safetensors(staging / "text_encoder" / "model.safetensors", dsf.tree.flatten_dict(params["text_encoder"]))
        tokenizer.save_pretrained(staging / "tokenizer")
        if folder.exists() or folder.is_symlink():
            _check_only_model_files(folder, staging)
        _swap_into_place(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _check_only_model_files(folder: Path, written: Path) -> None:
    """Refuse to replace ``folder`` unless every entry in it is a file or folder of the same name in ``written``."""
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a model folder; move it away or choose another output path")
    foreign = sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*")
        if path.is_symlink() or not (written / path.relative_to(folder)).exists()
        or path.is_dir() != (written / path.relative_to(folder)).is_dir()
    )
    if foreign:
        raise FileExistsError(
            f"{folder} holds files this program did not write: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}; "
            "it replaces a model folder only when nothing else is in it: move those files out, or choose another "
            "output path (the trained state is safe in the checkpoints; --resume writes the model again)"
        )


def _swap_into_place(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder`` in one atomic step; an older ``folder`` ends up at ``staging`` (for removal).

    Linux swaps the two names at once (renameat2 with RENAME_EXCHANGE); elsewhere the old folder is renamed to
    ``.<name>.old`` first, so a kill between the two renames leaves it there rather than losing it.
    """
    if not folder.exists():
        os.rename(staging, folder)
        return
    if _exchange(staging, folder):
        return
    previous = folder.parent / f".{folder.name}.old"
    if previous.exists():
        shutil.rmtree(previous)
    os.rename(folder, previous)
    os.rename(staging, folder)
    os.rename(previous, staging)


def _exchange(first: Path, second: Path) -> bool:
    """Swap the names ``first`` and ``second`` atomically; False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_current_directory, rename_exchange = -100, 2
    result = libc.renameat2(at_current_directory, os.fsencode(first), at_current_directory, os.fsencode(second),
                            rename_exchange)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(error, f"cannot swap {first} and {second}: {os.strerror(error)}")


def read_model_folder(folder: str | os.PathLike, recipe: str) -> tuple[dict, dict, object]:
    """``(config dict, params, tokenizer)`` of a folder :func:`write_model_folder` wrote; a folder
    without ``config.json`` is an error naming ``recipe``, the script that writes such folders. Everything is read
    from the folder: a missing part is an error naming it, never a hub request.

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
    tokenizer = load_tokenizer(folder / "tokenizer", None, PreTrainedTokenizerFast, "model", recipe)
    return json.loads(config_path.read_text()), params, tokenizer
