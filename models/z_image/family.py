"""Z-Image's family record (the contract of :mod:`dsf.model_parts.family`), registered when ``dsf.models.z_image``
is imported.

Example:
    >>> from dsf.models import z_image
    >>> z_image.FAMILY.shape_free_fields(), z_image.FAMILY.native_layout
    (['norm_eps', 'rope_theta', 't_scale', 'axes_dims', 'axes_lens'], 'lumina2')
"""

from dsf.model_parts.family import Family
from dsf.model_parts.flux_vae_keys import VAE
from dsf.models.z_image.config import ZImageConfig, fields_from_diffusers, fields_from_shapes
from dsf.models.z_image.keys import DIT
from dsf.models.z_image.model import apply, init_dit
from dsf.models.z_image.pipeline import load_pipeline
from dsf.models.z_image.tiny import tiny_pipeline
from dsf.models.z_image.training import COMPONENTS, LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss

FAMILY = Family(
    name="Z-Image",
    dit=DIT,
    vae=VAE,
    config_type=ZImageConfig,
    config_from_diffusers=fields_from_diffusers,
    config_from_shapes=fields_from_shapes,
    init=init_dit,
    apply=apply,
    signature=("all_x_embedder/2-1/weight", "cap_embedder/1/weight", "x_pad_token", "cap_pad_token"),
    native_layout="lumina2",
    lora_targets=LORA_TARGETS,
    components=COMPONENTS,
    load_pipeline=load_pipeline,
    sample_encoder=SampleEncoder,
    losses={"sft": sft_loss, "direct_distill": direct_distill_loss},
    tiny_pipeline=tiny_pipeline,
    diffsynth_uses_ours=True,  # DiffSynth-Studio's ZImageDiT has diffusers' module names
)
