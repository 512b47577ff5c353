"""Reading checkpoints: safetensors files, sharded folders and JSON configs, without pickle.

A *source* is a ``.safetensors`` file, a folder (the shards named by its
``*.safetensors.index.json``, or else every ``*.safetensors`` in it), a list of shard files, or a
flat ``{key: tensor}`` dict already in memory. Files are memory-mapped and read tensor by tensor,
each cast to the target dtype as it is read, so a checkpoint is never held twice.

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

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

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

    Integer and boolean tensors keep their dtype. A key found in two shards is an error.

    >>> load_state_dict({"w": torch.ones(1, dtype=torch.float64), "i": torch.ones(1, dtype=torch.int64)}, torch.float16)
    {'w': tensor([1.], dtype=torch.float16), 'i': tensor([1])}
    """
    if isinstance(source, Mapping):
        return {key: _cast(tensor, dtype, device) for key, tensor in source.items()}
    state: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for file in safetensors_files(source):
        with _open(file, device) as shard:
            for key in shard.keys():
                if key in owner:
                    raise ValueError(f"checkpoint key {key!r} appears in two shards: {owner[key]} and {file}")
                owner[key] = file
                state[key] = _cast(shard.get_tensor(key), dtype, device)
    return state


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target)


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
