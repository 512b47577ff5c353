"""Moving-digits videos: a scikit-learn digit sliding across the frames in a prompted direction, and
the measurements the quality bench makes on any video (center of mass, direction of motion, digit crops).

Videos are drawn on the fly from a key: batch ``n`` of a stream is a function of ``fold_in(key, n)``,
so the stream never repeats a batch and resumes at a position like :func:`dsf.training.data.batches`.

Example:
    >>> import dsf
    >>> from dsf.models.digits.training import digit_images
    >>> cfg = MovingDigitsConfig()
    >>> sprites, labels = digit_images(cfg.digit_size)
    >>> position, batch = next(video_stream(sprites, labels, 4, dsf.random.key(0), cfg)(0))
    >>> position, tuple(batch["video"].shape), len(batch["prompt"])
    (1, (4, 3, 5, 16, 16), 4)
    >>> [motion_direction(to_gray(v)) for v in batch["video"]] == batch["direction"]
    True
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dsf.training.data import collate
from dsf.models.digits.text import DIGIT_WORDS
from dsf.models.moving_digits.model import DIRECTIONS, MovingDigitsConfig
from dsf.random import Key, fold_in, randint, split


def prompt_for(digit: int, direction: str) -> str:
    """The training prompt of a digit class moving in a direction.

    >>> prompt_for(7, "left")
    'a handwritten digit seven moving left'
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {list(DIRECTIONS)}")
    return f"a handwritten digit {DIGIT_WORDS[digit]} moving {direction}"


