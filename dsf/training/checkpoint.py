"""Training state on disk: resumable step checkpoints through orbax-checkpoint, and atomic safetensors files.

A *state* is a nested dict with string keys whose leaves are tensors, ints, floats, bools, strings
or ``None``. :func:`save_state` writes it as the step folder ``directory/<step>``: orbax writes into
a temporary folder ``<step>.orbax-checkpoint-tmp-<time>`` and renames it once complete, so a save
killed halfway leaves only a temporary folder, which :func:`latest_step` and :func:`restore_state`
ignore and the next :func:`save_state` deletes.

Tensors travel to orbax as numpy arrays, moved to the CPU; dtypes numpy lacks (bfloat16, float8)
are stored as float32, which holds their values exactly, and cast back on restore. The dict
structure, each tensor's dtype and the python values form a JSON item beside the arrays, so 64-bit
integers (random keys) and strings come back exactly.

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

import os
import tempfile
from typing import Any

import numpy as np
import torch

State = dict[str, Any]
_ARRAYS_ITEM = "arrays"
_STRUCTURE_ITEM = "structure"


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
    structure = _encode(state, "", arrays)
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
    """The state saved as checkpoint ``step`` (default: the latest complete one) in ``directory``.

    Tensors come back on the CPU with their saved dtypes.

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
    ocp = _orbax()
    with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False)) as manager:
        structure_args = ocp.args.Composite(**{_STRUCTURE_ITEM: ocp.args.JsonRestore()})
        structure = manager.restore(step, args=structure_args)[_STRUCTURE_ITEM]
        arrays = {}
        if _holds_arrays(structure):
            arrays_args = ocp.args.Composite(**{_ARRAYS_ITEM: ocp.args.PyTreeRestore()})
            arrays = manager.restore(step, args=arrays_args)[_ARRAYS_ITEM]
    return _decode(structure, arrays)


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


def _decode(structure: dict, arrays: dict[str, np.ndarray]):
    if "dict" in structure:
        return {key: _decode(child, arrays) for key, child in structure["dict"].items()}
    if "value" in structure:
        return structure["value"]
    record = structure["tensor"]
    dtype = getattr(torch, record["dtype"])
    if "array" not in record:
        return torch.empty(record["shape"], dtype=dtype)
    array = np.asarray(arrays[record["array"]])
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(dtype)
