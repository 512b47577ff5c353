"""Qwen-Image's family record (the contract of :mod:`dsf.model_parts.family`), registered when
``dsf.models.qwen_image`` is imported.

Example:
    >>> from dsf.models import qwen_image
    >>> qwen_image.FAMILY.shape_free_fields(), qwen_image.FAMILY.native_layout
    (['axes_dims_rope', 'zero_cond_t'], None)
"""

from dsf.model_parts.family import Family
from dsf.models.qwen_image.config import QwenImageConfig, fields_from_diffusers, fields_from_shapes
from dsf.models.qwen_image.keys import DIT
from dsf.models.qwen_image.model import apply, init_dit
from dsf.models.qwen_image.pipeline import load_pipeline
from dsf.models.qwen_image.tiny import tiny_pipeline
from dsf.models.qwen_image.training import COMPONENTS, LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.models.qwen_image.vae import VAE

FAMILY = Family(
    name="Qwen-Image",
    dit=DIT,
    vae=VAE,
    config_type=QwenImageConfig,
    config_from_diffusers=fields_from_diffusers,
    config_from_shapes=fields_from_shapes,
    init=init_dit,
    apply=apply,
    signature=("img_in/weight", "txt_norm/weight", "txt_in/weight", "norm_out/linear/weight"),
    native_layout=None,  # kohya/musubi and ComfyUI LoRA files, and DiffSynth-Studio's, use the diffusers module names
    lora_targets=LORA_TARGETS,
    components=COMPONENTS,
    load_pipeline=load_pipeline,
    sample_encoder=SampleEncoder,
    losses={"sft": sft_loss, "direct_distill": direct_distill_loss},
    tiny_pipeline=tiny_pipeline,
)
