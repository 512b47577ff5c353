"""FLUX.2's family record (the contract of :mod:`dsf.model_parts.family`), registered when ``dsf.models.flux2`` is
imported. Its native layout is BFL's (the names kohya and ComfyUI LoRA files use); DiffSynth-Studio names its
modules as diffusers does.

Example:
    >>> from dsf.models import flux2
    >>> flux2.FAMILY.shape_free_fields(), flux2.FAMILY.native_layout
    (['axes_dims_rope', 'rope_theta', 'eps'], 'bfl')
"""

from dsf.model_parts.family import Family
from dsf.models.flux2.config import Flux2Config, fields_from_diffusers, fields_from_shapes
from dsf.models.flux2.keys import DIT
from dsf.models.flux2.model import apply, init_dit
from dsf.models.flux2.pipeline import load_pipeline
from dsf.models.flux2.tiny import tiny_pipeline
from dsf.models.flux2.training import COMPONENTS, LORA_TARGETS, SampleEncoder, direct_distill_loss, sft_loss
from dsf.models.flux2.vae import VAE

FAMILY = Family(
    name="FLUX.2",
    dit=DIT,
    vae=VAE,
    config_type=Flux2Config,
    config_from_diffusers=fields_from_diffusers,
    config_from_shapes=fields_from_shapes,
    init=init_dit,
    apply=apply,
    # FLUX.1's signature (x_embedder, context_embedder, proj_out, norm_out) fits FLUX.2's DiT too: this one is longer
    signature=("x_embedder/weight", "context_embedder/weight", "proj_out/weight", "norm_out/linear/weight",
               "double_stream_modulation_img/linear/weight", "single_stream_modulation/linear/weight"),
    native_layout="bfl",
    lora_targets=LORA_TARGETS,
    components=COMPONENTS,
    load_pipeline=load_pipeline,
    sample_encoder=SampleEncoder,
    losses={"sft": sft_loss, "direct_distill": direct_distill_loss},
    tiny_pipeline=tiny_pipeline,
    diffsynth_uses_ours=True,
)
