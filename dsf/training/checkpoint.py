"""Training state on disk: resumable step checkpoints through orbax-checkpoint, and atomic safetensors files.

A *state* is a nested dict with string keys whose leaves are tensors, ints, floats, bools, strings
or ``None``. :func:`save_state` writes it as the step folder ``directory/<step>``: orbax writes into
a temporary folder ``<step>.orbax-checkpoint-tmp`` (older orbax: ``-<time>`` added) and renames it once complete, so a save
killed halfway leaves only a temporary folder, which :func:`latest_step` and :func:`restore_state`
ignore and the next :func:`save_state` deletes.

Tensors travel to orbax as numpy arrays, moved to the CPU; dtypes numpy lacks (bfloat16, float8)
are stored as float32, which holds their values exactly, and cast back on restore. The dict
structure, each tensor's dtype and the python values form a JSON item beside the arrays, so 64-bit
integers (random keys) and strings come back exactly.

Every checkpoint carries checksums (CRC-32 of each array's bytes, and of the JSON item itself), and
:func:`restore_state` verifies them: a truncated, zeroed or bit-flipped checkpoint, or a step folder
missing a part, raises :class:`DamagedCheckpointError` naming it instead of loading wrong numbers.
:func:`restore_newest_good` falls back from a damaged checkpoint to the newest one that verifies,
moving the damaged one aside (``<step>.damaged``) with a message; nothing is deleted.

orbax and jax are imported inside the functions that need them: ``import dsf`` stays free of jax.

Example:
    >>> import tempfile, torch
    >>> folder = tempfile.TemporaryDirectory()
    >>> state = {"params": {"w": torch.ones(2, dtype=torch.bfloat16)}, "step": 10, "note": "warm"}
    >>> save_state(folder.name, 10, state)
    >>> restored = restore_state(folder.name)
    >>> restored["params"]["w"], restored["step"], restored["note"], latest_step(folder.name)
    (tensor([1., 1.], dtype=torch.bfloat16), 10, 'warm', 10)
    >>> folder.cleanup()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from typing import Any, Callable

import numpy as np
import torch

State = dict[str, Any]
_ARRAYS_ITEM = "arrays"
_STRUCTURE_ITEM = "structure"
_ORBAX_TEMPORARY = re.compile(r"\d+\.orbax-checkpoint-tmp(-\d+)?")  # orbax 0.12 adds no time
_MKSTEMP_PART = r"[a-z0-9_]{8}"  # what tempfile.mkstemp and mkdtemp put between a prefix and a suffix


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read back as it was written (missing part, unreadable file, checksum mismatch)."""


