"""Wan's family record (the contract of :mod:`dsf.model_parts.family`), registered when ``dsf.models.wan`` is
imported.

Example:
    >>> from dsf.models import wan
    >>> "head_dim" in wan.FAMILY.shape_free_fields(), wan.FAMILY.native_layout
    (True, 'original')
"""

from dsf.model_parts.family import Family
from dsf.models.wan.config import WanConfig, fields_from_diffusers, fields_from_shapes
from dsf.models.wan.keys import DIT
from dsf.models.wan.model import apply, init_dit
from dsf.models.wan.pipeline import load_pipeline
from dsf.models.wan.tiny import tiny_pipeline
from dsf.models.wan.training import COMPONENTS, LORA_TARGETS, SampleEncoder, sft_loss
from dsf.model_parts.wan_vae_keys import VAE

FAMILY = Family(
    name="Wan",
    dit=DIT,
    vae=VAE,
    config_type=WanConfig,
    config_from_diffusers=fields_from_diffusers,
    config_from_shapes=lambda shapes: fields_from_shapes(shapes, WanConfig.head_dim),  # the head size is not in shapes
    init=init_dit,
    apply=apply,
    signature=("patch_embedding/weight", "condition_embedder/time_proj/weight", "scale_shift_table"),
    native_layout="original",
    lora_targets=LORA_TARGETS,
    components=COMPONENTS,
    load_pipeline=load_pipeline,
    sample_encoder=SampleEncoder,
    losses={"sft": sft_loss},
    tiny_pipeline=tiny_pipeline,
)
