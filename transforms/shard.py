"""Shard: parameters split over the ranks of a torchrun job, gathered block by block at use (FSDP-style).

``shard()``'s init turns the ``data`` of each selected floating-point parameter into a DTensor split
along its first dimension over :func:`dsf.training.distributed.mesh` (each of ``n`` ranks keeps ``1/n`` of
the rows) and gives its weight record a gather stage. At use, after any fetch (offload) and before
decode (fp8) and adapt (lora), the gather stage all-gathers every DTensor of the record into a plain
tensor: fp8 data travels as bytes, with its scale, and so does any weight another transform encodes
(its decode slot filled, e.g. an outsider's int8: split whatever its dtype, in every chain order);
LoRA factors are plain tensors, whole on every rank. The gathered weights live while their block runs; with ``checkpoint()`` the block gathers
them again in backward instead of keeping them. In backward the gather's reduce-scatter averages
the gradients of sharded trainable leaves over the ranks, each rank keeping its shard; the
optimizer state of such leaves is sharded alike (:func:`dsf.training.distributed.shardwise`).

A block hook, ranked after offload's, gathers the next block while the current one computes (the
previous one in backward under checkpointing); on NCCL the all-gather runs asynchronously and is
waited for when the block uses it. Blocks holding offloaded weights are gathered at use, after
their fetch. Weights outside repeated blocks are gathered at each use.

With ``offload()``, in either chain order, each rank's rows live where offload stores them (host
memory, pinned for a GPU) and only they do; the fetch brings them to the GPU and the gather
all-gathers them there (NCCL gathers GPU memory only). ``shard()`` before offload pins only each
rank's rows, in the block's one buffer; after offload, every rank first holds the whole weights
pinned, and ``shard()`` copies its rows out into pinned memory of their own, tensor by tensor. The
values are the same; chain ``shard()`` first for the smaller host memory. ``fp8()`` over such shards
quantizes each rank's rows where they live, the ranks agreeing on a per-tensor scale first.

The gathers are collectives: every rank must make the same calls (same functions, steps and
blocks); the inputs may differ (each rank its own batch or prompts). With one rank there is nothing
to shard over, and init returns the params unchanged.

Example:
    >>> import torch, dsf
    >>> params = {"blocks": [{"w": torch.eye(2)} for _ in range(2)]}
    >>> t = shard()
    >>> f = lambda p, x: dsf.run_blocks(lambda b, h: h @ b["w"], p["blocks"], x)
    >>> t.init(params) is params, t(f)(params, torch.ones(1, 2)).tolist()   # a single process
    (True, [[1.0, 1.0]])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import optree
import torch

from dsf.training import distributed
from dsf.lookahead import look_ahead
from dsf.tally import Tally
from dsf.transform import GATHER_RANK, Transform
from dsf.tree import NAMESPACE, Where, as_predicate, map_with_path
from dsf.weight import Stage, Weight, as_weight, is_float_weight, map_weights, stage


@dataclass
class Gathers:
    """What gathers assembled inside :func:`count_gathers`: sharded tensors, and the blocks gathered
    ahead of their turn (each block's index in its block list, in the order the gathers began)."""

    tensors: int = 0
    blocks: list[int] = field(default_factory=list)


_gathers = Tally("shard_gathers", Gathers)


@contextlib.contextmanager
def count_gathers() -> Iterator[Gathers]:
    """Count the sharded tensors gathered, and the blocks gathered ahead, inside the block.

    >>> with count_gathers() as gathers:
    ...     pass
    >>> gathers
    Gathers(tensors=0, blocks=[])
    """
    with _gathers.counting() as gathers:
        yield gathers


@stage("gather")
class Gather(Stage):
    """Gather stage: the record with each of its DTensors all-gathered into a plain tensor, gather dropped.

    >>> record = Weight(torch.ones(2)).with_stage(Gather())
    >>> record.stages["gather"].apply(record)
    Weight((2,) torch.float32 cpu, slots=[])
    """

    def apply(self, record: Weight) -> Weight:
        gathers = _gathers.current()
        if gathers is not None:
            gathers.tensors += sum(map(distributed.is_sharded, optree.tree_leaves(record, namespace=NAMESPACE)))
        return optree.tree_map(distributed.gathered, record.without_stage("gather"), namespace=NAMESPACE)


def _is_record(x) -> bool:
    return isinstance(x, Weight)


def _needs_gather(param) -> bool:
    return _is_record(param) and "gather" in param.stages


def _records(block) -> list[Weight]:
    return [p for p in optree.tree_leaves(block, is_leaf=_is_record, namespace=NAMESPACE) if _is_record(p)]


def _gatherable_ahead(block) -> bool:
    """Whether a block can be gathered before its turn: it holds sharded weights and no weight to fetch first."""
    records = _records(block)
    return any("gather" in r.stages for r in records) and not any("fetch" in r.stages for r in records)


def _gathered_block(block, index: int):
    gathers = _gathers.current()
    if gathers is not None:
        gathers.blocks.append(index)
    return map_with_path(lambda _, p: p.stages["gather"].apply(p) if _needs_gather(p) else p, block, is_leaf=_is_record)


class _Gatherer:
    """The blocks gathered ahead of their turn during one call, keyed by (block list, index)."""

    def __init__(self):
        self.ahead: dict[tuple[int, int], object] = {}

    def start(self, blocks: list, index: int) -> None:
        key = (id(blocks), index)
        if key not in self.ahead and _gatherable_ahead(blocks[index]):
            self.ahead[key] = _gathered_block(blocks[index], index)

    def take(self, blocks: list, index: int, block):
        return self.ahead.pop((id(blocks), index), block)


def _sharded(path: str, param, device_mesh) -> Weight:
    record = as_weight(param).with_stage(Gather())
    if not isinstance(record.data, torch.Tensor):
        raise ValueError(
            f"shard cannot split {path!r}: it is still on disk ({record.data!r}); load the weights into memory "
            "(dsf.files.io.load_state_dict) to shard them"
        )
    stored = "fetch" in record.stages  # offload keeps the data off the compute device: each rank's rows stay there
    return Weight(distributed.distribute(record.data, device_mesh, keep_device=stored), record.stages)


def shard(where: Where = None) -> Transform:
    """Split the floating-point parameters selected by ``where`` over the ranks of the job; gather them at use.

    >>> shard(where=r"^dit/").name
    "shard(where='^dit/')"
    """
    keep = as_predicate(where)

    def init(params, key=None):
        if distributed.world().size == 1:
            return params
        device_mesh = distributed.mesh()
        return map_weights(
            lambda path, param: _sharded(path, param, device_mesh),
            params,
            where=lambda path, param: keep(path, param) and is_float_weight(param),
        )

    gather_ahead, per_call = look_ahead("shard", GATHER_RANK, _Gatherer)
    return Transform(name=f"shard(where={where!r})", init_fn=init, hooks=(gather_ahead,), wraps=(per_call,))


def unshard(params):
    """``params`` with every sharded weight gathered whole on every rank (a collective), e.g. to save them.

    >>> unshard({"w": Weight(torch.ones(1)).with_stage(Gather())})
    {'w': tensor([1.])}
    """

    def whole(path: str, record: Weight):
        with torch.no_grad():
            gathered = record.stages["gather"].apply(record)
        return gathered if gathered.stages else gathered.data

    return map_weights(whole, params, where=lambda _, param: _needs_gather(param))
