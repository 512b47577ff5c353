"""Model files recognized by their key names, never by their file names, for any family.

A recipe given a list of files (``--model_paths``) finds which component of the family each holds
with the family record's :class:`dsf.model_parts.family.Component` list; one all-in-one file may hold
several components.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> from dsf.models import flux
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"decoder.up.0.block.0.conv1.weight": torch.zeros(1)}, folder / "x.safetensors")
    >>> {key: path.name for key, path in recognize_model_files([folder / "x.safetensors"], flux.FAMILY).items()}
    {'vae': 'x.safetensors'}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from safetensors import safe_open

from dsf.files.io import safetensors_files

ModelFile = Any  # a path, or a list of paths (the shards of one model)


def checkpoint_keys(model_file: ModelFile) -> list[str]:
    """The tensor names of a safetensors file, folder or shard list, read from the file headers only.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "a.safetensors"
    >>> save_file({"img_in.weight": torch.zeros(1)}, path)
    >>> checkpoint_keys(path)
    ['img_in.weight']
    """
    names = []
    for file in safetensors_files(model_file):
        with safe_open(str(file), framework="pt") as shard:
            names.extend(shard.keys())
    return names


def describe(model_file: ModelFile) -> str:
    """A model file's name for messages: the file name, or the shard names in brackets.

    >>> describe("/models/ae.safetensors"), describe(["/m/a-1.safetensors", "/m/a-2.safetensors"])
    ('ae.safetensors', '[a-1.safetensors, a-2.safetensors]')
    """
    if isinstance(model_file, (str, os.PathLike)):
        return Path(model_file).name
    return "[" + ", ".join(Path(path).name for path in model_file) + "]"


def components_of(keys, family) -> list[str]:
    """The components of ``family`` whose weights a checkpoint's key names hold, in the family's order.

    >>> from dsf.models import flux
    >>> components_of(["double_blocks.0.img_mod.lin.weight"], flux.FAMILY)
    ['dit']
    """
    keys = list(keys)
    return [key for key, component in family.components.items() if component.holds(keys)]


def recognize_model_files(model_files: Sequence[ModelFile], family) -> dict[str, ModelFile]:
    """``{component: model file}`` of the ``family``'s components among ``model_files``, recognized by their keys.

    A file holding several components (an all-in-one checkpoint) serves each of them. A file with no component
    of the family, or a component found in two files, is an error naming the files.
    """
    found: dict[str, ModelFile] = {}
    for model_file in model_files:
        names = checkpoint_keys(model_file)
        components = components_of(names, family)
        if not components:
            kinds = ", ".join(component.name for component in family.components.values())
            raise ValueError(
                f"{describe(model_file)} holds no {family.name} component ({kinds} weights): its keys look like "
                f"{sorted(names)[:5]}; pass only {family.name} model files"
            )
        for key in components:
            if key in found:
                name = family.components[key].name
                raise ValueError(
                    f"two {name}s among the model files: {describe(found[key])} and {describe(model_file)}; pass one of them"
                )
            found[key] = model_file
    return found


def require_components(found: Mapping[str, ModelFile], needed: Sequence[str], given_by: str, family) -> None:
    """Raise an error naming the first of ``needed`` that ``found`` lacks, and what was found instead.

    >>> from dsf.models import flux
    >>> require_components({"dit": "a.safetensors"}, ["dit", "vae"], "--model_paths", flux.FAMILY)
    Traceback (most recent call last):
    ...
    ValueError: no VAE among --model_paths: found DiT (a.safetensors); add the VAE's file (FLUX.1's ae.safetensors)
    """
    for key in needed:
        if key not in found:
            listed = ", ".join(f"{c.name} ({describe(found[k])})" for k, c in family.components.items() if k in found)
            wanted = family.components[key]
            raise ValueError(
                f"no {wanted.name} among {given_by}: found {listed or 'nothing'}; add the {wanted.name}'s file "
                f"({family.name}'s {wanted.usual_file})"
            )
