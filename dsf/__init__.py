"""dsf: a functional engine for diffusion models.

Models are pure functions over parameter trees; transforms (``dsf.transforms``) wrap any function
whose first argument is params. See README.md for the tour.
"""

from dsf import random, tree
from dsf.autodiff import grad, value_and_grad
from dsf.blocks import run_blocks
from dsf.transform import Transform, chain
from dsf.weight import Weight, materialize, materialize_tree

__all__ = [
    "Transform",
    "Weight",
    "chain",
    "grad",
    "materialize",
    "materialize_tree",
    "random",
    "run_blocks",
    "tree",
    "value_and_grad",
]
