"""Weights left on disk until used: lazy references into safetensors files.

:func:`lazy_load` builds a parameter tree whose leaves are :class:`DiskTensor` references (file,
key, dtype, shape) instead of data, reading nothing but the file headers. The offload transform's
fetch stage reads each reference with ``safetensors.safe_open`` when its block runs and drops the
tensor after, so a model streamed from disk holds only the blocks in flight in memory.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"blocks.0.w": torch.ones(2, 3), "blocks.1.w": torch.zeros(2, 3)}, path)
    >>> tree = lazy_load(path)
    >>> tree["blocks"][1]["w"]
    DiskTensor(model.safetensors:blocks.1.w, (2, 3) torch.float32)
    >>> with record_reads() as keys:
    ...     value = tree["blocks"][0]["w"].read()
    >>> keys, value.sum().item()
    (['blocks.0.w'], 6.0)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from dsf.tally import Tally
from dsf.files.io import aligned, safetensors_files
from dsf.tree import unflatten_dict

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_read_log = Tally("disk_reads", list)


@dataclass(frozen=True)
class DiskTensor:
    """A tensor that stays in ``file`` under ``key`` until :meth:`read`; reads return ``dtype``.

    Torch operations refuse it with an error naming the fix (stream it with ``offload``). A read checks
    that the file still has the ``file_size`` (when recorded) and the tensor the ``shape`` seen at
    :func:`lazy_load`: a file replaced since is an error naming it.

    >>> DiskTensor("m.safetensors", "w", torch.bfloat16, (4, 4)).nbytes
    32
    """

    file: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_size: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor, read from the file now, cast to ``dtype`` and placed on ``device``.

        Inside :func:`open_files` the file is opened once for all reads; for a CUDA ``device`` the
        bytes go through pinned memory, so the copy to the GPU is asynchronous.
        """
        try:
            handles = _open_files.get()
            if handles is None:
                with safe_open(self.file, framework="pt", device="cpu") as shard:
                    tensor = shard.get_tensor(self.key)
            else:
                if self.file not in handles:
                    handles[self.file] = safe_open(self.file, framework="pt", device="cpu")
                tensor = handles[self.file].get_tensor(self.key)
        except (SafetensorError, FileNotFoundError) as error:
            raise FileNotFoundError(f"cannot read {self.key!r} from {self.file} ({error}); was the file moved?") from None
        self._check_unchanged(tuple(tensor.shape))
        log = _read_log.current()
        if log is not None:
            log.append(self.key)
        tensor = tensor.to(self.dtype)
        device = torch.device(device)
        if device.type != "cuda":
            return aligned(tensor.to(device))
        return tensor.pin_memory().to(device, non_blocking=True)  # the host allocator keeps the pinned bytes until the copy ran

    def _check_unchanged(self, shape: tuple[int, ...]) -> None:
        size = os.path.getsize(self.file)
        if shape != self.shape or (self.file_size is not None and size != self.file_size):
            raise ValueError(
                f"{self.file} changed after lazy_load: {self.key!r} was {self.shape} in a file of {self.file_size} bytes, "
                f"now {shape} in {size} bytes; load the model again after replacing its files"
            )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{getattr(func, '__name__', func)} got a weight that is still on disk (a DiskTensor from dsf.files.disk.lazy_load); "
            "stream it to the compute device with dsf.transforms.offload(device=...) around the function"
        )

    def __repr__(self) -> str:
        return f"DiskTensor({Path(self.file).name}:{self.key}, {self.shape} {self.dtype})"


def lazy_load(source: str | os.PathLike, dtype: torch.dtype | None = None) -> dict:
    """The parameter tree of a safetensors file or shard folder, each leaf a :class:`DiskTensor`.

    Floating tensors read as ``dtype`` when it is given; others keep their stored dtype. Keys
    nest as in :func:`dsf.tree.unflatten_dict`; a key found in two shards is an error.

    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
    >>> save_file({"w": torch.ones(2), "step": torch.ones(1, dtype=torch.int64)}, path)
    >>> tree = lazy_load(path, dtype=torch.bfloat16)
    >>> tree["w"].dtype, tree["step"].dtype
    (torch.bfloat16, torch.int64)
    """
    flat: dict[str, DiskTensor] = {}
    for file in safetensors_files(source):
        with _open(file) as shard:
            for key in shard.keys():
                if key in flat:
                    raise ValueError(f"checkpoint key {key!r} appears in two shards: {flat[key].file} and {file}")
                view = shard.get_slice(key)
                stored = SAFETENSORS_DTYPES[view.get_dtype()]
                target = dtype if dtype is not None and stored.is_floating_point else stored
                flat[key] = DiskTensor(str(file), key, target, tuple(view.get_shape()), file.stat().st_size)
    return unflatten_dict(flat)


_open_files: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dsf_open_files", default=None)


@contextlib.contextmanager
def open_files() -> Iterator[dict]:
    """Keep every file that :meth:`DiskTensor.read` opens inside the block open until it ends: one open
    per file instead of one per tensor (a FLUX checkpoint's header alone takes ~2 ms to parse).

    >>> with open_files() as handles:
    ...     pass
    >>> handles
    {}
    """
    handles: dict = {}
    token = _open_files.set(handles)
    try:
        yield handles
    finally:
        _open_files.reset(token)
        for handle in handles.values():
            handle.__exit__(None, None, None)


@contextlib.contextmanager
def record_reads() -> Iterator[list[str]]:
    """The keys of every :meth:`DiskTensor.read` inside the block, in read order.

    >>> with record_reads() as keys:
    ...     pass
    >>> keys
    []
    """
    with _read_log.counting() as keys:
        yield keys


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error})") from None
