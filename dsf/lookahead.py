"""Block look-ahead: a transform prepares the block that runs next while the current one computes.

``offload`` fetches the next block's weights onto the GPU, ``shard`` all-gathers them. Both need
the same two parts, made here by :func:`look_ahead`: a function wrap that gives each call of the
transformed function a fresh preparer (so nothing prepared outlives the call), and a block hook
that takes block ``i`` from the preparer (or as it is, when nothing was prepared) and starts
preparing its neighbor: ``i + 1`` in the forward pass, ``i - 1`` in backward, where checkpointed
blocks recompute in reverse order.

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
from typing import Callable, Protocol, Sequence

import torch

from dsf.transform import BlockHook, BlockSite, FunctionWrap


class Preparer(Protocol):
    """What a look-ahead transform keeps for one call of the transformed function."""

    def start(self, blocks: Sequence, index: int) -> None:
        """Begin preparing ``blocks[index]``."""

    def take(self, blocks: Sequence, index: int, block):
        """``blocks[index]`` as prepared, or ``block`` (its params as they are) when it was not."""


def in_backward() -> bool:
    """Whether autograd is running a backward pass (the test ``torch.utils.checkpoint`` itself makes).

    >>> in_backward()
    False
    """
    return torch._C._current_graph_task_id() != -1


def look_ahead(name: str, rank: int, make: Callable[[], Preparer]) -> tuple[BlockHook, FunctionWrap]:
    """The block hook and the function wrap, both at ``rank``, of a transform that prepares blocks
    ahead with a fresh ``make()`` per call; see the module example."""
    current: contextvars.ContextVar[Preparer | None] = contextvars.ContextVar(f"dsf_{name}_look_ahead", default=None)

    def hook(call: Callable, site: BlockSite) -> Callable:
        preparer = current.get()

        def run(block_params, carry, *args, **kwargs):
            block = preparer.take(site.blocks, site.index, block_params)
            neighbor = site.index - 1 if in_backward() else site.index + 1
            if 0 <= neighbor < len(site.blocks):
                preparer.start(site.blocks, neighbor)
            return call(block, carry, *args, **kwargs)

        return run

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def call(params, *args, **kwargs):
            token = current.set(make())
            try:
                return f(params, *args, **kwargs)
            finally:
                current.reset(token)

        return call

    return BlockHook(rank, hook, name), FunctionWrap(rank, wrap, name)
