"""Gradient checkpointing per block (non-reentrant), optionally keeping saved activations on the CPU.

Inside a checkpointed block nothing is saved for backward but the block's inputs; the block (its
weight materialization included) runs again during backward. With ``offload_activations=True`` the
saved block inputs, every tensor of a tuple carry included, live in CPU memory (pinned when CUDA is
available) until backward needs them.
When gradients are off (sampling) the hook steps aside, so one transform object serves the sampler
and the loss. ``blocks=`` checkpoints only the blocks whose path matches, a common memory/speed
trade (e.g. ``checkpoint(blocks="single_transformer_blocks")`` on FLUX.1).

Example:
    >>> import torch, dsf
    >>> from dsf.transforms import checkpoint
    >>> blocks = [{"w": torch.eye(2)} for _ in range(2)]
    >>> f = lambda p, x: dsf.run_blocks(lambda b, h: torch.tanh(h @ b["w"]), p, x).sum()
    >>> dsf.grad(checkpoint()(f))(blocks, torch.ones(1, 2))[0]["w"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import contextlib

import optree
import torch
import torch.utils.checkpoint

from dsf.transform import CHECKPOINT_RANK, BlockHook, BlockSite, Transform


def _checkpointed(call, site: BlockSite, offload_activations: bool):
    def run(block_params, carry, *args, **kwargs):
        if not torch.is_grad_enabled():
            return call(block_params, carry, *args, **kwargs)
        saving = (
            torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            if offload_activations
            else contextlib.nullcontext()
        )
        carried, structure = optree.tree_flatten(carry)

        def flat_call(block_params, *flat_and_args, **kwargs):
            rebuilt = optree.tree_unflatten(structure, flat_and_args[: len(carried)])
            return call(block_params, rebuilt, *flat_and_args[len(carried) :], **kwargs)

        with saving:  # the carry's tensors go in as top-level arguments: torch saves (and offloads) only those
            return torch.utils.checkpoint.checkpoint(
                flat_call, block_params, *carried, *args, use_reentrant=False, **kwargs
            )

    return run


def checkpoint(offload_activations: bool = False, blocks: str | None = None) -> "Transform":
    """Recompute each block (each one whose path ``blocks`` matches, a regex) in backward instead of
    keeping its activations.

    >>> checkpoint(offload_activations=True).name
    'checkpoint(offload_activations=True)'
    >>> checkpoint(blocks="single_transformer_blocks").name
    "checkpoint(offload_activations=False, blocks='single_transformer_blocks')"
    """
    hook = BlockHook(
        rank=CHECKPOINT_RANK,
        wrap=lambda call, site: _checkpointed(call, site, offload_activations),
        name="checkpoint",
        blocks=blocks,
    )
    selection = "" if blocks is None else f", blocks={blocks!r}"
    return Transform(name=f"checkpoint(offload_activations={offload_activations}{selection})", hooks=(hook,))