def save_state(directory: str | os.PathLike, step: int, state: State, keep_last: int | None = None) -> None:
    """Write ``state`` as checkpoint ``step`` in ``directory``; with ``keep_last``, delete all but the newest ``keep_last``.

    ``step`` must be newer than every checkpoint already in ``directory``. The write is complete when
    the call returns.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for step in (1, 2, 3):
    ...         save_state(folder, step, {"step": step}, keep_last=2)
    ...     all_steps(folder)
    [2, 3]
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
    arrays: dict[str, np.ndarray] = {}
    structure = _with_checksum(_encode(state, "", arrays))
    ocp = _orbax()
    items = {_STRUCTURE_ITEM: ocp.args.JsonSave(structure)}
    if arrays:
        items[_ARRAYS_ITEM] = ocp.args.PyTreeSave(arrays)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as manager:
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} in {directory}: it already holds checkpoint {latest}; "
                "save newer steps only, or use an empty directory for a new run"
            )
        if not manager.save(step, args=ocp.args.Composite(**items)):
            raise RuntimeError(f"orbax declined to save step {step} in {directory}; the directory holds {manager.all_steps()}")


def restore_state(directory: str | os.PathLike, step: int | None = None) -> State:
    """The state saved as checkpoint ``step`` (default: the latest complete one) in ``directory``, verified.

    Tensors come back on the CPU with their saved dtypes. A checkpoint that does not read back as
    written raises :class:`DamagedCheckpointError` naming its folder.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_state(folder, 5, {"key": 2**64 - 1, "lr": 0.5})
    ...     restore_state(folder, 5)
    {'key': 18446744073709551615, 'lr': 0.5}
    """
    steps = all_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}; save one with save_state or check the path")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory}; it holds steps {steps}")
    folder = os.path.join(directory, str(step))
    ocp = _orbax()
    try:
        with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False)) as manager:
            structure_args = ocp.args.Composite(**{_STRUCTURE_ITEM: ocp.args.JsonRestore()})
            structure = _verified_structure(manager.restore(step, args=structure_args)[_STRUCTURE_ITEM], folder)
            arrays = {}
            if _holds_arrays(structure):
                arrays_args = ocp.args.Composite(**{_ARRAYS_ITEM: ocp.args.PyTreeRestore()})
                arrays = manager.restore(step, args=arrays_args)[_ARRAYS_ITEM]
    except DamagedCheckpointError:
        raise
    except Exception as error:  # orbax, tensorstore and json report a damaged folder in many ways
        raise DamagedCheckpointError(f"checkpoint {folder} cannot be read ({type(error).__name__}: {error})") from error
    return _decode(structure, arrays, folder)


def restore_newest_good(
    directory: str | os.PathLike, newest: int | None = None, report: Callable[[str], None] | None = None
) -> tuple[int, State]:
    """``(step, state)`` of the newest checkpoint in ``directory`` (at most step ``newest``) that verifies.

    Each damaged checkpoint met on the way is moved aside to ``<step>.damaged`` (so later saves and
    ``keep_last`` see only good ones) and ``report`` (default: print to stderr) says so. With no
    checkpoint that verifies, a :class:`DamagedCheckpointError` lists what was wrong with each.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for step in (1, 2):
    ...         save_state(folder, step, {"step": step})
    ...     os.remove(os.path.join(folder, "2", "structure", "metadata"))
    ...     step, state = restore_newest_good(folder, report=print)  # doctest: +ELLIPSIS
    ...     step, state, sorted(os.listdir(folder))
    checkpoint .../2 cannot be read (...); moved it to .../2.damaged and resuming from step 1 instead
    (1, {'step': 1}, ['1', '2.damaged'])
    """
    report = report or (lambda message: print(message, file=sys.stderr))
    problems = []
    steps = [step for step in all_steps(directory) if newest is None or step <= newest]
    for position, step in enumerate(reversed(steps)):
        try:
            return step, restore_state(directory, step)
        except DamagedCheckpointError as error:
            aside = _move_aside(os.path.join(directory, str(step)))
            problems.append(str(error))
            older = steps[len(steps) - position - 2] if position + 1 < len(steps) else None
            then = f"resuming from step {older} instead" if older is not None else "no older checkpoint is left"
            report(f"{error}; moved it to {aside} and {then}")
    if not problems:
        raise FileNotFoundError(f"no complete checkpoint in {directory}; save one with save_state or check the path")
    raise DamagedCheckpointError(
        f"no checkpoint in {directory} reads back as written: " + "; ".join(problems) + ". Start a new run in an "
        "empty output_path (the damaged checkpoints were moved aside, not deleted)"
    )


def newest_good_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest checkpoint in ``directory`` that verifies, or ``None`` (nothing is moved).

    >>> newest_good_step("/nonexistent/checkpoints") is None
    True
    """
    for step in reversed(all_steps(directory)):
        try:
            restore_state(directory, step)
            return step
        except DamagedCheckpointError:
            continue
    return None


def remove_leftovers(directory: str | os.PathLike, keep_last: int | None) -> None:
    """Remove what a killed save left in ``directory``: orbax's temporary step folders, and the checkpoints beyond
    the newest ``keep_last`` (a kill between writing one and deleting the oldest leaves one too many).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for step in (1, 2, 3):
    ...         save_state(folder, step, {"step": step})
    ...     os.mkdir(os.path.join(folder, "4.orbax-checkpoint-tmp"))
    ...     remove_leftovers(folder, keep_last=2)
    ...     sorted(os.listdir(folder))
    ['2', '3']
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _ORBAX_TEMPORARY.fullmatch(name):
            shutil.rmtree(os.path.join(directory, name))
    steps = all_steps(directory)
    for step in steps[: -keep_last if keep_last else 0]:
        shutil.rmtree(os.path.join(directory, str(step)))


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, oldest first (``[]`` if there is none).

    >>> all_steps("/nonexistent/checkpoints")
    []
    """
    if not os.path.isdir(directory):
        return []
    ocp = _orbax()
    with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False)) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, or ``None``.

    >>> latest_step("/nonexistent/checkpoints") is None
    True
    """
    steps = all_steps(directory)
    return steps[-1] if steps else None


def save_safetensors(path: str | os.PathLike, flat_tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``{key: tensor}`` as a safetensors file: to a temporary name beside ``path``, then renamed over it.

    >>> import tempfile, os
    >>> from safetensors.torch import load_file
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_safetensors(os.path.join(folder, "lora.safetensors"), {"blocks.0.w": torch.ones(2)}, {"step": "3"})
    ...     load_file(os.path.join(folder, "lora.safetensors")), os.listdir(folder)
    ({'blocks.0.w': tensor([1., 1.])}, ['lora.safetensors'])
    """
    from safetensors.torch import save_file

    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata holds strings only; got {key!r}: {value!r} (convert with str())")
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in flat_tensors.items()}
    folder, name = os.path.split(os.path.abspath(path))
    descriptor, temporary_path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(tensors, temporary_path, metadata=metadata)
        os.replace(temporary_path, path)
    except BaseException:
        os.unlink(temporary_path)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, final_names: str, suffix: str = ".tmp") -> list[str]:
    r"""Remove what a killed atomic write left in ``folder``: the files and folders named
    ``.<final name>.<8 random characters><suffix>`` (how :func:`save_safetensors` and the other writers of dsf name
    their temporaries) whose final name matches the regex ``final_names``; return the names removed.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for name in (".step-3.safetensors.k2j4x_9q.tmp", "step-3.safetensors", ".notes.txt.tmp"):
    ...         _ = open(os.path.join(folder, name), "w").write("")
    ...     remove_stale_temporaries(folder, r"step-\d+\.safetensors"), sorted(os.listdir(folder))
    (['.step-3.safetensors.k2j4x_9q.tmp'], ['.notes.txt.tmp', 'step-3.safetensors'])
    """
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(rf"\.({final_names})\.{_MKSTEMP_PART}{re.escape(suffix)}")
    removed = sorted(name for name in os.listdir(folder) if pattern.fullmatch(name))
    for name in removed:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def _move_aside(folder: str) -> str:
    """Rename ``folder`` to ``folder.damaged`` (``.damaged-2``, ... if taken); return the new name."""
    aside, number = f"{folder}.damaged", 1
    while os.path.exists(aside):
        number += 1
        aside = f"{folder}.damaged-{number}"
    os.rename(folder, aside)
    return aside


