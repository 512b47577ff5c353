"""Composable transforms, one per module, and the LoRA data functions.

``from dsf.transforms import lora, fp8, offload, checkpoint, shard, compile, load_lora, save_lora, merge_lora, clear_lora``
"""

from dsf.transforms.checkpoint import checkpoint
from dsf.transforms.compile import compile
from dsf.transforms.fp8 import fp8
from dsf.transforms.lora import clear_lora, load_lora, lora, lora_leaves, lora_trainable, merge_lora, save_lora
from dsf.transforms.offload import count_transfers, offload
from dsf.transforms.shard import count_gathers, shard, unshard

__all__ = [
    "checkpoint",
    "clear_lora",
    "compile",
    "count_gathers",
    "count_transfers",
    "fp8",
    "load_lora",
    "lora",
    "lora_leaves",
    "lora_trainable",
    "merge_lora",
    "offload",
    "save_lora",
    "shard",
    "unshard",
]
