"""Training the digits model: scikit-learn's handwritten digits as a real dataset folder, the
flow-matching loss with prompt dropout (for classifier-free guidance), and a resumable data stream.

Example:
    >>> import tempfile, dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> from dsf.models.digits.training import write_digits_folder, load_training_set, digits_loss, data_stream
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     items = load_training_set(write_digits_folder(folder, image_size=16, limit=8), image_size=16)
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> position, batch = next(data_stream(items, batch_size=4, key=dsf.random.key(1))(0))
    >>> loss = digits_loss(model)(model.params, batch, dsf.random.key(2))
    >>> position, loss.shape
    (4, torch.Size([]))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

import dsf
from dsf.training.data import FolderDataset, batches, write_image_folder
from dsf.diffusion.losses import drop_prompts, flow_matching_loss
from dsf.models.digits.pipeline import SCHEDULE, DigitsModel
from dsf.models.digits.text import prompt_for


def digit_images(image_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """scikit-learn's 1,797 digits (8×8, values 0–16) upscaled bilinearly to uint8 ``image_size`` squares, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        np.asarray(Image.fromarray((d * (255 / 16)).astype(np.float32)).resize((image_size, image_size), Image.BILINEAR))
        .clip(0, 255).round().astype(np.uint8)
        for d in digits.images
    ]
    return images, digits.target


def write_digits_folder(folder: str | os.PathLike, image_size: int = 16, limit: int | None = None) -> Path:
    """The digits as a dataset folder (PNG files and ``metadata.csv`` with prompt and label); returns the csv path."""
    images, labels = digit_images(image_size)
    images, labels = images[:limit], labels[:limit]
    rows = [{"prompt": prompt_for(int(label)), "label": int(label)} for label in labels]
    return write_image_folder(folder, images, rows)


def load_training_set(metadata_path: str | os.PathLike, image_size: int) -> list[dict]:
    """Every item of the dataset folder, loaded once into memory."""
    metadata_path = Path(metadata_path)
    dataset = FolderDataset(metadata_path.parent, metadata_path, image_size=(image_size, image_size))
    return [dataset[i] for i in range(len(dataset))]


def data_stream(items: list[dict], batch_size: int, key: dsf.random.Key):
    """``data(position)`` for :func:`dsf.training.train.train`: shuffled batches, resumable at a position."""
    return lambda start: batches(items, batch_size, key, start=start)


def digits_loss(model: DigitsModel, prompt_dropout: float = 0.1):
    """``loss(params, batch, key)``: flow matching on the batch's images; each prompt is replaced by
    the empty prompt with probability ``prompt_dropout`` so the model also learns the unconditional
    velocity that classifier-free guidance needs."""

    def loss(params, batch, key):
        drop_key, loss_key = dsf.random.split(key)
        cond = {"text_embeds": model.text_embeds(params, drop_prompts(drop_key, batch["prompt"], prompt_dropout))}
        return flow_matching_loss(model.velocity, params, batch["image"], loss_key, cond, schedule=SCHEDULE)

    return loss
