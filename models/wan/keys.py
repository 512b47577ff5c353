"""Wan DiT checkpoint layouts: ours (= diffusers ``WanTransformer3DModel``), Wan's original, ComfyUI's prefixed original.

Our parameter tree mirrors diffusers' state dict. The original layout (Wan-AI's
``diffusion_pytorch_model*.safetensors``, DiffSynth-Studio's) differs by names only: one tensor per
tensor, same shapes. Its cross-attention LayerNorm is ``norm3`` where diffusers says ``norm2``
(the other two block norms have no weights). ComfyUI files put ``model.diffusion_model.`` before
original keys. :data:`DIT` (the family contract's checkpoint record) and :func:`load_dit` read any of
them, detected from the keys; :func:`load_two_expert_dit` reads a Wan2.2 A14B folder.

Example:
    >>> import dsf
    >>> from dsf.models.wan.model import init_dit
    >>> from dsf.models.wan.config import WanConfig
    >>> cfg = WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=1, text_dim=8)
    >>> original = ours_to_original(init_dit(cfg, dsf.random.key(0)))
    >>> tuple(original["blocks.0.modulation"].shape), "head.head.weight" in original
    ((1, 6, 12), True)
    >>> ours, layout = DIT.to_ours(original)
    >>> layout, sorted(ours) == sorted(dsf.tree.flatten_dict(init_dit(cfg, dsf.random.key(0))))
    ('original', True)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.files.io import Source, read_json
from dsf.model_parts.family import Checkpoint, Layout
from dsf.models.wan.config import WanConfig, resolve_config
from dsf.models.wan.model import TwoExpertDiT, WanDiT, default_boundary, param_shapes
from dsf.tree import flatten_dict

COMFY_PREFIX = "model.diffusion_model."
UNUSED_DIFFUSERS_KEY = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")  # in early diffusers I2V files; diffusers skips it
EXPERT_FOLDERS = (("transformer", "transformer_2"), ("high_noise_model", "low_noise_model"))  # (high, low): diffusers, Wan-AI
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers (condition_embedder.*, blocks.N.attn1...), original Wan (text_embedding.*, "
    f"blocks.N.self_attn...), original with ComfyUI's {COMFY_PREFIX!r} prefix. If the sizes differ, pass config= "
    "(diffusers config keys)."
)


def _module_renames(modules: Mapping[str, str]) -> dict[str, str]:
    return {f"{original}.{leaf}": f"{ours}.{leaf}" for original, ours in modules.items() for leaf in ("weight", "bias")}


_GLOBAL_NAMES = {  # original key -> our key, outside the blocks
    **_module_renames(
        {
            "patch_embedding": "patch_embedding",
            "text_embedding.0": "condition_embedder.text_embedder.linear_1",
            "text_embedding.2": "condition_embedder.text_embedder.linear_2",
            "time_embedding.0": "condition_embedder.time_embedder.linear_1",
            "time_embedding.2": "condition_embedder.time_embedder.linear_2",
            "time_projection.1": "condition_embedder.time_proj",
            "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
            "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
            "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
            "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
            "head.head": "proj_out",
        }
    ),
    "head.modulation": "scale_shift_table",
}

_BLOCK_NAMES = {  # original key -> our key, within ``blocks.N.``
    **_module_renames(
        {
            "self_attn.q": "attn1.to_q",
            "self_attn.k": "attn1.to_k",
            "self_attn.v": "attn1.to_v",
            "self_attn.o": "attn1.to_out.0",
            "cross_attn.q": "attn2.to_q",
            "cross_attn.k": "attn2.to_k",
            "cross_attn.v": "attn2.to_v",
            "cross_attn.o": "attn2.to_out.0",
            "cross_attn.k_img": "attn2.add_k_proj",
            "cross_attn.v_img": "attn2.add_v_proj",
            "norm3": "norm2",
            "ffn.0": "ffn.net.0.proj",
            "ffn.2": "ffn.net.2",
        }
    ),
    "self_attn.norm_q.weight": "attn1.norm_q.weight",
    "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight",
    "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "cross_attn.norm_k_img.weight": "attn2.norm_added_k.weight",
    "modulation": "scale_shift_table",
}

_TO_OURS = (_GLOBAL_NAMES, _BLOCK_NAMES)
_TO_ORIGINAL = tuple({ours: original for original, ours in names.items()} for names in _TO_OURS)


def _rename(key: str, tables: tuple[Mapping[str, str], Mapping[str, str]]) -> str | None:
    """``key`` renamed by the global or the per-block table, or ``None`` when neither knows it."""
    global_names, block_names = tables
    match = re.match(r"(blocks\.\d+\.)(.+)$", key)
    if match is None:
        return global_names.get(key)
    local = block_names.get(match.group(2))
    return None if local is None else match.group(1) + local


def original_to_ours(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat original-layout Wan state dict in our (diffusers) key layout; the tensors are the same objects.

    Keys it does not know are kept under their name, for the key check to report.

    >>> w = torch.zeros(1)
    >>> sorted(original_to_ours({"blocks.3.cross_attn.k_img.bias": w, "head.modulation": w, "vace_blocks.0.x": w}))
    ['blocks.3.attn2.add_k_proj.bias', 'scale_shift_table', 'vace_blocks.0.x']
    """
    return {_rename(key, _TO_OURS) or key: tensor for key, tensor in flat.items()}