def _crc32(data) -> int:
    return zlib.crc32(memoryview(data).cast("B"))


def _canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _with_checksum(structure: dict) -> dict:
    return {"state": structure, "crc32": _crc32(_canonical_json(structure))}


def _verified_structure(item, folder: str) -> dict:
    """The encoded state of a checkpoint's JSON item, after checking the item's own checksum."""
    if not isinstance(item, dict) or "state" not in item or "crc32" not in item:
        raise DamagedCheckpointError(f"checkpoint {folder} has no checksummed structure item (written by an older dsf, or damaged)")
    if _crc32(_canonical_json(item["state"])) != item["crc32"]:
        raise DamagedCheckpointError(f"checkpoint {folder}: its structure item does not match its checksum")
    return item["state"]


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _encode(node, path: str, arrays: dict[str, np.ndarray]) -> dict:
    """The JSON form of a state node; tensors with elements go to ``arrays`` under a fresh name."""
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings; {path or 'the state'} has key {key!r} ({type(key).__name__})")
        return {"dict": {key: _encode(value, f"{path}/{key}", arrays) for key, value in node.items()}}
    if isinstance(node, torch.Tensor):
        record = {"dtype": str(node.dtype).removeprefix("torch."), "shape": list(node.shape)}
        if node.numel():
            record["array"] = str(len(arrays))
            arrays[record["array"]] = _to_numpy(node, path)
            record["crc32"] = _crc32(np.asarray(arrays[record["array"]], order="C"))
        return {"tensor": record}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise TypeError(
        f"state leaf {path!r} is a {type(node).__name__}; a state holds dicts of tensors, ints, floats, bools, "
        "strings and None (convert it, e.g. with .item(), str() or torch.as_tensor())"
    )


def _to_numpy(tensor: torch.Tensor, path: str) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    try:
        return tensor.numpy()
    except TypeError:
        if not tensor.is_floating_point():
            raise TypeError(f"state tensor {path!r} has dtype {tensor.dtype}, which cannot be stored; cast it first") from None
        return tensor.to(torch.float32).numpy()


def _holds_arrays(structure: dict) -> bool:
    if "dict" in structure:
        return any(_holds_arrays(child) for child in structure["dict"].values())
    return "array" in structure.get("tensor", {})


def _decode(structure: dict, arrays: dict[str, np.ndarray], folder: str, path: str = ""):
    if "dict" in structure:
        return {key: _decode(child, arrays, folder, f"{path}/{key}") for key, child in structure["dict"].items()}
    if "value" in structure:
        return structure["value"]
    record = structure["tensor"]
    dtype = getattr(torch, record["dtype"])
    if "array" not in record:
        return torch.empty(record["shape"], dtype=dtype)
    array = np.asarray(arrays[record["array"]], order="C")
    if list(array.shape) != record["shape"] or _crc32(array) != record["crc32"]:
        raise DamagedCheckpointError(
            f"checkpoint {folder}: tensor {path!r} does not match the shape and checksum it was written with"
        )
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(dtype)
