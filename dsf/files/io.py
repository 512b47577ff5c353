"""Reading checkpoints: safetensors files, sharded folders and JSON configs, without pickle.

A *source* is a ``.safetensors`` file, a folder (the shards named by its
``*.safetensors.index.json``, or else every ``*.safetensors`` in it), a list of shard files, or a
flat ``{key: tensor}`` dict already in memory. Files are memory-mapped and read tensor by tensor,
each cast to the target dtype as it is read, so a checkpoint is never held twice. On the ``meta``
device only the headers are read: tensors with shapes and dtypes and no data, for a component a
task needs the shapes of but never runs (e.g. the DiT while encoding a dataset for split training).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.ones(2, 2)}, folder / "model.safetensors")
    >>> load_state_dict(folder, dtype=torch.bfloat16)["w"].dtype
    torch.bfloat16
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

ALLOCATOR_ALIGNMENT = 64  # bytes: where torch's CPU allocator starts every tensor it makes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, torch.Tensor]]


def read_json(path: str | os.PathLike) -> dict:
    """The parsed JSON object in ``path``; a missing or malformed file is an error naming it.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "config.json"
    >>> _ = path.write_text('{"num_layers": 19}')
    >>> read_json(path)
    {'num_layers': 19}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSON file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def safetensors_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files a file, folder or list of files stands for, checked to exist and not be pickles.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "b.safetensors").write_bytes(b""); _ = (folder / "a.safetensors").write_bytes(b"")
    >>> [p.name for p in safetensors_files(folder)]
    ['a.safetensors', 'b.safetensors']
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = _folder_shards(path) if path.is_dir() else [path]
    else:
        files = [Path(p) for p in source]
        if not files:
            raise ValueError("an empty list of checkpoint files was given")
    for file in files:
        _check_safetensors_file(file)
    return files


def load_state_dict(
    source: Source, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` of a checkpoint source, floating tensors cast to ``dtype`` while read.

    Integer and boolean tensors keep their dtype. A key found in two shards is an error. With
    ``device="meta"`` no tensor data is read, only the files' headers.

    >>> load_state_dict({"w": torch.ones(1, dtype=torch.float64), "i": torch.ones(1, dtype=torch.int64)}, torch.float16)
    {'w': tensor([1.], dtype=torch.float16), 'i': tensor([1])}
    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> file = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"w": torch.ones(3, 2)}, file)
    >>> load_state_dict(file, torch.bfloat16, device="meta")["w"]
    tensor(..., device='meta', size=(3, 2), dtype=torch.bfloat16)
    """
    if isinstance(source, Mapping):
        return {key: _cast(tensor, dtype, device) for key, tensor in source.items()}
    state: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    headers_only = torch.device(device).type == "meta"
    for file in safetensors_files(source):
        with _open(file, "cpu" if headers_only else device) as shard:
            for key in shard.keys():
                if key in owner:
                    raise ValueError(f"checkpoint key {key!r} appears in two shards: {owner[key]} and {file}")
                owner[key] = file
                state[key] = _header_tensor(shard, key, dtype) if headers_only else _cast(shard.get_tensor(key), dtype, device)
    return state


def safetensors_metadata(source: Source) -> dict[str, str]:
    """The string metadata of a checkpoint's safetensors headers, merged over its shards (none for a state dict).

    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> file = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"w": torch.ones(1)}, file, metadata={"format": "pt"})
    >>> safetensors_metadata(file), safetensors_metadata({"w": torch.ones(1)})
    ({'format': 'pt'}, {})
    """
    if isinstance(source, Mapping):
        return {}
    merged: dict[str, str] = {}
    for file in safetensors_files(source):
        with _open(file, "cpu") as shard:
            merged |= shard.metadata() or {}
    return merged


def _header_tensor(shard, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """A ``meta`` tensor with the shape and (cast) dtype the file's header gives ``key``; no data is read."""
    header = shard.get_slice(key)
    stored = SAFETENSORS_DTYPES.get(header.get_dtype())
    if stored is None:
        raise ValueError(f"checkpoint key {key!r} has dtype {header.get_dtype()}, which dsf does not read")
    return _cast(torch.empty(header.get_shape(), dtype=stored, device="meta"), dtype, "meta")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return aligned(tensor.to(device=device, dtype=target))


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory aligned as torch allocates it (a copy only when it is not): safetensors hands out CPU
    tensors at any 4-byte offset, and BLAS kernels round differently at another alignment, so a weight read from a file
    would compute other last bits than the same weight made by torch (e.g. gathered from shards, or kept in RAM).
    Every CPU tensor dsf reads from a file passes through here.

    >>> buffer = torch.arange(9.0)
    >>> aligned(buffer[1:]).data_ptr() % ALLOCATOR_ALIGNMENT, aligned(buffer) is buffer
    (0, True)
    """
    misaligned = tensor.device.type == "cpu" and tensor.data_ptr() % ALLOCATOR_ALIGNMENT
    return tensor.clone() if misaligned else tensor


def _open(file: Path, device):
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error})") from None


def _folder_shards(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise ValueError(f"{folder} holds several shard indexes ({names}); pass the list of shard files you want instead")
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{indexes[0]} has no 'weight_map' object naming the shard of each key")
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; it has pickle checkpoints {pickles}, convert them to safetensors" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors files in folder {folder}{hint}")
    return files


def _check_safetensors_file(file: Path) -> None:
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to load {file}: {file.suffix} checkpoints are pickles, which can run arbitrary code when loaded; "
            "convert it to safetensors once (safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'model.safetensors')) and load that"
        )
    if not file.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {file}")
