"""FLUX.1's family record (the contract of :mod:`dsf.model_parts.family`), registered when ``dsf.models.flux``
is imported.

Example:
    >>> from dsf.models import flux
    >>> flux.FAMILY.shape_free_fields(), flux.FAMILY.native_layout
    (['axes_dims_rope', 'rope_theta'], 'bfl')
"""

from dsf.model_parts.family import Family
from dsf.models.flux.config import FluxConfig, fields_from_diffusers, fields_from_shapes
from dsf.models.flux.keys import DIT, LORA_TEXT_ENCODERS, diffsynth_module
from dsf.models.flux.model import apply, init_dit
from dsf.models.flux.pipeline import load_pipeline
from dsf.models.flux.tiny import tiny_pipeline
from dsf.models.flux.training import COMPONENTS, LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.model_parts.flux_vae_keys import VAE

FAMILY = Family(
    name="FLUX.1",
    dit=DIT,
    vae=VAE,
    config_type=FluxConfig,
    config_from_diffusers=fields_from_diffusers,
    config_from_shapes=fields_from_shapes,
    init=init_dit,
    apply=apply,
    signature=("x_embedder/weight", "context_embedder/weight", "proj_out/weight", "norm_out/linear/weight"),
    native_layout="bfl",
    lora_targets=LORA_TARGETS,
    components=COMPONENTS,
    load_pipeline=load_pipeline,
    sample_encoder=SampleEncoder,
    losses={"sft": sft_loss, "direct_distill": direct_distill_loss},
    tiny_pipeline=tiny_pipeline,
    lora_text_encoders=LORA_TEXT_ENCODERS,
    diffsynth_module=diffsynth_module,
)
