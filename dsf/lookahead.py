"""Block look-ahead: a transform prepares the block that runs next while the current one computes.

``offload`` fetches the next block's weights onto the GPU, ``shard`` all-gathers them. Both need
the same two parts, made here by :func:`look_ahead`: a function wrap that gives each call of the
transformed function a fresh preparer (so nothing prepared outlives the call), and a block hook
that takes block ``i`` from the preparer (or as it is, when nothing was prepared) and starts
preparing its neighbor: ``i + 1`` in the forward pass, ``i - 1`` in backward, where checkpointed
blocks recompute in reverse order.

A transform may also opt in to preparing the first block of each block list (``across_lists=True``;
offload does, shard does not: its gathers are collectives that every rank must issue in the same
order, so it keeps the plain neighbor rule). It learns where each call of a function it transforms
goes from list to list: the block the call runs first, and the block that runs after the last block
of each list (the first time it ends in the call), each named by its list's path in the call's
params and its index (found again by path, not identity, since training rebuilds the params tree
each step). The transform's next call prepares that first block before any runs, and any call, at
the last block of a list in the forward pass, prepares the block that followed that list, earlier
in the call or else in the previous call. A path that the call's params do not hold starts nothing.
A block prepared so that is dropped when another block runs next instead, and whatever the call
prepared and did not take is dropped when the call returns (the backward pass gets a fresh
preparer), so a wrong guess holds one block for a while and never leaks.

Example:
    >>> import torch, dsf
    >>> class Doubling:  # prepares a block by doubling its weight, and records what it was asked
    ...     def __init__(self):
    ...         self.ahead, self.log = {}, []
    ...     def start(self, blocks, index):
    ...         self.log.append(index)
    ...         self.ahead[index] = {"w": blocks[index]["w"] * 2}
    ...     def take(self, blocks, index, block):
    ...         return self.ahead.pop(index, block)
    >>> hook, wrap = look_ahead("doubling", rank=10, make=Doubling)
    >>> tx = dsf.Transform("doubling", hooks=(hook,), wraps=(wrap,))
    >>> blocks = [{"w": torch.tensor(1.0)} for _ in range(3)]
    >>> tx(lambda blocks: dsf.run_blocks(lambda p, h: h + p["w"], blocks, torch.tensor(0.0)))(blocks)
    tensor(5.)
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from dsf.transform import BlockHook, BlockSite, FunctionWrap, path_within


class Preparer(Protocol):
    """What a look-ahead transform keeps for one call of the transformed function."""

    def start(self, blocks: Sequence, index: int) -> None:
        """Begin preparing ``blocks[index]``."""

    def take(self, blocks: Sequence, index: int, block):
        """``blocks[index]`` as prepared, or ``block`` (its params as they are) when it was not."""

    def drop(self, blocks: Sequence, index: int) -> None:
        """Forget ``blocks[index]`` if it was prepared (needed with ``across_lists`` only)."""


def in_backward() -> bool:
    """Whether autograd is running a backward pass (the test ``torch.utils.checkpoint`` itself makes).

    >>> in_backward()
    False
    """
    return torch._C._current_graph_task_id() != -1


_Place = tuple[tuple, int]  # a block: the path of its list in the params of a call, and its index there


@dataclass
class _ListOrder:
    """Where one call of a transformed function went from block list to block list: the block it
    ran first, and the block it first ran next after the last block of each list (by list path; a
    sampler's lists run in a loop, and what follows the loop comes once). It holds paths and indices
    only, never the params, so it outlives the call without keeping a tree alive."""

    first: _Place | None = None
    after_last: dict[tuple, _Place] = field(default_factory=dict)


def _resolved(params, place: _Place | None) -> tuple[Sequence, int] | None:
    """The block list at ``place``'s path in ``params`` and ``place``'s index, or None when ``params``
    holds no list there or the list is shorter.

    >>> _resolved({"blocks": [{}, {}]}, (("blocks",), 1))
    ([{}, {}], 1)
    >>> _resolved({"other": [{}]}, (("blocks",), 0)) is None
    True
    """
    if place is None:
        return None
    path, index = place
    node = params
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return None
    return (node, index) if isinstance(node, (list, tuple)) and 0 <= index < len(node) else None


class _ListTracker:
    """The block lists of one call: records their order (for the next call) and, from the order
    learned so far, prepares the block expected when the call starts and when a list's last block
    runs; an expected block that does not come next is dropped at once."""

    def __init__(self, params, previous: _ListOrder | None):
        self.params, self.previous = params, previous or _ListOrder()
        self.order = _ListOrder()
        self.began = False
        self.ended: tuple | None = None  # the path of the list whose last block ran last
        self.expected: tuple[Sequence, int] | None = None  # the block prepared to run next
        self.paths: dict[int, tuple | None] = {}  # id of a block list -> its path in params

    def open(self, preparer: Preparer) -> None:
        """Prepare the block the previous call ran first, found in this call's params."""
        self._expect(preparer, _resolved(self.params, self.previous.first))

    def ran(self, preparer: Preparer, blocks: Sequence, index: int) -> None:
        """Record that ``blocks[index]`` runs, drop the expected block if it was another, and at the
        last block of a list prepare the block that ran after it before (earlier in this call, or
        in the previous call)."""
        if self.expected is not None and (self.expected[0] is not blocks or self.expected[1] != index):
            preparer.drop(*self.expected)
        self.expected = None
        if id(blocks) not in self.paths:
            self.paths[id(blocks)] = path_within(self.params, blocks)
        path = self.paths[id(blocks)]
        place = None if path is None else (path, index)
        if not self.began:
            self.began, self.order.first = True, place
        if self.ended is not None and place is not None:
            self.order.after_last.setdefault(self.ended, place)
        self.ended = path if path is not None and index == len(blocks) - 1 else None
        if self.ended is not None:
            known = self.order.after_last.get(path, self.previous.after_last.get(path))
            self._expect(preparer, _resolved(self.params, known))

    def _expect(self, preparer: Preparer, block: tuple[Sequence, int] | None) -> None:
        if block is not None:
            self.expected = block
            preparer.start(*block)


@dataclass
class _Call:
    """What a look-ahead transform keeps for one call: its preparer and, when it prepares across
    block lists, the call's list tracker."""

    preparer: Preparer
    lists: _ListTracker | None = None


@dataclass
class _Learned:
    """The list order of the last call of a transform (of any function it wraps) that returned."""

    order: _ListOrder | None = None


def look_ahead(
    name: str, rank: int, make: Callable[[], Preparer], across_lists: bool = False
) -> tuple[BlockHook, FunctionWrap]:
    """The block hook and the function wrap, both at ``rank``, of a transform that prepares blocks
    ahead with a fresh ``make()`` per call; see the module example. ``across_lists``: also prepare
    the first block of each block list, in the order the transform's previous call (and this one so
    far) ran them; the preparer then needs ``drop`` too (module docstring).

    >>> import torch, dsf
    >>> class Logged:
    ...     def __init__(self):
    ...         self.ahead = set()
    ...     def start(self, blocks, index):
    ...         self.ahead.add((id(blocks), index))
    ...     def take(self, blocks, index, block):
    ...         log.append((blocks[index]["name"], (id(blocks), index) in self.ahead))
    ...         return block
    ...     def drop(self, blocks, index):
    ...         self.ahead.discard((id(blocks), index))
    >>> hook, wrap = look_ahead("logged", rank=10, make=Logged, across_lists=True)
    >>> tx = dsf.Transform("logged", hooks=(hook,), wraps=(wrap,))
    >>> lists = {f"{x}": [{"name": f"{x}{i}"} for i in range(2)] for x in "ab"}
    >>> f = tx(lambda p: [dsf.run_blocks(lambda b, h: h, p[x], None) for x in "ab"])
    >>> log = []
    >>> _ = f(lists); log  # (block, whether it was prepared): the first call learns the order
    [('a0', False), ('a1', True), ('b0', False), ('b1', True)]
    >>> log = []
    >>> _ = f(lists); log
    [('a0', True), ('a1', True), ('b0', True), ('b1', True)]
    """
    current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(f"dsf_{name}_look_ahead", default=None)

    def hook(call: Callable, site: BlockSite) -> Callable:
        state = current.get()

        def run(block_params, carry, *args, **kwargs):
            preparer = state.preparer
            block = preparer.take(site.blocks, site.index, block_params)
            backward = in_backward()
            if state.lists is not None and not backward:
                state.lists.ran(preparer, site.blocks, site.index)
            neighbor = site.index - 1 if backward else site.index + 1
            if 0 <= neighbor < len(site.blocks):
                preparer.start(site.blocks, neighbor)
            return call(block, carry, *args, **kwargs)

        return run

    learned = _Learned()

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def call(params, *args, **kwargs):
            state = _Call(make(), _ListTracker(params, learned.order) if across_lists else None)
            if state.lists is not None:
                state.lists.open(state.preparer)
            token = current.set(state)
            try:
                result = f(params, *args, **kwargs)
            finally:
                current.reset(token)
                if state.lists is not None:  # drop what was prepared and not taken; backward prepares afresh
                    state.preparer = make()
            if state.lists is not None:
                learned.order = state.lists.order
            return result

        return call

    return BlockHook(rank, hook, name), FunctionWrap(rank, wrap, name)
