"""Offload: weights live off the compute device and move to it only while they are used.

Two levels:

- ``offload(device, level="component")``: every selected parameter moves to ``device`` for each call
  of the function (a function wrap) and the copies are dropped when the call returns; the stored
  tree never changes.
- ``offload(device)`` (block level): each selected weight record gets a fetch stage that copies the
  record (its data and every stage tensor: fp8 scale, LoRA factors) to ``device`` when it is used,
  and the copy is dropped after. A block hook fetches the next block while the current one computes:
  on CUDA through a side stream and events, elsewhere synchronously. In backward under
  checkpointing the blocks recompute in reverse and the prefetch follows that direction. The first
  block of each block list is fetched when it runs.

Storage is where init leaves the weights: CPU memory, pinned when ``device`` is a CUDA device; or
the disk, for a tree from :func:`dsf.files.disk.lazy_load`, whose fetch reads each tensor from its file
when its block runs. ``vram_limit`` (GiB of weights) keeps a prefix of the weights resident on
``device`` from init on, the weights outside repeated blocks first and then whole blocks in order,
as long as they fit; the rest stream, and 0 streams everything. Offloading to the device the
weights already live on changes no value. :func:`count_transfers` counts what the fetches move.

Example:
    >>> import torch, dsf
    >>> from dsf.transforms.offload import offload, count_transfers
    >>> params = {"blocks": [{"w": torch.eye(2)} for _ in range(3)]}
    >>> f = lambda p, x: dsf.run_blocks(lambda b, h: h @ b["w"], p["blocks"], x)
    >>> t = offload("cpu")
    >>> streamed = t.init(params)
    >>> with count_transfers() as moved:
    ...     y = t(f)(streamed, torch.ones(1, 2))
    >>> bool(torch.equal(y, f(params, torch.ones(1, 2)))), moved.blocks, moved.bytes
    (True, [0, 1, 2], 48)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import optree
import torch

from dsf.files.disk import DiskTensor
from dsf.lookahead import look_ahead
from dsf.transform import OFFLOAD_RANK, FunctionWrap, Transform
from dsf.tree import NAMESPACE, Where, as_predicate, map_with_path, tensors
from dsf.weight import Stage, Weight, as_weight, stage

GIB = 2**30
LEVELS = ("block", "component")


@dataclass
class Transfers:
    """What fetches moved inside :func:`count_transfers`: tensors, their bytes, and the blocks fetched.

    Fetches to the device a tensor already lives on copy nothing but are counted, so CPU tests see
    the traffic a GPU would. ``blocks`` holds each fetched block's index in its block list, in the
    order the fetches began (prefetches included).
    """

    tensors: int = 0
    bytes: int = 0
    blocks: list[int] = field(default_factory=list)


_transfers: contextvars.ContextVar[Transfers | None] = contextvars.ContextVar("dsf_offload_transfers", default=None)


@contextlib.contextmanager
def count_transfers() -> Iterator[Transfers]:
    """Count the tensors, bytes and blocks that offload fetches inside the block.

    >>> with count_transfers() as moved:
    ...     pass
    >>> moved
    Transfers(tensors=0, bytes=0, blocks=[])
    """
    transfers = Transfers()
    token = _transfers.set(transfers)
    try:
        yield transfers
    finally:
        _transfers.reset(token)


def _moved(leaf, device: torch.device):
    if isinstance(leaf, DiskTensor):
        tensor = leaf.read(device)
    elif isinstance(leaf, torch.Tensor):
        tensor = leaf.to(device, non_blocking=device.type == "cuda")
    else:
        return leaf
    transfers = _transfers.get()
    if transfers is not None:
        transfers.tensors += 1
        transfers.bytes += tensor.numel() * tensor.element_size()
    return tensor


def on_device(param, device: str | torch.device):
    """A parameter (tensor, disk reference or whole weight record) with every tensor on ``device``.

    >>> on_device(Weight(torch.ones(2)), "meta").data.device
    device(type='meta')
    """
    device = torch.device(device)
    return optree.tree_map(lambda leaf: _moved(leaf, device), param, namespace=NAMESPACE)


@stage("fetch")
class Fetch(Stage):
    """Fetch stage: the record with all its tensors on ``device`` (disk references read), fetch dropped.

    >>> record = Weight(torch.ones(2)).with_stage(Fetch(torch.device("meta")))
    >>> record.stages["fetch"].apply(record)
    Weight((2,) torch.float32 meta, slots=[])
    """

    device: torch.device = optree.dataclasses.field(pytree_node=False)

    def apply(self, record: Weight) -> Weight:
        return on_device(record, self.device).without_stage("fetch")


def _in_storage(param, pin: bool):
    def place(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        leaf = leaf.to("cpu")
        pinnable = type(leaf) is torch.Tensor  # a DTensor shard (shard transform) cannot be pinned
        return leaf.pin_memory() if pin and pinnable and not leaf.is_pinned() else leaf

    return optree.tree_map(place, param, namespace=NAMESPACE)


def _nbytes(param) -> int:
    leaves = optree.tree_leaves(param, namespace=NAMESPACE)
    return sum(x.nbytes if isinstance(x, DiskTensor) else x.numel() * x.element_size() for x in leaves if _is_data(x))


def _is_data(x) -> bool:
    return isinstance(x, (torch.Tensor, DiskTensor))


def _unit(path: tuple) -> tuple:
    """The block a parameter path belongs to (the path up to its first list index), or the path itself."""
    for i, entry in enumerate(path):
        if isinstance(entry, int):
            return path[: i + 1]
    return path


def _resident_units(units: list[tuple], sizes: list[int], budget: int) -> set[tuple]:
    """The units kept on the device: those outside blocks first, then blocks, in order, while they fit.

    >>> sorted(_resident_units([("blocks", 0), ("blocks", 1), ("head",)], [4, 4, 2], budget=7))
    [('blocks', 0), ('head',)]
    """
    totals: dict[tuple, int] = {}
    for unit, size in zip(units, sizes):
        totals[unit] = totals.get(unit, 0) + size
    order = sorted(totals, key=lambda unit: any(isinstance(entry, int) for entry in unit))
    resident, used = set(), 0
    for unit in order:
        if used + totals[unit] > budget:
            break
        used += totals[unit]
        resident.add(unit)
    return resident


def _block_init(params, device: torch.device, vram_limit: float, keep):
    paths, leaves, treedef = optree.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, Weight), namespace=NAMESPACE
    )
    chosen = [i for i, (p, x) in enumerate(zip(paths, leaves)) if _is_param(x) and keep(_join(p), x)]
    units = [_unit(paths[i]) for i in chosen]
    resident = _resident_units(units, [_nbytes(leaves[i]) for i in chosen], int(vram_limit * GIB))
    leaves = list(leaves)
    for i, unit in zip(chosen, units):
        if unit in resident:
            leaves[i] = on_device(leaves[i], device)
        else:
            leaves[i] = as_weight(_in_storage(leaves[i], pin=device.type == "cuda")).with_stage(Fetch(device))
    return optree.tree_unflatten(treedef, leaves)


def _is_param(x) -> bool:
    return isinstance(x, Weight) or _is_data(x)


def _join(path: tuple) -> str:
    return "/".join(str(entry) for entry in path)


def _needs_fetch(param) -> bool:
    return isinstance(param, Weight) and "fetch" in param.stages


def _fetch_block(block, index: int):
    if not any(_needs_fetch(p) for p in optree.tree_leaves(block, is_leaf=lambda x: isinstance(x, Weight), namespace=NAMESPACE)):
        return block
    transfers = _transfers.get()
    if transfers is not None:
        transfers.blocks.append(index)
    return map_with_path(
        lambda _, p: p.stages["fetch"].apply(p) if _needs_fetch(p) else p, block, is_leaf=lambda x: isinstance(x, Weight)
    )


class _Prefetcher:
    """The blocks fetched ahead of their turn during one call, keyed by (block list, index)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: dict[tuple[int, int], tuple] = {}

    def start(self, blocks: list, index: int) -> None:
        key = (id(blocks), index)
        if key in self.ahead:
            return
        if self.stream is None:
            self.ahead[key] = (_fetch_block(blocks[index], index), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            fetched = _fetch_block(blocks[index], index)
        self.ahead[key] = (fetched, self.stream.record_event())

    def take(self, blocks: list, index: int, block):
        fetched, ready = self.ahead.pop((id(blocks), index), None) or (_fetch_block(block, index), None)
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in tensors(fetched):
                if tensor.device.type == "cuda":
                    tensor.record_stream(current)
        return fetched


def _component_call(f: Callable, device: torch.device, keep) -> Callable:
    @functools.wraps(f)
    def call(params, *args, **kwargs):
        moved = map_with_path(
            lambda path, p: on_device(p, device) if _is_param(p) and keep(path, p) else p,
            params,
            is_leaf=lambda x: isinstance(x, Weight),
        )
        return f(moved, *args, **kwargs)

    return call


def offload(
    device: str | torch.device | None = None, level: str = "block", vram_limit: float = 0.0, where: Where = None
) -> Transform:
    """Keep the parameters selected by ``where`` off ``device`` (default: CUDA if available) until used.

    ``level="block"`` streams weight by weight with block prefetch, keeping ``vram_limit`` GiB of
    weights resident; ``level="component"`` moves the whole tree for each call.

    >>> offload("cpu", vram_limit=0.5).name
    'offload(device=cpu, level=block, vram_limit=0.5)'
    >>> offload("cpu", level="component", vram_limit=1)
    Traceback (most recent call last):
    ...
    ValueError: vram_limit=1 applies to level='block'; component offload moves the whole tree for each call (use level='block' to keep part of it resident)
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not isinstance(vram_limit, (int, float)) or vram_limit < 0:
        raise ValueError(f"vram_limit is the GiB of weights kept resident: a number >= 0 (0 streams everything), got {vram_limit!r}")
    if level == "component" and vram_limit:
        raise ValueError(
            f"vram_limit={vram_limit} applies to level='block'; component offload moves the whole tree for each call "
            "(use level='block' to keep part of it resident)"
        )
    keep = as_predicate(where)
    name = f"offload(device={device}, level={level}, vram_limit={vram_limit})"
    if level == "component":
        pin = device.type == "cuda"
        return Transform(
            name=name,
            init_fn=lambda params, key=None: map_with_path(
                lambda path, p: _in_storage(p, pin) if _is_param(p) and keep(path, p) else p,
                params,
                is_leaf=lambda x: isinstance(x, Weight),
            ),
            wraps=(FunctionWrap(OFFLOAD_RANK, lambda f: _component_call(f, device, keep), "offload"),),
        )
    prefetch, per_call = look_ahead("offload", OFFLOAD_RANK, lambda: _Prefetcher(device))
    return Transform(
        name=name,
        init_fn=lambda params, key=None: _block_init(params, device, vram_limit, keep),
        hooks=(prefetch,),
        wraps=(per_call,),
    )
