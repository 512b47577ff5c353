"""`run_blocks`: the one loop through which models run their repeated blocks.

The block hooks of the active transforms (checkpoint, offload prefetch, compile) wrap each block
call by rank, each on the blocks its ``blocks=`` pattern selects. The block's weight records are
materialized at ``MATERIALIZE_RANK``, inside checkpoint and prefetch, so a checkpointed block
recomputes its materialization in backward instead of keeping fetched or decoded weights alive;
hooks ranked above it (compile) wrap the pure block function itself.

Example:
    >>> import torch
    >>> from dsf.blocks import run_blocks
    >>> blocks = [{"w": torch.full((2, 2), 0.5)} for _ in range(2)]
    >>> run_blocks(lambda p, h, scale: h @ p["w"] * scale, blocks, torch.ones(1, 2), 2.0)
    tensor([[4., 4.]])
    >>> run_blocks(lambda p, h, scale: h @ p["w"] * scale, blocks, torch.ones(1, 2), 2.0, span=range(1, 2))
    tensor([[2., 2.]])
"""

from __future__ import annotations

from typing import Callable, Sequence

from dsf.transform import MATERIALIZE_RANK, BlockSite, active_hooks, block_list_path
from dsf.weight import materialize_tree


def _materializing(block_fn: Callable) -> Callable:
    def call(block_params, carry, *args, **kwargs):
        return block_fn(materialize_tree(block_params), carry, *args, **kwargs)

    return call


def run_blocks(block_fn: Callable, blocks: Sequence, carry, *args, span: range | None = None, **kwargs):
    """``carry = block_fn(block_params_i, carry, *args, **kwargs)`` for each block, hooked.

    ``block_fn`` receives materialized parameters (tensors or forms that ``dsf.ops`` understand);
    ``carry`` is a tensor or a tuple of tensors; ``args``/``kwargs`` are shared by all blocks.
    ``span``: the indices of the blocks to run (default: all). A model that reads states between
    blocks, or stops early, runs its list in spans; each block keeps its index in the whole list,
    so hooks select it by path and a look-ahead transform prepares across the spans of one call.
    """
    hooks = active_hooks()
    list_path = block_list_path(blocks) if any(hook.blocks is not None for hook in hooks) else None
    for index in range(len(blocks)) if span is None else span:
        block = blocks[index]
        site = BlockSite(index=index, blocks=blocks, list_path=list_path)
        selected = [hook for hook in hooks if hook.selects(site)]
        call = block_fn
        for hook in reversed([hook for hook in selected if hook.rank >= MATERIALIZE_RANK]):
            call = hook.wrap(call, site)
        call = _materializing(call)
        for hook in reversed([hook for hook in selected if hook.rank < MATERIALIZE_RANK]):
            call = hook.wrap(call, site)
        carry = call(block, carry, *args, **kwargs)
    return carry