def ours_to_original(params) -> dict[str, torch.Tensor]:
    """The flat original-layout state dict of a parameter tree (or flat dict) in our layout, ready for ``save_file``.

    >>> list(ours_to_original({"blocks": [{"norm2": {"weight": torch.ones(2)}}]}))
    ['blocks.0.norm3.weight']
    """
    original = {}
    for key, tensor in flatten_dict(params).items():
        name = _rename(key, _TO_ORIGINAL)
        if name is None:
            raise ValueError(f"parameter {key!r} has no name in the original Wan layout")
        original[name] = tensor
    return original


def _transformer_folder(source: Source) -> Source:
    """A diffusers pipeline folder stands for its ``transformer/``; a two-expert folder is an error."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    root = Path(source)
    experts = [pair for pair in EXPERT_FOLDERS if all((root / name).is_dir() for name in pair)]
    if experts:
        high, low = experts[0]
        raise ValueError(
            f"{root} holds the two experts of a Wan2.2 A14B model ({high}/ for high noise, {low}/ for low noise): "
            f"load both with load_two_expert_dit({str(root)!r}), or one with load_dit on its folder"
        )
    return loading.pipeline_subfolder(root, "transformer")


DIT = Checkpoint(
    what="Wan DiT",
    class_name="WanTransformer3DModel",
    folder="transformer",
    layouts=(
        Layout("original", marks=("head.", "time_embedding.", "text_embedding."), infixes=(".self_attn.",),
               to_ours=original_to_ours, from_ours=ours_to_original),
        Layout("diffusers", marks=("condition_embedder.", "proj_out."), infixes=(".attn1.",)),
    ),
    resolve_config=resolve_config,
    param_shapes=param_shapes,
    build=WanDiT,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=(COMFY_PREFIX,),
    dropped_keys=UNUSED_DIFFUSERS_KEY,
    locate=_transformer_folder,
)


def load_dit(source: Source, config: Mapping | WanConfig | None = None, *, dtype: torch.dtype | None = None, device="cpu"):
    """``(dit, params)`` from a Wan DiT checkpoint in the diffusers, original or ComfyUI layout, sharded or not.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a
    diffusers pipeline folder (its ``transformer/``). The config is: Wan2.1-T2V-14B defaults < the
    checkpoint's shapes < the diffusers ``config.json`` beside the weights < ``config`` (diffusers
    config keys, or a :class:`WanConfig`).

    >>> import dsf
    >>> from dsf.models.wan.model import init_dit
    >>> cfg = WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=2, text_dim=8, in_channels=36, image_dim=4)
    >>> dit, params = load_dit(ours_to_original(init_dit(cfg, dsf.random.key(0))), {"attention_head_dim": 12})
    >>> dit.config == cfg, len(params["blocks"])
    (True, 2)
    """
    return DIT.load(source, config, dtype=dtype, device=device)


def _expert_folders(root: Path) -> tuple[Path, Path]:
    for high, low in EXPERT_FOLDERS:
        if (root / high).is_dir() and (root / low).is_dir():
            return root / high, root / low
    wanted = " or ".join(f"{high}/ and {low}/" for high, low in EXPERT_FOLDERS)
    raise FileNotFoundError(f"{root} is not a Wan2.2 A14B folder: it has neither {wanted}")


def load_two_expert_dit(
    source, boundary: float | None = None, config: Mapping | WanConfig | None = None, *, dtype=None, device="cpu"
) -> tuple[TwoExpertDiT, dict]:
    """``(dit, {"high_noise": params, "low_noise": params})`` from a Wan2.2 A14B folder.

    The folder holds ``transformer/`` (high noise) and ``transformer_2/`` (diffusers), or
    ``high_noise_model/`` and ``low_noise_model/`` (Wan-AI). ``boundary`` (σ) defaults to the
    ``boundary_ratio`` of the folder's ``model_index.json``, else 0.875 for text-to-video and 0.9 for
    image-to-video, as Wan2.2 uses. ``config`` applies to both experts.

    >>> import dsf, tempfile
    >>> from safetensors.torch import save_file
    >>> from dsf.models.wan.model import init_dit
    >>> root = Path(tempfile.mkdtemp())
    >>> cfg = WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=1, text_dim=8, in_channels=36)
    >>> for seed, folder in enumerate(["high_noise_model", "low_noise_model"]):
    ...     (root / folder).mkdir()
    ...     save_file(ours_to_original(init_dit(cfg, dsf.random.key(seed))), root / folder / "model.safetensors")
    >>> dit, params = load_two_expert_dit(root, config={"attention_head_dim": 12})
    >>> dit.boundary, sorted(params)
    (0.9, ['high_noise', 'low_noise'])
    """
    root = local_source(source)
    if not isinstance(root, Path) or not root.is_dir():
        raise ValueError(f"load_two_expert_dit takes the folder of a Wan2.2 A14B model, got {source!r}")
    high_folder, low_folder = _expert_folders(root)
    high, high_params = load_dit(high_folder, config, dtype=dtype, device=device)
    low, low_params = load_dit(low_folder, config, dtype=dtype, device=device)
    if high.config != low.config:
        raise ValueError(f"the experts of {root} differ in config: {high.config} (high noise) != {low.config} (low noise)")
    index = root / "model_index.json"
    if boundary is None and index.is_file():
        boundary = read_json(index).get("boundary_ratio")
    boundary = default_boundary(high.config) if boundary is None else boundary
    return TwoExpertDiT(high, low, boundary), {"high_noise": high_params, "low_noise": low_params}
