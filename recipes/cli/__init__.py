"""The recipes' command lines (installed as ``dsf.cli``): DiffSynth's training flags
(``training_flags``), the low-memory inference flags (``inference_flags``) and the train/sample
commands of the from-scratch recipes (``train_sample``). Nothing in the library imports them."""
