"""Files and hubs: safetensors reading (``io``), hub downloads (``hub``), checkpoint layouts and
config layering (``loading``), fp8 checkpoints with their scales (``quantized``), weights streamed
from disk (``disk``), videos (``video``) and model files recognized by their keys (``model_files``)."""
