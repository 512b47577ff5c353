"""Qwen-Image (text-to-image, and the Edit models' DiT): the DiT and the VAE as pure functions over param trees.

Example:
    >>> import torch, dsf
    >>> from dsf.models import qwen_image
    >>> cfg = qwen_image.QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1, context_dim=8)
    >>> dit, params = qwen_image.load_dit(dsf.tree.flatten_dict(qwen_image.init_dit(cfg, dsf.random.key(0))),
    ...                                   config={"axes_dims_rope": [4, 6, 6]})
    >>> dit.config == cfg
    True
"""

from dsf.models.qwen_image.config import QwenImageConfig
from dsf.models.qwen_image.keys import COMFY_PREFIX, DIT, load_dit
from dsf.models.qwen_image.model import (
    QwenImageDiT,
    apply,
    check_inputs,
    dit_params_meta,
    init_dit,
    param_shapes,
    patchify,
    position_ids,
    unpatchify,
)
from dsf.models.qwen_image.vae import QWEN_IMAGE_VAE_CONFIG, VAE, QwenImageVAE, load_vae

__all__ = [
    "COMFY_PREFIX",
    "DIT",
    "QwenImageConfig",
    "QwenImageDiT",
    "QwenImageVAE",
    "QWEN_IMAGE_VAE_CONFIG",
    "VAE",
    "apply",
    "check_inputs",
    "dit_params_meta",
    "init_dit",
    "load_dit",
    "load_vae",
    "param_shapes",
    "patchify",
    "position_ids",
    "unpatchify",
]
