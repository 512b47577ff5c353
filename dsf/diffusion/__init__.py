"""Diffusion math as data: σ schedules and parameterizations (``schedules``), the sampler
(``sampling``), the training losses (``losses``) and distillation (``distill``)."""
