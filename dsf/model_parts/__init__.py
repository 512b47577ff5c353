"""What model families share: the family contract (``family``), third-party modules as pure
functions (``modules``), text-encoder runners (``text_encoder``, ``t5_encoder``), initializers
(``init``), input checks, the VAE posterior and tiling, and pipeline helpers (``images``)."""
