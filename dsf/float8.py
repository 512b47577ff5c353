"""fp8 weight records: float8 data and a scale, dequantized to a compute dtype at use.

The record the ``fp8()`` transform makes (:mod:`dsf.transforms.fp8`), and the one a checkpoint published in fp8
loads as (:mod:`dsf.files.quantized`): ``Weight(data, {"decode": Dequantize(scale, dtype)})``, ``data`` in
``float8_e4m3fn`` or ``float8_e5m2``, ``scale`` float32, one per tensor (shape ``()``) or one per output channel
(shape ``(out, 1, ...)``). Materialization computes ``data * scale`` in float32 and rounds once to ``dtype``.

Example:
    >>> import torch, dsf
    >>> record = fp8_record(torch.tensor([1.0, -2.0]).to(FP8), torch.tensor(0.5), torch.float32)
    >>> dsf.materialize(record).tolist()
    [0.5, -1.0]
"""

from __future__ import annotations

import optree
import torch

from dsf.weight import Stage, Weight, stage

FP8 = torch.float8_e4m3fn
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8).max  # 448


@stage("decode")
class Dequantize(Stage):
    """Decode stage of an fp8 weight: ``data.to(dtype) * scale`` (scale () per tensor, (out, 1, ...) per channel).

    >>> Dequantize(torch.tensor(2.0), torch.float32).apply(torch.ones(2, dtype=FP8)).tolist()
    [2.0, 2.0]
    """

    scale: torch.Tensor
    dtype: torch.dtype = optree.dataclasses.field(pytree_node=False)

    def apply(self, value):
        return dequantize(value, self.scale, self.dtype)


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``data * scale`` in ``dtype``, multiplied in float32 and rounded once (a bf16 scale would add a
    rounding of its own, the same bias over a whole tensor).

    >>> dequantize(torch.tensor([3.0, -1.5]).to(FP8), torch.tensor(2.0), torch.float32).tolist()
    [6.0, -3.0]
    """
    return (data.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fp8_record(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Weight:
    """The weight record of float8 ``data`` at ``scale`` (float32), decoded to ``dtype``.

    >>> fp8_record(torch.zeros(3, 2).to(FP8), torch.ones(3, 1), torch.bfloat16).stages["decode"].scale.shape
    torch.Size([3, 1])
    """
    if data.dtype not in FLOAT8_DTYPES:
        raise TypeError(f"an fp8 record holds float8 data ({', '.join(map(str, FLOAT8_DTYPES))}), got {data.dtype}")
    return Weight(data).with_stage(Dequantize(scale.to(torch.float32), dtype))


def is_float8(param) -> bool:
    """Whether a parameter's stored data is float8 (a tensor, or a weight record's data).

    >>> is_float8(torch.zeros(1, dtype=FP8)), is_float8(Weight(torch.zeros(1)))
    (True, False)
    """
    data = param.data if isinstance(param, Weight) else param
    return getattr(data, "dtype", None) in FLOAT8_DTYPES
