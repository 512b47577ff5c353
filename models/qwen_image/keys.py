"""Qwen-Image DiT checkpoint layouts: ours (= diffusers, = DiffSynth-Studio's), and ComfyUI's prefixed one.

Our parameter tree mirrors diffusers' ``QwenImageTransformer2DModel`` state dict, whose names the official
release, DiffSynth-Studio and ComfyUI's ``qwen_image_bf16.safetensors`` all use (ComfyUI's all-in-one files
put ``model.diffusion_model.`` before them). :data:`DIT` (the family contract's checkpoint record) and
:func:`load_dit` read any of them.

Example:
    >>> import dsf
    >>> from dsf.models.qwen_image.model import init_dit
    >>> cfg = QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1, context_dim=8)
    >>> comfy = {COMFY_PREFIX + k: v for k, v in dsf.tree.flatten_dict(init_dit(cfg, dsf.random.key(0))).items()}
    >>> ours, layout = DIT.to_ours(comfy)
    >>> layout, "txt_norm.weight" in ours
    ("diffusers (prefix 'model.diffusion_model.')", True)
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsf.files.io import Source
from dsf.model_parts.family import Checkpoint, Layout
from dsf.models.qwen_image.config import QwenImageConfig, resolve_config
from dsf.models.qwen_image.model import QwenImageDiT, param_shapes

COMFY_PREFIX = "model.diffusion_model."
_MISFIT_HINT = (  # the end of the error for a checkpoint that does not fit its config
    "Known layouts: diffusers (img_in.weight, txt_norm.weight, transformer_blocks.N...), the same with ComfyUI's "
    f"{COMFY_PREFIX!r} prefix. If the sizes differ, pass config= (diffusers config keys)."
)

DIT = Checkpoint(
    what="Qwen-Image DiT",
    class_name="QwenImageTransformer2DModel",
    folder="transformer",
    layouts=(Layout("diffusers", marks=("transformer_blocks.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed.")),),
    resolve_config=resolve_config,
    param_shapes=param_shapes,
    build=QwenImageDiT,
    misfit_hint=_MISFIT_HINT,
    wrapper_prefixes=(COMFY_PREFIX,),
    config_flags={"__index_timestep_zero__": {"zero_cond_t": True}},  # ComfyUI's Edit-2511 files: an empty marker
)


def load_dit(source: Source, config: Mapping | QwenImageConfig | None = None, *, dtype: torch.dtype | None = None,
             device="cpu"):
    """``(dit, params)`` from a Qwen-Image DiT checkpoint in the diffusers layout, with or without ComfyUI's prefix.

    ``source``: anything :func:`dsf.files.io.load_state_dict` reads, a :class:`dsf.files.hub.ModelSource`, or a diffusers
    pipeline folder (its ``transformer/``). The config is: Qwen-Image defaults < the checkpoint's shapes < the
    ``config.json`` beside the weights (or ComfyUI's ``__index_timestep_zero__`` marker: ``zero_cond_t``, Edit-2511)
    < ``config`` (diffusers config keys, or a :class:`QwenImageConfig`).

    >>> import dsf
    >>> from dsf.models.qwen_image.model import init_dit
    >>> cfg = QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=2, context_dim=8)
    >>> dit, params = load_dit(dsf.tree.flatten_dict(init_dit(cfg, dsf.random.key(0))), {"axes_dims_rope": [4, 6, 6]})
    >>> dit.config == cfg, len(params["transformer_blocks"])
    (True, 2)
    """
    return DIT.load(source, config, dtype=dtype, device=device)
