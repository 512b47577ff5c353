"""FLUX.2 (dev, klein 4B / 9B and their base models): the DiT, the VAE and the text encoders (Mistral3, Qwen3) as
pure functions over param trees, their checkpoint layouts, the pipeline and the training pieces.

Example:
    >>> import dsf
    >>> from dsf.models import flux2
    >>> cfg = flux2.Flux2Config(num_heads=1, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1,
    ...                         num_single_blocks=1, context_dim=8, guidance_embeds=False)
    >>> dit, params = flux2.load_dit(flux2.ours_to_bfl(flux2.init_dit(cfg, dsf.random.key(0))),
    ...                              config={"axes_dims_rope": [4, 4, 4, 4]})
    >>> dit.config == cfg
    True
"""

from dsf.models.flux2.config import KLEIN_4B, KLEIN_9B, Flux2Config
from dsf.models.flux2.keys import DIT, bfl_to_ours, load_dit, ours_to_bfl
from dsf.models.flux2.model import Flux2DiT, apply, check_inputs, dit_params_meta, init_dit, param_shapes, position_ids
from dsf.models.flux2.pipeline import Flux2Pipeline, load_pipeline
from dsf.models.flux2.text import Flux2TextEncoder, load_text_encoder
from dsf.models.flux2.vae import VAE, Flux2VAE, Flux2VAEConfig, load_vae
from dsf.model_parts.family import register
from dsf.models.flux2.family import FAMILY

register(FAMILY)

__all__ = [
    "DIT",
    "FAMILY",
    "VAE",
    "Flux2Pipeline",
    "Flux2TextEncoder",
    "Flux2VAE",
    "Flux2VAEConfig",
    "load_pipeline",
    "load_text_encoder",
    "load_vae",
    "KLEIN_4B",
    "KLEIN_9B",
    "Flux2Config",
    "Flux2DiT",
    "apply",
    "bfl_to_ours",
    "check_inputs",
    "dit_params_meta",
    "init_dit",
    "load_dit",
    "ours_to_bfl",
    "param_shapes",
    "position_ids",
]
