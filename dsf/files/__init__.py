"""Files and hubs: safetensors reading (``io``), hub downloads (``hub``), checkpoint layouts and
config layering (``loading``), weights streamed from disk (``disk``), videos (``video``) and model
files recognized by their keys (``model_files``)."""
