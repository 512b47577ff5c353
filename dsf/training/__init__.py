"""Training: the loop (``train``), optimizers and learning-rate schedules (``optim``), datasets
(``data``), split-training caches (``cache``), resumable checkpoints (``checkpoint``) and
torchrun jobs (``distributed``)."""
