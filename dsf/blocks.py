"""`run_blocks`: the one loop through which models run their repeated blocks.

The block hooks of the active transforms (checkpoint, offload prefetch, compile) wrap each block
call by rank; the block's weight records are materialized inside the innermost wrapper, so a
checkpointed block recomputes its materialization in backward instead of keeping fetched or
decoded weights alive.

Example:
    >>> import torch
    >>> from dsf.blocks import run_blocks
    >>> blocks = [{"w": torch.full((2, 2), 0.5)} for _ in range(2)]
    >>> run_blocks(lambda p, h, scale: h @ p["w"] * scale, blocks, torch.ones(1, 2), 2.0)
    tensor([[4., 4.]])
"""

from __future__ import annotations

from typing import Callable, Sequence

from dsf.transform import BlockSite, active_hooks
from dsf.weight import materialize_tree


def run_blocks(block_fn: Callable, blocks: Sequence, carry, *args, **kwargs):
    """``carry = block_fn(block_params_i, carry, *args, **kwargs)`` for each block, hooked.

    ``block_fn`` receives materialized parameters (tensors or forms that ``dsf.ops`` understand);
    ``carry`` is a tensor or a tuple of tensors; ``args``/``kwargs`` are shared by all blocks.
    """
    hooks = active_hooks()

    def body(block_params, carry, *a, **kw):
        return block_fn(materialize_tree(block_params), carry, *a, **kw)

    for index, block in enumerate(blocks):
        site = BlockSite(index=index, blocks=blocks)
        call = body
        for hook in reversed(hooks):
            call = hook.wrap(call, site)
        carry = call(block, carry, *args, **kwargs)
    return carry
