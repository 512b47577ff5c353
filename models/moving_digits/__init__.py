"""Moving digits: a tiny Wan video DiT trained from scratch on CPU on videos of a scikit-learn digit
sliding left, right, up or down ("a handwritten digit seven moving left").

``model`` holds the config (video geometry and a small :class:`dsf.models.wan.WanConfig`) and the
text encoder, ``data`` the videos and the measurements the quality bench makes on them,
``pipeline`` the model record, its loss, saving, loading and sampling.
"""

from dsf.models.moving_digits.data import (
    center_of_mass,
    digit_crops,
    motion_direction,
    prompt_for,
    random_item,
    render_video,
    start_range,
    to_gray,
    video_stream,
)
from dsf.models.moving_digits.model import DIRECTIONS, VOCABULARY, MovingDigitsConfig, build_tokenizer, init_text_encoder
from dsf.models.moving_digits.pipeline import (
    SCHEDULE,
    MovingDigitsModel,
    generate_tensors,
    load_model,
    moving_digits_loss,
    new_model,
    save_image,
    save_model,
    video_strip,
)

__all__ = [
    "DIRECTIONS",
    "SCHEDULE",
    "VOCABULARY",
    "MovingDigitsConfig",
    "MovingDigitsModel",
    "build_tokenizer",
    "center_of_mass",
    "digit_crops",
    "generate_tensors",
    "init_text_encoder",
    "load_model",
    "motion_direction",
    "moving_digits_loss",
    "new_model",
    "prompt_for",
    "random_item",
    "render_video",
    "save_image",
    "save_model",
    "start_range",
    "to_gray",
    "video_stream",
    "video_strip",
]
