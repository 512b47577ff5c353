"""Wan 2.1 and 2.2 video models: the DiT (text-, image- and text-image-to-video, the two-expert A14B),
the umT5 text encoder and the CLIP vision encoder, as pure functions over param trees.

Example:
    >>> import torch, dsf
    >>> from dsf.models import wan
    >>> cfg = wan.WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=1, text_dim=8)
    >>> dit, params = wan.load_dit(dsf.tree.flatten_dict(wan.init_dit(cfg, dsf.random.key(0))),
    ...                            config={"attention_head_dim": 12})
    >>> dit.config == cfg
    True
"""

from dsf.models.wan.config import (
    WAN21_I2V_14B,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_I2V_A14B_EXPERT,
    WAN22_T2V_A14B_EXPERT,
    WAN22_TI2V_5B,
    WanConfig,
)
from dsf.model_parts.family import register
from dsf.models.wan.keys import (
    DIT,
    load_dit,
    load_two_expert_dit,
    original_to_ours,
    ours_to_original,
)
from dsf.models.wan.text import (
    CLIP_VIT_H_CONFIG,
    UMT5_XXL_CONFIG,
    ImageEncoder,
    TextEncoder,
    clean_prompt,
    clip_vision_param_shapes,
    clip_vision_to_ours,
    load_clip_vision,
    load_umt5,
    umt5_param_shapes,
    umt5_to_ours,
)
from dsf.model_parts.wan_vae import (
    WAN21_VAE_CONFIG,
    WAN22_VAE_CONFIG,
    WanVAE,
    WanVAEConfig,
    init_vae,
    vae_param_shapes,
    vae_params_meta,
)
from dsf.model_parts.wan_vae_keys import VAE, load_vae, original_vae_to_ours, ours_to_original_vae
from dsf.models.wan.pipeline import DEFAULT_NEGATIVE_PROMPT, WanPipeline, load_pipeline
from dsf.models.wan.model import (
    TwoExpertDiT,
    WanDiT,
    apply,
    check_inputs,
    default_boundary,
    dit_params_meta,
    expert_timestep_ranges,
    init_dit,
    param_shapes,
    position_ids,
    unpatchify,
)
from dsf.models.wan.family import FAMILY

register(FAMILY)

__all__ = [
    "DIT",
    "FAMILY",
    "VAE",
    "WAN21_I2V_14B",
    "WAN21_T2V_1_3B",
    "WAN21_T2V_14B",
    "WAN22_I2V_A14B_EXPERT",
    "WAN22_T2V_A14B_EXPERT",
    "WAN22_TI2V_5B",
    "WanConfig",
    "load_dit",
    "load_two_expert_dit",
    "original_to_ours",
    "ours_to_original",
    "CLIP_VIT_H_CONFIG",
    "UMT5_XXL_CONFIG",
    "ImageEncoder",
    "TextEncoder",
    "clean_prompt",
    "clip_vision_param_shapes",
    "clip_vision_to_ours",
    "load_clip_vision",
    "load_umt5",
    "umt5_param_shapes",
    "umt5_to_ours",
    "TwoExpertDiT",
    "WanDiT",
    "apply",
    "check_inputs",
    "default_boundary",
    "dit_params_meta",
    "expert_timestep_ranges",
    "init_dit",
    "param_shapes",
    "position_ids",
    "unpatchify",
    "WAN21_VAE_CONFIG",
    "WAN22_VAE_CONFIG",
    "WanVAE",
    "WanVAEConfig",
    "init_vae",
    "load_vae",
    "original_vae_to_ours",
    "ours_to_original_vae",
    "vae_param_shapes",
    "vae_params_meta",
    "DEFAULT_NEGATIVE_PROMPT",
    "WanPipeline",
    "load_pipeline",
]
