"""Diffusion math as data: σ schedules and parameterizations (``schedules``), the sampler
(``sampling``), the training losses (``losses``) and distillation (``distill``).

The names the tours use are here too:

    >>> from dsf.diffusion import FlowSchedule, flow_matching_loss, sample
    >>> FlowSchedule().sigmas(4).tolist()
    [1.0, 0.75, 0.5, 0.25]
"""

from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FlowSchedule

__all__ = ["FlowSchedule", "flow_matching_loss", "sample"]
