"""Transforms: small records of pure pieces, composed with `chain`, applied to functions with `tx(f)`.

A :class:`Transform` has
- ``init(params, key) -> params`` (built from ``init_fn``): run once on the tree (installs weight stages, adds LoRA factors);
- ``hooks``: block hooks with a fixed rank, wrapped around every block that ``run_blocks`` runs;
- ``wraps``: ranked wrappers around the whole function (e.g. moving a component to the device).

``t(f)`` returns a function with ``f``'s signature (first argument: params) that runs ``f`` with the
transform's hooks installed in a context variable scoped to the call. Hooks and wraps are ordered by
rank, not by chain order, so ``chain(a, b)`` and ``chain(b, a)`` build the same function.

Example:
    >>> import torch, dsf
    >>> from dsf.transforms import checkpoint
    >>> def loss(params, x):
    ...     return dsf.run_blocks(lambda p, h: torch.tanh(h @ p["w"]), params["blocks"], x).sum()
    >>> params = {"blocks": [{"w": torch.eye(2)} for _ in range(3)]}
    >>> t = dsf.chain(checkpoint())
    >>> params = t.init(params, dsf.random.key(0))
    >>> bool(t(loss)(params, torch.ones(1, 2)) == loss(params, torch.ones(1, 2)))
    True
"""

from __future__ import annotations

import contextvars
import functools
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from dsf.random import Key, fold_in

# Block-hook ranks: lower ranks wrap outside higher ranks.
CHECKPOINT_RANK = 0
OFFLOAD_RANK = 10
GATHER_RANK = 15
COMPILE_RANK = 20


@dataclass(frozen=True)
class BlockSite:
    """Where a hooked block runs: its index in the block list being run and that list."""

    index: int
    blocks: list


@dataclass(frozen=True, eq=False)
class BlockHook:
    """``wrap(block_call, site) -> block_call``; ``block_call(block_params, carry, *args, **kwargs) -> carry``."""

    rank: int
    wrap: Callable[[Callable, BlockSite], Callable]
    name: str = "hook"


@dataclass(frozen=True, eq=False)
class FunctionWrap:
    """``wrap(f) -> f'`` around the whole transformed function, ordered by rank (lower is outer)."""

    rank: int
    wrap: Callable[[Callable], Callable]
    name: str = "wrap"


def _identity_init(params, key: Key | None = None):
    return params


@dataclass(frozen=True, eq=False)
class Transform:
    """A composable function transform; see the module docstring."""

    name: str
    init_fn: Callable[..., Any] = _identity_init
    hooks: tuple[BlockHook, ...] = field(default_factory=tuple)
    wraps: tuple[FunctionWrap, ...] = field(default_factory=tuple)
    parts: tuple["Transform", ...] = field(default_factory=tuple)

    def init(self, params, key: Key | None = None):
        """Run once on the tree. The key a transform sees depends on its name, not its chain position."""
        if self.parts:
            return self.init_fn(params, key)
        return self.init_fn(params, None if key is None else fold_in(key, zlib.crc32(self.name.encode())))

    def __call__(self, f: Callable) -> Callable:
        inner = f
        for w in sorted(self.wraps, key=lambda w: w.rank, reverse=True):
            inner = w.wrap(inner)

        @functools.wraps(f)
        def transformed(params, *args, **kwargs):
            token = _active_hooks.set(_merge_hooks(_active_hooks.get(), self.hooks))
            try:
                return inner(params, *args, **kwargs)
            finally:
                _active_hooks.reset(token)

        return transformed

    def __repr__(self) -> str:
        return f"Transform({self.name})"


def chain(*transforms: Transform) -> Transform:
    """One transform applying all of ``transforms``: inits in sequence, hooks and wraps by rank.

    Nested chains flatten: ``chain(a, chain(b, c))`` is ``chain(a, b, c)``.

    >>> chain().name
    'chain()'
    """
    parts = tuple(p for t in transforms for p in (t.parts or (t,)))

    def init(params, key: Key | None = None):
        for t in parts:
            params = t.init(params, key)
        return params

    return Transform(
        name=f"chain({', '.join(t.name for t in parts)})",
        init_fn=init,
        hooks=tuple(h for t in parts for h in t.hooks),
        wraps=tuple(w for t in parts for w in t.wraps),
        parts=parts,
    )


_active_hooks: contextvars.ContextVar[tuple[BlockHook, ...]] = contextvars.ContextVar("dsf_block_hooks", default=())


def _merge_hooks(active: tuple[BlockHook, ...], new: tuple[BlockHook, ...]) -> tuple[BlockHook, ...]:
    return active + tuple(h for h in new if all(h is not a for a in active))


def active_hooks() -> tuple[BlockHook, ...]:
    """The block hooks installed by the transforms of the calls in progress, outermost rank first."""
    return tuple(sorted(_active_hooks.get(), key=lambda h: h.rank))
