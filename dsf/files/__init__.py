"""Files and hubs: safetensors reading (``io``), hub downloads (``hub``), checkpoint layouts and
config layering (``loading``), weights streamed from disk (``disk``) and videos (``video``)."""
