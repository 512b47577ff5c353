"""FLUX.1 (dev, schnell and same-shaped fine-tunes): the DiT, the VAE and the CLIP/T5 text
encoders as pure functions over param trees.

Example:
    >>> import torch, dsf
    >>> from dsf.models import flux
    >>> cfg = flux.FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1,
    ...                       num_single_blocks=1, context_dim=8, pooled_dim=8)
    >>> dit, params = flux.load_dit(dsf.tree.flatten_dict(flux.init_dit(cfg, dsf.random.key(0))),
    ...                             config={"axes_dims_rope": [4, 6, 6]})
    >>> dit.config == cfg
    True
"""

from dsf.models.flux.config import FluxConfig
from dsf.model_parts.family import register
from dsf.models.flux.keys import DIT, bfl_to_ours, load_dit, ours_to_bfl
from dsf.models.flux.text import (
    CLIP_L_CONFIG,
    T5_XXL_CONFIG,
    TextEncoder,
    clip_param_shapes,
    clip_to_ours,
    encode_prompt,
    load_clip,
    load_t5,
    t5_param_shapes,
    t5_to_ours,
)
from dsf.model_parts.flux_vae import FluxVAE, FluxVAEConfig, init_vae, vae_param_shapes, vae_params_meta
from dsf.model_parts.flux_vae_keys import VAE, ldm_to_ours, load_vae, ours_to_ldm
from dsf.models.flux.model import (
    FluxDiT,
    apply,
    check_inputs,
    dit_params_meta,
    init_dit,
    param_shapes,
    patchify,
    position_ids,
    unpatchify,
)
from dsf.models.flux.family import FAMILY

register(FAMILY)

__all__ = [
    "DIT",
    "FAMILY",
    "VAE",
    "CLIP_L_CONFIG",
    "T5_XXL_CONFIG",
    "TextEncoder",
    "clip_param_shapes",
    "clip_to_ours",
    "encode_prompt",
    "load_clip",
    "load_t5",
    "t5_param_shapes",
    "t5_to_ours",
    "FluxConfig",
    "FluxDiT",
    "FluxVAE",
    "FluxVAEConfig",
    "init_vae",
    "ldm_to_ours",
    "load_vae",
    "ours_to_ldm",
    "vae_param_shapes",
    "vae_params_meta",
    "apply",
    "bfl_to_ours",
    "check_inputs",
    "dit_params_meta",
    "init_dit",
    "load_dit",
    "ours_to_bfl",
    "param_shapes",
    "patchify",
    "position_ids",
    "unpatchify",
]
