"""Reading back what training saved: the trained leaves of a step file put into a parameter tree.

:func:`dsf.training.train.train` writes ``step-{N}.safetensors`` (and ``step-{N}-ema.safetensors``) with
the trained leaves under their "."-joined tree paths (``dit.blocks.0.qkv.weight.adapt.adapters.lora.down``
for a LoRA factor). :func:`load_trainable` puts them back into a tree of the same structure, e.g. the
transform stack's ``init`` of the base params; :func:`dsf.transforms.load_lora` attaches a LoRA step
file to an unadapted tree.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dsf.training.checkpoint import save_safetensors
    >>> file = Path(tempfile.mkdtemp()) / "step-1.safetensors"
    >>> save_safetensors(file, {"dit.w": torch.ones(2)})
    >>> load_trainable({"dit": {"w": torch.zeros(2), "b": torch.zeros(1)}}, file)["dit"]["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import os

import torch

from dsf.files.io import load_state_dict
from dsf.tree import leaves_with_paths, map_with_path

EXAMPLES = 5  # keys shown in errors


def _checked_leaf(path: str, saved: torch.Tensor, leaf) -> torch.Tensor:
    if not isinstance(leaf, torch.Tensor) or tuple(saved.shape) != tuple(leaf.shape):
        have = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
        raise ValueError(f"the step file's {path!r} is {tuple(saved.shape)} but params hold {have} there: "
                         "the file is for another model size or transform stack")
    return saved.to(dtype=leaf.dtype, device=leaf.device)


def load_trainable(params, step_file: str | os.PathLike):
    """``params`` with the leaves saved in a training step file in place of theirs (the others kept).

    ``params`` must have the trained tree's structure: for a LoRA run, the paradigm's
    ``transforms.init(base_params, key)`` (the factors' values are then replaced, the scale is the
    transform's own). Each saved leaf keeps the dtype and device of the leaf it replaces; a key that
    names no leaf of ``params`` is an error that shows the tree's paths.
    """
    saved = load_state_dict(step_file)
    leaves = dict(leaves_with_paths(params))
    by_key = {path.replace("/", "."): path for path in leaves}
    unknown = sorted(key for key in saved if key not in by_key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} leaves of {os.fspath(step_file)!r} are not in params, e.g. {unknown[:EXAMPLES]}; params' leaves "
            f"look like {list(by_key)[:EXAMPLES]}: pass the tree that was trained (its transforms' init of the base params)"
        )
    replaced = {by_key[key]: _checked_leaf(by_key[key], tensor, leaves[by_key[key]]) for key, tensor in saved.items()}
    return map_with_path(lambda path, leaf: replaced.get(path, leaf), params)
