"""A folder of preprocessed samples for split training: safetensors shards plus an index json.

Split training runs the gradient-free steps of a pipeline (text encoding, VAE encoding) once per
sample, stores what they produce with :func:`write_cache`, and trains from a :class:`CachedDataset`
without loading the encoders. A sample is a dict: its tensors go to the shards (exactly, in their
dtype), and so do lists of tensors (an Edit model's condition images), its other values (strings, numbers,
booleans, ``None``) to the index.

Folder layout::

    index.json                 {"format": "dsf-cache", "version": 1, "shards": [...], "samples": [...]}
    shard-00000.safetensors    tensors named "<sample index>/<key>" (a list's: "<sample index>/<key>/<position>")

The folder is written whole under a temporary name beside it and renamed into place, so a reader
never sees a half-written cache.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "cache"
    >>> _ = write_cache(folder, [{"latents": torch.ones(2, 2), "prompt": "a cat", "seed": i} for i in range(3)])
    >>> dataset = CachedDataset(folder, repeat=2)
    >>> len(dataset), dataset[4]["seed"], dataset[4]["prompt"], dataset[4]["latents"].shape
    (6, 1, 'a cat', torch.Size([2, 2]))
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tqdm.auto import tqdm

from dsf.files.io import aligned
from dsf.training.data import resolve_data_path

INDEX_NAME = "index.json"
FORMAT, VERSION = "dsf-cache", 1
DEFAULT_SHARD_SIZE = 1 << 30  # bytes of tensor data per shard
FIELD_TYPES = (str, int, float, bool, type(None))


def encode_into_cache(folder: str | os.PathLike, dataset, encode, progress: bool = True) -> Path:
    """Stage 1 of split training: ``encode(dataset[i])`` for every item, written by :func:`write_cache`
    one sample at a time, with a progress bar; returns the index path.

    >>> import tempfile, torch
    >>> folder = Path(tempfile.mkdtemp()) / "cache"
    >>> _ = encode_into_cache(folder, [torch.ones(2)] * 3, lambda x: {"doubled": 2 * x}, progress=False)
    >>> CachedDataset(folder)[2]["doubled"].tolist()
    [2.0, 2.0]
    """
    items = tqdm(range(len(dataset)), desc="encoding samples", disable=not progress)
    return write_cache(folder, (encode(dataset[i]) for i in items))


def write_cache(folder: str | os.PathLike, samples: Iterable[Mapping[str, Any]], shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``samples`` as a cache folder and return its index path.

    Tensors are moved to the CPU and stored in shards of at most ``shard_size`` bytes (a sample
    larger than that gets a shard of its own); every other value must be a string, number, boolean
    or ``None`` and goes to the index. ``folder`` must not exist or be empty. ``samples`` is consumed
    lazily, so only one shard is held in memory.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "cache"
    >>> index = write_cache(folder, [{"x": torch.zeros(256)} for _ in range(3)], shard_size=2048)
    >>> sorted(p.name for p in folder.iterdir())
    ['index.json', 'shard-00000.safetensors', 'shard-00001.safetensors']
    """
    folder = Path(folder)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size!r}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"cache folder {folder} already exists and is not empty; choose a new folder or delete it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    try:
        _write_cache_files(staging, samples, shard_size)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder / INDEX_NAME


