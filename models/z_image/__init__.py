"""Z-Image (Turbo and base): the S3-DiT as a pure function over a param tree, its checkpoint layouts and config; the
VAE is FLUX.1's autoencoder from the shared model parts (same config, scaling 0.3611 and shift 0.1159).

Example:
    >>> import dsf
    >>> from dsf.models import z_image
    >>> cfg = z_image.ZImageConfig(hidden_size=32, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=8,
    ...                            axes_dims=(4, 6, 6))
    >>> dit, params = z_image.load_dit(dsf.tree.flatten_dict(z_image.init_dit(cfg, dsf.random.key(0))),
    ...                                config={"axes_dims": [4, 6, 6]})
    >>> dit.config == cfg
    True
"""

from dsf.model_parts.flux_vae import FluxVAE, FluxVAEConfig
from dsf.model_parts.flux_vae_keys import VAE, load_vae
from dsf.models.z_image.config import ZImageConfig
from dsf.models.z_image.keys import DIT, load_dit, lumina2_to_ours, ours_to_lumina2
from dsf.models.z_image.model import (
    ZImageDiT,
    apply,
    check_inputs,
    dit_params_meta,
    init_dit,
    param_shapes,
    patchify,
    unpatchify,
)
from dsf.models.z_image.pipeline import ZImagePipeline, load_pipeline, pipeline_schedule
from dsf.models.z_image.text import QWEN3_4B_CONFIG, Qwen3TextEncoder, encode_prompt, load_text_encoder
from dsf.model_parts.family import register
from dsf.models.z_image.family import FAMILY

register(FAMILY)

__all__ = [
    "DIT",
    "FAMILY",
    "QWEN3_4B_CONFIG",
    "Qwen3TextEncoder",
    "ZImagePipeline",
    "encode_prompt",
    "load_pipeline",
    "load_text_encoder",
    "pipeline_schedule",
    "FluxVAE",
    "FluxVAEConfig",
    "VAE",
    "load_vae",
    "ZImageConfig",
    "ZImageDiT",
    "apply",
    "check_inputs",
    "dit_params_meta",
    "init_dit",
    "load_dit",
    "lumina2_to_ours",
    "ours_to_lumina2",
    "param_shapes",
    "patchify",
    "unpatchify",
]
