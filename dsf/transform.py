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

Writing a transform
-------------------
A transform is a :class:`Transform` record of up to three pieces; anyone can write one, and it
composes with dsf's own in every chain order when it keeps these rules:

- ``init(params, key)`` sees the tree as the transforms chained before it left it: plain tensors and
  :class:`dsf.weight.Weight` records whose slots (fetch, gather, decode, adapt) earlier stages filled,
  with their storage (data on the CPU or on disk, DTensor shards, fp8 or int8 bytes, LoRA factors). It
  returns a new tree and changes nothing in place. Randomness comes from ``key`` (folded with the
  transform's name, so chain position does not change it).
- A transform that stores weights (fills a slot) follows the guide in :mod:`dsf.weight`: claim a slot
  only when it is free (:func:`dsf.weight.check_slot_free`, refused at init with an error naming the
  transform, the weight and the stage there), select weights by ``where=`` and shape rather than by the
  dtype of their data (:func:`dsf.weight.is_float_weight`), and keep the stages already there. Its
  complete example, an int8 storage transform, is in that module's docstring.
- ``hooks`` (:class:`BlockHook`) wrap each block ``run_blocks`` runs, ordered by their fixed rank, not
  by chain order; a hook ranked below ``MATERIALIZE_RANK`` sees stored records, one above it plain
  tensors. A hook uses ``try/finally`` for what it holds (see :class:`BlockHook`).
- ``wraps`` (:class:`FunctionWrap`) wrap the whole function, ordered by rank too.
"""

from __future__ import annotations

import contextvars
import functools
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from dsf.random import Key, fold_in

# Block-hook ranks: lower ranks wrap outside higher ranks. Weight records are materialized at
# MATERIALIZE_RANK: hooks ranked below it wrap the call on stored records, hooks ranked above it
# (compile) wrap the pure block function, which receives materialized parameters.
CHECKPOINT_RANK = 0
OFFLOAD_RANK = 10
GATHER_RANK = 15
MATERIALIZE_RANK = 18
COMPILE_RANK = 20


@dataclass(frozen=True)
class BlockSite:
    """Where a hooked block runs: its index in the block list being run, that list, and the list's
    path in the parameters of the transformed call (``None`` when the list is not found there)."""

    index: int
    blocks: list
    list_path: str | None = None

    @property
    def path(self) -> str | None:
        """The block's own path, e.g. ``"single_transformer_blocks/3"``."""
        if self.list_path is None:
            return None
        return f"{self.list_path}/{self.index}" if self.list_path else str(self.index)


@dataclass(frozen=True, eq=False)
class BlockHook:
    """``wrap(block_call, site) -> block_call``; ``block_call(block_params, carry, *args, **kwargs) -> carry``.

    ``blocks``: the blocks the hook wraps, a regex searched (``re.search``) in each block's path in
    the params of the transformed call (e.g. ``"single_transformer_blocks"`` matches
    ``transformer/single_transformer_blocks/3``); ``None`` wraps every block.

    The contract: a hook may see an exception pass through it without its block finishing, because
    checkpoint's recompute in backward stops early by raising once it has what backward needs. A
    hook that logs, times or holds a resource therefore uses ``try/finally``:

    >>> import torch, dsf
    >>> from dsf.transforms import checkpoint
    >>> log = []
    >>> def timing(call, site):
    ...     def run(block_params, carry, *args, **kwargs):
    ...         log.append("enter")
    ...         try:
    ...             return call(block_params, carry, *args, **kwargs)
    ...         except BaseException as error:
    ...             log.append(type(error).__name__)
    ...             raise
    ...         finally:
    ...             log.append("exit")
    ...     return run
    >>> timer = dsf.Transform("timer", hooks=(BlockHook(rank=5, wrap=timing, blocks="blocks"),))
    >>> f = lambda p, x: dsf.run_blocks(lambda b, h: torch.tanh(h @ b["w"]), p["blocks"], x).sum()
    >>> _ = dsf.grad(dsf.chain(checkpoint(), timer)(f))({"blocks": [{"w": torch.eye(2)}]}, torch.ones(1, 2))
    >>> log  # the forward, then the recompute in backward, stopped early by an exception
    ['enter', 'exit', 'enter', '_StopRecomputationError', 'exit']
    """

    rank: int
    wrap: Callable[[Callable, BlockSite], Callable]
    name: str = "hook"
    blocks: str | None = None

    def selects(self, site: BlockSite) -> bool:
        """Whether this hook wraps the block at ``site``; an error when it selects blocks by path
        and the block list has none."""
        if self.blocks is None:
            return True
        if site.path is None:
            raise ValueError(
                f"{self.name}(blocks={self.blocks!r}) cannot tell which blocks run: run_blocks got a block list "
                "that is not inside the params of the transformed call; pass the list from the params tree "
                "itself (not a slice or a copy), or drop blocks= to wrap every block"
            )
        return re.search(self.blocks, site.path) is not None


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
        inner = _seen_as_root(f)
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


_param_roots: contextvars.ContextVar[tuple] = contextvars.ContextVar("dsf_param_roots", default=())


def _seen_as_root(f: Callable) -> Callable:
    """``f`` that records its params (as the whole function wraps left them) for :func:`block_list_path`."""

    @functools.wraps(f)
    def call(params, *args, **kwargs):
        token = _param_roots.set(_param_roots.get() + (params,))
        try:
            return f(params, *args, **kwargs)
        finally:
            _param_roots.reset(token)

    return call


def path_within(node, target, prefix: tuple = ()) -> tuple | None:
    """The keys from ``node`` down to the object ``target`` itself (found by identity) in nested dicts, lists and
    tuples, after ``prefix``; None when ``node`` does not hold it.

    >>> blocks = [{}, {}]
    >>> path_within({"dit": {"blocks": blocks}}, blocks)
    ('dit', 'blocks')
    """
    if node is target:
        return prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, child in children:
        if isinstance(child, (dict, list, tuple)):
            found = path_within(child, target, (*prefix, key))
            if found is not None:
                return found
    return None


def block_list_path(blocks) -> str | None:
    """The "/"-joined path of the list ``blocks`` in the params of the outermost transformed call
    in progress that holds it (``None`` when none does).

    >>> params = {"transformer": {"single_transformer_blocks": [{}]}}
    >>> Transform("seen")(lambda p: block_list_path(p["transformer"]["single_transformer_blocks"]))(params)
    'transformer/single_transformer_blocks'
    """
    for root in _param_roots.get():
        found = path_within(root, blocks)
        if found is not None:
            return "/".join(str(key) for key in found)
    return None
