"""Offload: weights live off the compute device and move to it only while they are used.

Two levels:

- ``offload(device, level="component")``: a component (the parameters under one top-level key of the
  tree: ``dit``, ``t5``, ``clip``, ``vae``) moves to ``device`` as a whole when one of its weights is
  first used in a call, and its copies are dropped when another component's weight is used or the
  call returns, so the device holds one component at a time; the stored tree never changes.
- ``offload(device)`` (block level): each selected weight record gets a fetch stage that copies the
  record (its data and its storage stages' tensors, e.g. an fp8 scale) to ``device`` when it is used,
  and the copy is dropped after. A block hook fetches the next block while the current one computes:
  on CUDA on one side stream per transform, elsewhere synchronously. The copy of block i+1 waits
  on the compute stream (for block i−1, the last work it was given), so the memory of block i−1 is
  reused for block i+1 however far the CPU runs ahead: two blocks in flight. In backward under
  checkpointing the blocks recompute in reverse and the prefetch follows that direction. The first
  block of each block list is fetched ahead too (:mod:`dsf.lookahead`, ``across_lists``), from the
  block order seen before: at a call's start the block the transform's previous call ran first,
  and at the last block of a list (forward pass) the block that followed that list, so FLUX.1's
  single-stream list is fetched while the last double block computes. The first call fetches each
  list's first block when it runs, until it has seen which list follows which. A block fetched so
  and not used next is dropped when the next block runs, and anything fetched and not used by the
  call when it returns.

Adapt-stage tensors (LoRA factors) are not storage: they live on ``device`` from init on, whatever
the chain order, so trainable factors get their gradients and optimizer state on the compute device.

Storage is where init leaves the weights: CPU memory, page-locked when ``device`` is a CUDA device
(one buffer of exactly its bytes per block, the tensors views of it; of a ``shard()``-ed weight, this
rank's rows, re-wrapped as its DTensor); or
the disk, for a tree from :func:`dsf.files.disk.lazy_load`, whose fetch reads each tensor from its file
when its block runs. ``vram_limit`` (GiB of weights) keeps a prefix of the weights resident on
``device`` from init on, the weights outside repeated blocks first and then whole blocks in order,
as long as they fit; the rest stream, and 0 streams everything. Offloading to the device the
weights already live on changes no value. :func:`count_transfers` counts what the fetches move
(in the thread that runs the call: a checkpointed block recomputed in backward by autograd's CUDA
device thread is fetched there and not counted).

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

import numpy
import optree
import torch

from dsf.files.disk import DiskTensor, open_files
from dsf.lookahead import look_ahead
from dsf.tally import Tally
from dsf.training import distributed
from dsf.transform import OFFLOAD_RANK, FunctionWrap, Transform
from dsf.tree import NAMESPACE, Where, as_predicate, map_with_path
from dsf.weight import Stage, Weight, as_weight, stage

GIB = 2**30
LEVELS = ("block", "component")


@dataclass
class Transfers:
    """What fetches moved inside :func:`count_transfers`: tensors, their bytes, and the blocks fetched.

    Fetches to the device a tensor already lives on copy nothing but are counted, so CPU tests see
    the traffic a GPU would. ``blocks`` holds each fetched block's index in its block list, in the
    order the fetches began (prefetches included); ``components`` each component component offload
    moved, in order.
    """

    tensors: int = 0
    bytes: int = 0
    blocks: list[int] = field(default_factory=list)
    components: list[str] = field(default_factory=list)


_transfers = Tally("offload_transfers", Transfers)


@contextlib.contextmanager
def count_transfers() -> Iterator[Transfers]:
    """Count the tensors, bytes and blocks that offload fetches inside the block.

    >>> with count_transfers() as moved:
    ...     pass
    >>> moved
    Transfers(tensors=0, bytes=0, blocks=[], components=[])
    """
    with _transfers.counting() as transfers:
        yield transfers


def _moved(leaf, device: torch.device):
    if isinstance(leaf, DiskTensor):
        tensor = leaf.read(device)
    elif isinstance(leaf, torch.Tensor):
        tensor = leaf.to(device, non_blocking=device.type == "cuda")
    else:
        return leaf
    transfers = _transfers.current()
    if transfers is not None:
        transfers.tensors += 1
        transfers.bytes += _held_bytes(tensor)
    return tensor


def on_device(param, device: str | torch.device):
    """A parameter (tensor, disk reference or whole weight record) with every tensor on ``device``.

    >>> on_device(Weight(torch.ones(2)), "meta").data.device
    device(type='meta')
    """
    device = torch.device(device)
    return optree.tree_map(lambda leaf: _moved(leaf, device), param, namespace=NAMESPACE)


def _placed(tree, device: torch.device):
    """Every tensor of ``tree`` on ``device``, not counted as a transfer (a no-op where it already is)."""
    return optree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree, namespace=NAMESPACE)


def _fetched(record: Weight, device: torch.device) -> Weight:
    """``record`` without its fetch stage, its storage (data and storage stages) moved to ``device``;
    its adapt stage (LoRA factors, kept on the device) passes as it is.

    >>> _fetched(Weight(torch.ones(2)).with_stage(Fetch(torch.device("meta"))), torch.device("meta"))
    Weight((2,) torch.float32 meta, slots=[])
    """
    adapt = record.stages.get("adapt")
    storage = on_device(record.without_stage("fetch").without_stage("adapt"), device)
    return storage if adapt is None else storage.with_stage(_placed(adapt, device))


@stage("fetch")
class Fetch(Stage):
    """Fetch stage: the record with its storage on ``device`` (disk references read), fetch dropped.

    >>> record = Weight(torch.ones(2)).with_stage(Fetch(torch.device("meta")))
    >>> record.stages["fetch"].apply(record)
    Weight((2,) torch.float32 meta, slots=[])
    """

    device: torch.device = optree.dataclasses.field(pytree_node=False)

    def apply(self, record: Weight) -> Weight:
        return _fetched(record, self.device)


def _in_storage(param):
    """``param`` with its tensors in CPU memory."""
    return optree.tree_map(lambda x: x.to("cpu") if isinstance(x, torch.Tensor) else x, param, namespace=NAMESPACE)


def _stored(param, device: torch.device):
    """``param`` as offload keeps it: storage in CPU memory, its adapt stage's tensors (LoRA factors)
    on ``device``, where they are used and trained.

    >>> import dsf
    >>> from dsf.transforms.lora import lora
    >>> adapted = lora(rank=1).init({"q": {"weight": torch.ones(2, 2)}}, dsf.random.key(0))["q"]["weight"]
    >>> kept = _stored(adapted, torch.device("meta"))
    >>> kept.data.device.type, kept.stages["adapt"].adapters["lora"].up.device.type
    ('cpu', 'meta')
    """
    if isinstance(param, Weight) and "adapt" in param.stages:
        return _in_storage(param.without_stage("adapt")).with_stage(_placed(param.stages["adapt"], device))
    return _in_storage(param)


BUFFER_ALIGNMENT = 512  # bytes: where each tensor starts in a block's host buffer (a multiple of every itemsize)


def _pinned_together(params: list) -> list:
    """``params`` (stored by :func:`_stored`) with their CPU tensors copied into one page-locked host
    buffer of exactly their bytes, as views. ``pin_memory()`` would round every tensor up to a power
    of two (FLUX.1-dev bf16: 22.2 GiB of weights in 34.6 GiB). Where the buffer cannot be registered,
    each tensor is pinned alone. A DTensor's local shard is pinned like a plain tensor and re-wrapped
    (same mesh, placements, shape and stride), so its copies to the GPU overlap compute too.
    """
    leaves, structure = optree.tree_flatten(params, namespace=NAMESPACE)
    hosted = [_on_host(x) for x in leaves]
    chosen = [i for i, tensor in enumerate(hosted) if tensor is not None]
    if not chosen:  # weights left on disk
        return params
    offsets, total = [], 0
    for i in chosen:
        offsets.append(total)
        total += -(-hosted[i].nbytes // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
    buffer = _page_locked(total)
    with torch.no_grad():
        for i, offset in zip(chosen, offsets):
            tensor = hosted[i]
            if buffer is None:
                pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
            else:
                pinned = buffer[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            leaves[i] = distributed.shard_like(pinned, leaves[i])
    return optree.tree_unflatten(structure, leaves)


def _on_host(leaf) -> torch.Tensor | None:
    """The CPU tensor a stored leaf keeps (a DTensor's local shard), or None (a weight left on disk)."""
    tensor = leaf.to_local() if distributed.is_sharded(leaf) else leaf
    return tensor if type(tensor) is torch.Tensor and tensor.device.type == "cpu" else None


class _PageLocked(numpy.ndarray):
    """Host bytes page-locked in place; unregistered when the last tensor viewing them is freed
    (``torch.from_numpy`` keeps this array alive exactly as long as its storage)."""

    def __del__(self):
        try:
            _unregister(self.ctypes.data)
        except Exception:  # at interpreter exit the CUDA runtime may be gone before the last weights
            pass


def _page_locked(size: int) -> torch.Tensor | None:
    """``size`` bytes of page-locked host memory as a uint8 tensor, or None where they cannot be registered."""
    array = numpy.empty(max(size, 1), dtype=numpy.uint8)
    if not _register(array.ctypes.data, array.nbytes):
        return None
    return torch.from_numpy(array.view(_PageLocked))


def _register(pointer: int, size: int) -> bool:
    """Page-lock host memory in place (``cudaHostRegister``, portable, as torch's checkpoint stager does)."""
    return int(torch.cuda.cudart().cudaHostRegister(pointer, size, 1)) == 0


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


def _nbytes(param) -> int:
    """The bytes of ``param``'s tensors, of a DTensor the whole tensor's: what ``vram_limit`` keeps resident must be
    the same on every rank (a block gathered ahead on one rank and at use on another would pair the wrong
    collectives), and uneven shards differ in size."""
    leaves = optree.tree_leaves(param, namespace=NAMESPACE)
    return sum(x.nbytes if isinstance(x, DiskTensor) else x.numel() * x.element_size() for x in leaves if _is_data(x))


def _held_bytes(x) -> int:
    """The bytes of a tensor this rank holds (a DTensor's local shard), or of a tensor on disk."""
    if isinstance(x, DiskTensor):
        return x.nbytes
    local = x.to_local() if distributed.is_sharded(x) else x
    return local.numel() * local.element_size()


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
    streamed: dict[tuple, list[int]] = {}
    for i, unit in zip(chosen, units):
        if unit in resident:
            leaves[i] = on_device(leaves[i], device)
        else:
            streamed.setdefault(unit, []).append(i)
    for indices in streamed.values():  # one host buffer per block
        stored = [_stored(leaves[i], device) for i in indices]
        for i, param in zip(indices, _pinned_together(stored) if device.type == "cuda" else stored):
            leaves[i] = as_weight(param).with_stage(Fetch(device))
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
    transfers = _transfers.current()
    if transfers is not None:
        transfers.blocks.append(index)
    return map_with_path(
        lambda _, p: p.stages["fetch"].apply(p) if _needs_fetch(p) else p, block, is_leaf=lambda x: isinstance(x, Weight)
    )


def _uses_streams(device: torch.device) -> bool:
    """Whether fetches to ``device`` copy on a side stream (CUDA) rather than in line."""
    return device.type == "cuda"


class _SideStream:
    """The one CUDA stream a block-offload transform copies on, for all its calls (made at first use):
    the caching allocator keeps memory per stream, so a stream per call would spread the fetched
    blocks over as many pools."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = None

    def get(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return self.stream


class _Prefetcher:
    """The blocks fetched ahead of their turn during one call, keyed by (block list, index).

    On CUDA a fetch is copied on the transform's side stream after the side stream waits for the
    work the compute stream has been given so far (blocks up to i−1 when block i+1 is fetched while
    block i starts); the compute stream waits for the copy's event before the block runs. The
    fetched tensors are not ``record_stream``-ed: the allocator reuses a freed block's memory for
    the next fetch at once, and that fetch's wait orders the copy after the freed block's compute,
    so the memory in flight stays at two blocks however far ahead the CPU runs.
    """

    def __init__(self, device: torch.device, side: _SideStream):
        self.device = device
        self.stream = side.get() if _uses_streams(device) else None
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
            torch.cuda.current_stream(self.device).wait_event(ready)
        return fetched

    def drop(self, blocks: list, index: int) -> None:
        """Forget a block fetched ahead that will not run next. Its copy may still be in flight on
        the side stream, where it was allocated, so only later side-stream copies reuse its memory."""
        self.ahead.pop((id(blocks), index), None)


@stage("fetch")
class ComponentFetch(Stage):
    """Fetch stage of component offload: inside a call, the record's copy on ``device`` from the
    copies of its ``component`` (made when the component is entered); outside one, a plain fetch.

    >>> record = Weight(torch.ones(2)).with_stage(ComponentFetch(torch.device("meta"), "dit", "dit/w"))
    >>> record.stages["fetch"].apply(record)
    Weight((2,) torch.float32 meta, slots=[])
    """

    device: torch.device = optree.dataclasses.field(pytree_node=False)
    component: str = optree.dataclasses.field(pytree_node=False)
    path: str = optree.dataclasses.field(pytree_node=False)

    def apply(self, record: Weight) -> Weight:
        residency = _residency.get()
        return _fetched(record, self.device) if residency is None else residency.copy(self, record)


class _Residency:
    """The one component on the device during a call of a component-offloaded function: its weights'
    copies, each made at its first use; entering another component drops them all first."""

    def __init__(self):
        self.component: str | None = None
        self.copies: dict[tuple[str, int], Weight] = {}

    def copy(self, fetch: ComponentFetch, record: Weight) -> Weight:
        if fetch.component != self.component:
            self.copies.clear()
            self.component = fetch.component
            transfers = _transfers.current()
            if transfers is not None:
                transfers.components.append(fetch.component)
        key = (fetch.path, id(record.data))
        if key not in self.copies:
            self.copies[key] = _fetched(record, fetch.device)
        return self.copies[key]


_residency: contextvars.ContextVar[_Residency | None] = contextvars.ContextVar("dsf_offload_residency", default=None)


def _component_init(params, device: torch.device, keep):
    def store(path: str, param):
        stored = _stored(param, device)
        stored = _pinned_together([stored])[0] if device.type == "cuda" else stored
        return as_weight(stored).with_stage(ComponentFetch(device, path.split("/", 1)[0], path))

    return map_with_path(
        lambda path, p: store(path, p) if _is_param(p) and keep(path, p) else p, params, is_leaf=lambda x: isinstance(x, Weight)
    )


def _component_call(f: Callable) -> Callable:
    @functools.wraps(f)
    def call(params, *args, **kwargs):
        token = _residency.set(_Residency())
        try:
            with open_files():
                return f(params, *args, **kwargs)
        finally:
            _residency.reset(token)

    return call


def offload(
    device: str | torch.device | None = None, level: str = "block", vram_limit: float = 0.0, where: Where = None
) -> Transform:
    """Keep the parameters selected by ``where`` off ``device`` (default: CUDA if available) until used.

    ``level="block"`` streams weight by weight with block prefetch, keeping ``vram_limit`` GiB of
    weights resident; ``level="component"`` moves one component (top-level key) at a time.

    >>> offload("cpu", vram_limit=0.5).name
    'offload(device=cpu, level=block, vram_limit=0.5)'
    >>> offload("cpu", level="component", vram_limit=1)
    Traceback (most recent call last):
    ...
    ValueError: vram_limit=1 applies to level='block'; component offload moves whole components, one at a time (use level='block' to keep part of it resident)
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not isinstance(vram_limit, (int, float)) or vram_limit < 0:
        raise ValueError(f"vram_limit is the GiB of weights kept resident: a number >= 0 (0 streams everything), got {vram_limit!r}")
    if level == "component" and vram_limit:
        raise ValueError(
            f"vram_limit={vram_limit} applies to level='block'; component offload moves whole components, one at a time "
            "(use level='block' to keep part of it resident)"
        )
    keep = as_predicate(where)
    name = f"offload(device={device}, level={level}, vram_limit={vram_limit})"
    if level == "component":
        return Transform(
            name=name,
            init_fn=lambda params, key=None: _component_init(params, device, keep),
            wraps=(FunctionWrap(OFFLOAD_RANK, _component_call, "offload"),),
        )
    side = _SideStream(device)
    prefetch, per_call = look_ahead("offload", OFFLOAD_RANK, lambda: _Prefetcher(device, side), across_lists=True)
    return Transform(
        name=name,
        init_fn=lambda params, key=None: _block_init(params, device, vram_limit, keep),
        hooks=(prefetch,),
        # both wraps share a rank, so their tuple order decides: the files wrap outside per_call, whose fetch at a
        # call's start reads through them
        wraps=(per_call, FunctionWrap(OFFLOAD_RANK, _with_open_files, "offload files")),
    )


def _with_open_files(f: Callable) -> Callable:
    """``f`` reading weights from disk through files opened once per call (:func:`dsf.files.disk.open_files`)."""

    @functools.wraps(f)
    def call(params, *args, **kwargs):
        with open_files():
            return f(params, *args, **kwargs)

    return call
