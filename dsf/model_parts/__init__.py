"""What model families share: the family contract (``family``), LoRA files in every layout
(``lora_files``), pipeline helpers (``pipelines``), third-party modules as pure functions
(``modules``), text-encoder runners (``text_encoder``, ``t5_encoder``), initializers (``init``),
input checks, the VAE posterior and tiling."""