def start_range(config: MovingDigitsConfig, direction: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive (low, high) of the first frame's top-left row and column that keep the digit in every frame.

    >>> start_range(MovingDigitsConfig(), "left")
    ((0, 8), (8, 8))
    >>> start_range(MovingDigitsConfig(digit_size=10, speed=1), "down")
    ((0, 2), (0, 6))
    """
    room = config.image_size - config.digit_size
    return tuple((max(0, -step * config.travel), room - max(0, step * config.travel)) for step in DIRECTIONS[direction])


def render_video(sprite: np.ndarray, direction: str, start: tuple[int, int], config: MovingDigitsConfig) -> torch.Tensor:
    """The video (channels, frames, H, W) in [-1, 1] of a uint8 ``sprite`` whose top-left starts at
    ``start`` (row, column) and moves ``config.speed`` pixels per frame in ``direction``.

    >>> video = render_video(np.full((8, 8), 255, np.uint8), "down", (0, 3), MovingDigitsConfig())
    >>> video.shape, video[0, 4, 8:16, 3].eq(1).all().item(), video[0, 4, :8, 3].eq(-1).all().item()
    (torch.Size([3, 5, 16, 16]), True, True)
    """
    if np.shape(sprite) != (config.digit_size, config.digit_size):
        raise ValueError(f"sprite has shape {np.shape(sprite)}; this config draws ({config.digit_size}, {config.digit_size}) digits")
    (low_row, high_row), (low_col, high_col) = start_range(config, direction)
    if not (low_row <= start[0] <= high_row and low_col <= start[1] <= high_col):
        raise ValueError(
            f"start {tuple(start)} moving {direction} leaves the frame; rows {low_row}..{high_row} and columns "
            f"{low_col}..{high_col} keep the digit in view"
        )
    size, (row_step, col_step) = config.digit_size, DIRECTIONS[direction]
    pixels = torch.from_numpy(np.asarray(sprite, np.float32)) / 127.5 - 1
    video = torch.full((config.frames, config.image_size, config.image_size), -1.0)
    for t in range(config.frames):
        row, col = start[0] + row_step * config.speed * t, start[1] + col_step * config.speed * t
        video[t, row : row + size, col : col + size] = pixels
    return video.expand(config.channels, -1, -1, -1).clone()


def random_item(sprites, labels, key: Key, config: MovingDigitsConfig) -> dict:
    """A training item (video, prompt, label, direction): a random digit, direction and start from ``key``.

    >>> from dsf.random import key
    >>> item = random_item([np.zeros((8, 8), np.uint8)], [3], key(0), MovingDigitsConfig())
    >>> item["label"], item["prompt"] == prompt_for(3, item["direction"])
    (3, True)
    """
    index_key, direction_key, row_key, col_key = split(key, 4)
    index = int(randint(index_key, 0, len(sprites)))
    direction = list(DIRECTIONS)[int(randint(direction_key, 0, len(DIRECTIONS)))]
    (low_row, high_row), (low_col, high_col) = start_range(config, direction)
    start = int(randint(row_key, low_row, high_row + 1)), int(randint(col_key, low_col, high_col + 1))
    label = int(labels[index])
    return {"video": render_video(sprites[index], direction, start, config), "prompt": prompt_for(label, direction),
            "label": label, "direction": direction}


def video_stream(sprites, labels, batch_size: int, key: Key, config: MovingDigitsConfig):
    """``data(position)`` for :func:`dsf.training.train.train`: endless batches of random videos, batch ``n``
    drawn from ``fold_in(key, n)`` (a resumed stream repeats the batches of an uninterrupted one).

    >>> from itertools import islice
    >>> from dsf.random import key
    >>> data = video_stream([np.zeros((8, 8), np.uint8)], [0], 2, key(0), MovingDigitsConfig())
    >>> [p for p, _ in islice(data(0), 3)], next(data(2))[1]["prompt"] == list(islice(data(0), 3))[2][1]["prompt"]
    ([1, 2, 3], True)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def data(position: int):
        while True:
            batch_key = fold_in(key, position)
            items = [random_item(sprites, labels, fold_in(batch_key, i), config) for i in range(batch_size)]
            position += 1
            yield position, collate(items)

    return data


def to_gray(videos: torch.Tensor) -> torch.Tensor:
    """Videos (..., channels, frames, H, W) in [-1, 1] as intensities (..., frames, H, W) in [0, 1].

    >>> to_gray(torch.full((3, 1, 2, 2), -1.0)).shape, to_gray(torch.ones(3, 1, 1, 1)).item()
    (torch.Size([1, 2, 2]), 1.0)
    """
    return ((videos.float().mean(dim=-4) + 1) / 2).clamp(0, 1)


def center_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted (row, column) of each frame (..., H, W) in [0, 1]; a blank frame's is its middle.

    >>> frame = torch.zeros(4, 4); frame[1, 3] = 1
    >>> center_of_mass(frame).tolist()
    [1.0, 3.0]
    """
    height, width = frames.shape[-2:]
    mass = frames.sum(dim=(-2, -1))
    safe = mass.clamp_min(1e-6)
    rows = (frames.sum(dim=-1) * torch.arange(height, dtype=frames.dtype)).sum(dim=-1) / safe
    cols = (frames.sum(dim=-2) * torch.arange(width, dtype=frames.dtype)).sum(dim=-1) / safe
    middle = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=frames.dtype)
    return torch.where(mass[..., None] > 1e-6, torch.stack([rows, cols], dim=-1), middle)


def motion_direction(video: torch.Tensor, min_distance: float = 1.0) -> str | None:
    """The direction (a key of ``DIRECTIONS``) the center of mass of a video (frames, H, W) in [0, 1]
    moves along most from the first to the last frame; ``None`` if it moves less than ``min_distance`` pixels that way.

    >>> video = torch.zeros(2, 4, 4); video[0, 2, 3] = 1; video[1, 2, 0] = 1
    >>> motion_direction(video), motion_direction(video[:1])
    ('left', None)
    """
    path = center_of_mass(video)
    shift = path[-1] - path[0]
    along = {name: float(shift @ torch.tensor(step, dtype=shift.dtype)) for name, step in DIRECTIONS.items()}
    best = max(along, key=along.get)
    return best if along[best] >= min_distance else None


def digit_crops(video: torch.Tensor, digit_size: int) -> torch.Tensor:
    """The ``digit_size``² window of each frame (frames, H, W) in [0, 1] centered on the frame's center
    of mass, sampled bilinearly (blank outside the frame): what a classifier of still digits reads.

    >>> video = torch.zeros(1, 16, 16); video[0, 9:13, 5:9] = 1
    >>> crop = digit_crops(video, 10)[0]
    >>> crop.shape, crop[3:7, 3:7].eq(1).all().item(), crop.sum().item()
    (torch.Size([10, 10]), True, 16.0)
    """
    height, width = video.shape[-2:]
    corner = center_of_mass(video) - (digit_size - 1) / 2  # (frames, 2)
    offsets = torch.arange(digit_size, dtype=corner.dtype)
    rows = (corner[:, 0, None] + offsets) / (height - 1) * 2 - 1  # (frames, digit_size), in grid_sample's [-1, 1]
    cols = (corner[:, 1, None] + offsets) / (width - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(cols[:, None, :], rows[:, :, None]), dim=-1)  # (frames, D, D, 2): (x, y)
    return F.grid_sample(video[:, None].float(), grid, align_corners=True)[:, 0]  # (frames, D, D)
