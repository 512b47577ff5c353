"""The LoRA of a LoRA run as one transform of the paradigm's chain, from the recipes' LoRA flags.

>>> import argparse, torch, dsf
>>> args = argparse.Namespace(lora_checkpoint=None, lora_rank=2, lora_alpha=None, lora_target_modules="q")
>>> params = {"dit": {"q": {"weight": torch.ones(4, 4)}}, "t5": {"q": {"weight": torch.ones(4, 4)}}}
>>> adapted = trained_lora(args).init(params, dsf.random.key(0))
>>> sorted(dsf.tree.select(adapted, dsf.transforms.lora_trainable))
['dit/q/weight/adapt/adapters/lora/down', 'dit/q/weight/adapt/adapters/lora/up']
"""

from __future__ import annotations

from dsf.transform import Transform
from dsf.transforms import load_lora, lora
from dsf.transforms.lora import TRAINED


def continued_lora(path) -> Transform:
    """The LoRA file at ``path`` attached to the DiT (``params["dit"]``) as the adapter that trains.

    >>> continued_lora("step-4.safetensors").name
    "continued_lora('step-4.safetensors')"
    """
    return Transform(name=f"continued_lora({str(path)!r})",
                     init_fn=lambda params, key=None: {**params, "dit": load_lora(params["dit"], path, name=TRAINED)})


def trained_lora(args) -> Transform:
    """The LoRA that trains: --lora_checkpoint continued, or a new one of --lora_rank and --lora_alpha on the
    DiT's --lora_target_modules."""
    if args.lora_checkpoint:
        return continued_lora(args.lora_checkpoint)
    return lora(args.lora_rank, args.lora_alpha, where=r"^dit/", targets=args.lora_target_modules)