def _write_cache_files(folder: Path, samples: Iterable[Mapping[str, Any]], shard_size: int) -> None:
    shards: list[str] = []
    entries: list[dict] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(pending, folder / name)
            shards.append(name)
            pending, pending_bytes = {}, 0

    for index, sample in enumerate(samples):
        tensors, fields, lists = _split_sample(index, sample)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if pending and pending_bytes + size > shard_size:
            flush()
        entries.append({"shard": len(shards), "tensors": list(tensors), "fields": fields, "lists": lists})
        pending.update({f"{index}/{key}": tensor for key, tensor in tensors.items()})
        pending_bytes += size
    flush()
    if not entries:
        raise ValueError("no samples to cache; pass at least one sample")
    index = {"format": FORMAT, "version": VERSION, "shards": shards, "samples": entries}
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _split_sample(index: int, sample: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
    """``(tensors on the CPU, other fields, {key: length} of the lists of tensors)`` of one sample, refusing values
    the index cannot hold; a list's tensors are named ``<key>/<position>``."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample {index} is a {type(sample).__name__}; a cached sample is a dict of named values")
    tensors, fields, lists = {}, {}, {}
    for key, value in sample.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"sample {index} has the key {key!r}; keys are non-empty strings without '/'")
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            tensors |= {f"{key}/{position}": v.detach().to("cpu").contiguous() for position, v in enumerate(value)}
            lists[key] = len(value)
        elif isinstance(value, FIELD_TYPES):
            fields[key] = value
        else:
            raise TypeError(
                f"sample {index}, key {key!r} is a {type(value).__name__}; a cache stores tensors, non-empty lists of "
                "tensors, strings, numbers, booleans and None (convert it, e.g. with torch.as_tensor or str)"
            )
    return tensors, fields, lists


class CachedDataset:
    """The samples of a cache folder; ``len`` is samples × ``repeat``; usable with :func:`dsf.training.data.batches`.

    Item ``i`` is sample ``i % samples`` as a dict: its fields and its tensors, read from the
    memory-mapped shard. Every shard the index names is checked to lie inside the folder and to
    exist when the dataset is built.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dsf.training.data import batches
    >>> folder = Path(tempfile.mkdtemp()) / "cache"
    >>> _ = write_cache(folder, [{"x": torch.full((2,), float(i)), "label": i} for i in range(4)])
    >>> position, batch = next(batches(CachedDataset(folder), 2, None, shuffle=False))
    >>> position, batch["x"].tolist(), batch["label"]
    (2, [[0.0, 0.0], [1.0, 1.0]], [0, 1])
    """

    def __init__(self, folder: str | os.PathLike, repeat: int = 1):
        self.folder = Path(folder)
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        self.repeat = repeat
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a cache folder: it has no {INDEX_NAME}; pass the folder a data-processing run "
                "wrote (e.g. --task sft:data_process --output_path FOLDER)"
            )
        index = _read_index(index_path)
        self.samples = index["samples"]
        self.shard_paths = [self._shard_path(name, index_path) for name in index["shards"]]
        self._open_shards: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a cache of {len(self)} items")
        sample_index = index % len(self.samples)
        entry = self.samples[sample_index]
        shard = self._shard(entry["shard"])
        tensors = {key: aligned(shard.get_tensor(f"{sample_index}/{key}")) for key in entry["tensors"]}
        lists = {key: [tensors.pop(f"{key}/{position}") for position in range(length)]
                 for key, length in entry.get("lists", {}).items()}
        return {**entry["fields"], **tensors, **lists}

    def _shard_path(self, name: Any, index_path: Path) -> Path:
        path = resolve_data_path(self.folder, name, f"cache index {index_path}, shard {name!r}")
        if not path.is_file():
            raise FileNotFoundError(
                f"cache index {index_path} names the shard {name}, which is missing from {self.folder}; "
                "the cache is incomplete: write it again with the data-processing run"
            )
        return path

    def _shard(self, number: int):
        if number not in self._open_shards:
            self._open_shards[number] = safe_open(str(self.shard_paths[number]), framework="pt", device="cpu")
        return self._open_shards[number]


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"cache index {path} is not valid json ({error}); write the cache again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dsf cache index (no \"format\": {FORMAT!r}); pass a folder written by write_cache")
    if index.get("version") != VERSION:
        raise ValueError(f"cache index {path} has version {index.get('version')!r}; this dsf reads version {VERSION}")
    shard_count = len(index["shards"])
    for number, entry in enumerate(index["samples"]):
        if not 0 <= entry.get("shard", -1) < shard_count:
            raise ValueError(f"cache index {path}: sample {number} names shard {entry.get('shard')!r} of {shard_count}")
    return index
