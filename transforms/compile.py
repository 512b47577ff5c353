"""Regional compilation: ``torch.compile`` on the pure block function that ``run_blocks`` calls.

One compiled body per block function (a model's block kind: FLUX.1's double and single blocks),
reused by every block of that kind, every call, and every ``compile`` transform with the same
settings. The hook ranks above materialization (``COMPILE_RANK``), so weights enter the compiled
body as arguments, already materialized: offload's fetch, shard's gather, fp8's decode and the LoRA
form run eagerly around it, inside checkpoint and prefetch as always. (Materialization cannot be
traced into the compiled body today: dynamo breaks the graph at optree's ``tree_map`` and at the
``ContextVar`` that counts materializations; run eagerly, it keeps offload's streams, shard's
collectives and the counters exact.)

Where ``torch.compile`` cannot run (inductor without a C++ compiler on the CPU or without Triton on
a GPU, a Python that dynamo does not support, a backend that fails), the blocks run eagerly, with
one warning that names the reason and the fix.

Example (compiling runs at the first call, taking seconds per block kind; see tests/test_compile.py):
    >>> import dsf
    >>> from dsf.transforms import checkpoint, compile, lora
    >>> tx = dsf.chain(lora(rank=16), checkpoint(blocks="single_transformer_blocks"), compile())
    >>> [(hook.name, hook.blocks) for hook in tx.hooks]  # tx(loss) or tx(sampler) then compiles at first call
    [('checkpoint', 'single_transformer_blocks'), ('compile', None)]
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import optree
import torch

from dsf.transform import COMPILE_RANK, BlockHook, BlockSite, Transform

_compiled: dict[tuple, Callable] = {}  # (block function, settings, device type) -> its compiled (or eager) body


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device_type`` here, with the fix; ``None`` when it can.

    >>> unavailable_reason("eager", "cpu") is None
    True
    """
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]}; use a Python that torch supports"
    if backend != "inductor":
        return None
    if device_type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            tried = ", ".join(str(c) for c in config.cpp.cxx if c is not None)
            return f"inductor needs a C++ compiler on the CPU and found none (tried {tried}); install g++ or set CXX"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton on a GPU and cannot import it; pip install triton"
    return None


def _device_type(carry) -> str:
    tensors = [x for x in optree.tree_leaves(carry) if isinstance(x, torch.Tensor)]
    return tensors[0].device.type if tensors else "cpu"


def _explain_fallback(reason: str) -> None:
    warnings.warn(f"dsf compile: torch.compile cannot run here: {reason}. The blocks run eagerly "
                  "(same results, no compiled speed).", RuntimeWarning, stacklevel=4)


def _compiled_body(fn: Callable, settings: tuple, device_type: str) -> Callable:
    key = (fn, settings, device_type)
    if key not in _compiled:
        backend, mode, dynamic = settings
        reason = unavailable_reason(backend, device_type)
        if reason is not None:
            _explain_fallback(reason)
            _compiled[key] = fn
        else:
            _compiled[key] = torch.compile(fn, backend=backend, mode=mode, dynamic=dynamic)
    return _compiled[key]


def _compiling(fn: Callable, settings: tuple) -> Callable:
    def run(block_params, carry, *args, **kwargs):
        device_type = _device_type(carry)
        body = _compiled_body(fn, settings, device_type)
        try:
            return body(block_params, carry, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            _explain_fallback(f"the {settings[0]} backend failed ({type(error.inner_exception).__name__}: "
                              f"{str(error.inner_exception).strip().splitlines()[0]})")
            _compiled[(fn, settings, device_type)] = fn
            return fn(block_params, carry, *args, **kwargs)

    return run


def compile(mode: str | None = None, dynamic: bool | None = None, blocks: str | None = None,
            backend: str | Callable = "inductor") -> Transform:
    """Compile the blocks of the transformed function (each one whose path ``blocks`` matches, a regex).

    ``mode`` and ``dynamic`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``; ``dynamic=True``
    for shapes that change from call to call); ``backend`` is torch.compile's, inductor by default.

    >>> compile(mode="max-autotune", blocks="single_transformer_blocks").name
    "compile(mode='max-autotune', dynamic=None, blocks='single_transformer_blocks')"
    """
    settings = (backend, mode, dynamic)

    def wrap(call: Callable, site: BlockSite) -> Callable:
        return _compiling(call, settings)

    hook = BlockHook(rank=COMPILE_RANK, wrap=wrap, name="compile", blocks=blocks)
    return Transform(name=f"compile(mode={mode!r}, dynamic={dynamic!r}, blocks={blocks!r})", hooks=(hook,))
