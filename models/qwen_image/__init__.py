"""Qwen-Image (text-to-image, and the Edit models' DiT): the DiT, the VAE and the Qwen2.5-VL text encoder as pure
functions over param trees, the pipeline and the training pieces.

Example:
    >>> import torch, dsf
    >>> from dsf.models import qwen_image
    >>> cfg = qwen_image.QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=1, context_dim=8)
    >>> dit, params = qwen_image.load_dit(dsf.tree.flatten_dict(qwen_image.init_dit(cfg, dsf.random.key(0))),
    ...                                   config={"axes_dims_rope": [4, 6, 6]})
    >>> dit.config == cfg
    True
"""

from dsf.model_parts.family import register
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
from dsf.models.qwen_image.pipeline import QwenImagePipeline, load_pipeline
from dsf.models.qwen_image.text import QwenTextEncoder, load_text_encoder
from dsf.models.qwen_image.vae import QWEN_IMAGE_VAE_CONFIG, VAE, QwenImageVAE, load_vae
from dsf.models.qwen_image.family import FAMILY

register(FAMILY)

__all__ = [
    "COMFY_PREFIX",
    "DIT",
    "FAMILY",
    "QwenImageConfig",
    "QwenImageDiT",
    "QwenImagePipeline",
    "QwenTextEncoder",
    "QwenImageVAE",
    "QWEN_IMAGE_VAE_CONFIG",
    "VAE",
    "apply",
    "check_inputs",
    "dit_params_meta",
    "init_dit",
    "load_dit",
    "load_pipeline",
    "load_text_encoder",
    "load_vae",
    "param_shapes",
    "patchify",
    "position_ids",
    "unpatchify",
]
