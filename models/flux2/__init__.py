"""FLUX.2 (dev, klein 4B / 9B and their base models): the DiT as a pure function over a param tree, and its
checkpoint layouts.

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

__all__ = [
    "DIT",
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
