"""fp8 storage of frozen weights: float8_e4m3fn data and a scale, dequantized to the compute dtype at use.

``fp8()``'s init replaces each selected matrix (ndim ≥ 2; biases and norm scales keep their dtype)
by a weight record whose ``data`` is float8 and whose decode stage holds the scale: one per tensor,
or one per output channel (row). Materialization computes ``data.to(dtype) * scale``. Bytes halve
against bf16; nothing computes in fp8.

A weight another transform already stores (its decode slot filled: an outsider's int8, a dtype
cast) is refused at init, in every chain order (the guide in :mod:`dsf.weight`).

A checkpoint published in fp8 loads as fp8 records already (:mod:`dsf.files.quantized`: the file's float8 tensors
as they are, at the scales it gives, e.g. ComfyUI's scaled fp8, or 1): ``fp8()`` keeps those records, neither
re-quantizing nor upcasting them, and only sets their compute dtype to its own. Float8 tensors made outside a
loader become the storage at scale 1; without ``fp8()`` such raw tensors cannot compute (``ops.linear`` says so).
The record is :mod:`dsf.float8`'s.

fp8 weights get no gradient. What trains is said once, by the paradigm's ``where=``
(:class:`dsf.training.paradigm.Paradigm`): a paradigm whose ``where`` selects an fp8 weight fails
at init, whatever the chain order; ``dsf.value_and_grad`` refusing float8 leaves is the second line. LoRA over an fp8 base trains: its factors are separate
leaves of the adapt stage, run after decode.

Example:
    >>> import torch, dsf
    >>> from dsf.transforms.fp8 import fp8
    >>> params = {"w": torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(4)}
    >>> stored = fp8(compute_dtype=torch.float32).init(params)
    >>> stored["w"].data.dtype, stored["b"].dtype
    (torch.float8_e4m3fn, torch.float32)
    >>> bool((dsf.materialize(stored["w"]) - params["w"]).abs().max() <= params["w"].abs().max() / 16)  # 3 mantissa bits
    True
"""

from __future__ import annotations

import math

import torch

from dsf.files.disk import DiskTensor
from dsf.float8 import FP8, FP8_MAX, Dequantize, is_float8
from dsf.training import distributed
from dsf.transform import Transform
from dsf.tree import Where, as_predicate
from dsf.weight import Weight, as_weight, check_slot_free, is_float_weight, map_weights

GRANULARITIES = ("tensor", "channel")


def quantize(
    weight: torch.Tensor, granularity: str = "tensor", amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale)``: float8_e4m3fn data and the float32 scale with ``weight ≈ data * scale``.

    The scale maps the largest magnitude (of the tensor, or of each output channel) to the fp8
    maximum 448; an all-zero tensor or channel gets scale 1, never a NaN. One float32 copy of the
    weight is made, and worked on in place. ``amax`` (per tensor) is the largest magnitude to scale
    by instead of the weight's own: a rank's shard scales by the whole tensor's
    (:func:`dsf.training.distributed.quantized_shards`).

    >>> data, scale = quantize(torch.tensor([[1.0, -2.0], [0.0, 0.0]]), "channel")
    >>> data.dtype, scale.flatten().tolist()
    (torch.float8_e4m3fn, [0.004464285913854837, 1.0])
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if amax is not None and granularity != "tensor":
        raise ValueError(
            f"amax is the largest magnitude of the whole tensor: it scales granularity='tensor', got {granularity!r}"
        )
    weight = weight.detach().to(torch.float32, copy=True)
    if amax is None:
        channels = granularity == "channel" and weight.ndim
        rows = weight.reshape(len(weight), math.prod(weight.shape[1:])) if channels else weight.reshape(1, -1)
        low, high = torch.aminmax(rows, dim=1, keepdim=True)
        amax = torch.maximum(-low, high)
        amax = amax.reshape(weight.shape[0], *[1] * (weight.ndim - 1)) if granularity == "channel" else amax.reshape(())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return weight.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8(where: Where = None, granularity: str = "tensor", compute_dtype: torch.dtype = torch.bfloat16) -> Transform:
    """Store the frozen matrices selected by ``where`` in fp8, dequantized to ``compute_dtype`` at use.

    >>> t = fp8(granularity="channel")
    >>> t.name
    'fp8(granularity=channel, compute_dtype=bfloat16)'
    >>> t.init({"w": torch.ones(3, 2)})["w"].stages["decode"].scale.shape
    torch.Size([3, 1])
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    keep = as_predicate(where)

    def selected(path: str, param) -> bool:
        return keep(path, param) and is_float_weight(param) and (len(as_weight(param).shape) >= 2 or is_float8(param))

    def init(params, key=None):
        return map_weights(lambda path, param: _stored_in_fp8(path, param, granularity, compute_dtype), params, selected)

    return Transform(
        name=f"fp8(granularity={granularity}, compute_dtype={str(compute_dtype).removeprefix('torch.')})", init_fn=init
    )


def _stored_in_fp8(path: str, param, granularity: str, compute_dtype: torch.dtype) -> Weight:
    record = as_weight(param)
    if isinstance(record.stages.get("decode"), Dequantize):  # loaded from a file published in fp8: kept as it is
        decoded = record.stages["decode"]
        return record.without_stage("decode").with_stage(Dequantize(decoded.scale, compute_dtype))
    check_slot_free("fp8", path, param, "decode")
    if isinstance(record.data, DiskTensor):
        raise ValueError(
            f"fp8 cannot quantize {path!r}: it is still on disk ({record.data!r}); load the weights into memory "
            "(dsf.files.io.load_state_dict) to store them in fp8, or stream them from disk in their stored dtype"
        )
    if is_float8(record):  # float8 numbers made outside a loader: they are the storage, read at scale 1
        return record.with_stage(Dequantize(_like(torch.ones(()), record.data), compute_dtype))
    if distributed.is_sharded(record.data):  # each rank quantizes its rows where they live (a CPU shard under offload)
        data, scale = distributed.quantized_shards(quantize, record.data, granularity)
        return Weight(data, record.stages).with_stage(Dequantize(scale, compute_dtype))
    data, scale = quantize(record.data, granularity)
    stored = Weight(_like(data, record.data), record.stages)
    return stored.with_stage(Dequantize(_like(scale, record.data), compute_dtype))


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` kept where ``reference`` lives: its device, and pinned memory when it is pinned."""
    tensor = tensor.to(reference.device)
    return tensor.pin_memory() if reference.is_pinned() else tensor
