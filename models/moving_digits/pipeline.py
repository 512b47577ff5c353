"""The moving-digits pipeline: the model record, its training loss, a saved model folder, and prompts to videos.

A model folder holds ``config.json`` (the :class:`MovingDigitsConfig`), ``dit.safetensors`` (the
Wan DiT in the diffusers key layout), ``text_encoder/model.safetensors`` and
``tokenizer/tokenizer.json``; :func:`save_model` writes it to a temporary folder and renames it, so
a folder is either complete or absent.

Example:
    >>> import tempfile, dsf
    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1, text_dim=8, text_layers=1)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     model = load_model(save_model(new_model(cfg, dsf.random.key(0)), folder + "/model"))
    >>> generate_tensors(model, ["a handwritten digit three moving up"], seed=0, num_inference_steps=2, progress=False).shape
    torch.Size([1, 3, 5, 16, 16])
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import dsf
from dsf.diffusion.losses import drop_prompts, flow_matching_loss
from dsf.models import wan
from dsf.models.digits.folder import read_model_folder, write_model_folder
from dsf.models.digits.text import tokenize
from dsf.models.moving_digits.model import (
    MovingDigitsConfig, build_tokenizer, init_dit, text_encoder_fn, text_encoder_module,
)
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FlowSchedule

SCHEDULE = FlowSchedule(shift=3.0)  # a 3×5×16×16 video has 5× a 16×16 image's values: more steps at high σ


@dataclass(frozen=True)
class MovingDigitsModel:
    """Everything training and generation need: the config, ``params = {"dit": ..., "text_encoder": ...}``,
    the pure text encoder and the tokenizer.

    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1, text_dim=8, text_layers=1)
    >>> model = new_model(cfg, dsf.random.key(0))
    >>> text = model.text_embeds(model.params, ["a handwritten digit one moving left"])
    >>> text.shape, model.velocity(model.params, torch.zeros(1, 3, 5, 16, 16), torch.ones(1), text).shape
    (torch.Size([1, 8, 8]), torch.Size([1, 3, 5, 16, 16]))
    """

    config: MovingDigitsConfig
    params: dict
    encode_text: Callable
    tokenizer: object

    def velocity(self, params, x, sigma, text_embeds):
        return wan.apply(params["dit"], x, sigma, text_embeds, config=self.config.wan)

    def text_embeds(self, params, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_text(params["text_encoder"], tokenize(self.tokenizer, prompts, self.config.max_prompt_tokens))


def new_model(config: MovingDigitsConfig, key: dsf.random.Key) -> MovingDigitsModel:
    """A freshly initialized model (:func:`init_dit` and a seeded text encoder) drawn from ``key``: the zero velocity field.

    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=2, text_dim=8, text_layers=1)
    >>> model = new_model(cfg, dsf.random.key(0))
    >>> len(model.params["dit"]["blocks"]), model.velocity(model.params, torch.ones(1, 3, 5, 16, 16), torch.ones(1),
    ...                                                    torch.ones(1, 8, 8)).abs().max().item()
    (2, 0.0)
    """
    dit_key, text_key = dsf.random.split(key)
    encode, text_params = text_encoder_fn(text_encoder_module(config, text_key))
    params = {"dit": init_dit(config, dit_key), "text_encoder": text_params}
    return MovingDigitsModel(config, params, encode, build_tokenizer())


def moving_digits_loss(model: MovingDigitsModel, prompt_dropout: float = 0.1):
    """``loss(params, batch, key)``: flow matching on the batch's videos; each prompt is replaced by the
    empty prompt with probability ``prompt_dropout``, so the model also learns the unconditional
    velocity that classifier-free guidance needs.

    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1, text_dim=8, text_layers=1)
    >>> model = new_model(cfg, dsf.random.key(0))
    >>> batch = {"video": torch.zeros(2, 3, 5, 16, 16), "prompt": ["a handwritten digit one moving up"] * 2}
    >>> moving_digits_loss(model)(model.params, batch, dsf.random.key(1)).shape
    torch.Size([])
    """
    def loss(params, batch, key):
        drop_key, loss_key = dsf.random.split(key)
        cond = {"text_embeds": model.text_embeds(params, drop_prompts(drop_key, batch["prompt"], prompt_dropout))}
        return flow_matching_loss(model.velocity, params, batch["video"], loss_key, cond, schedule=SCHEDULE)

    return loss


def save_model(model: MovingDigitsModel, folder: str | os.PathLike) -> Path:
    """Write the model folder atomically (:func:`dsf.models.digits.folder.write_model_folder`); see the module example."""
    return write_model_folder(folder, model.config.to_dict(), model.params, model.tokenizer)


def load_model(folder: str | os.PathLike) -> MovingDigitsModel:
    """Read a folder written by :func:`save_model`; see the module example.

    >>> load_model("/no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/model/config.json not found: the model must be a folder written by recipes/train_moving_digits.py
    """
    config, params, tokenizer = read_model_folder(folder, "recipes/train_moving_digits.py")
    config = MovingDigitsConfig(**config)
    encode, _ = text_encoder_fn(text_encoder_module(config))
    return MovingDigitsModel(config, params, encode, tokenizer)


@torch.no_grad()
def generate_tensors(
    model: MovingDigitsModel, prompts: Sequence[str], seed: int, num_inference_steps: int = 20, cfg_scale: float = 4.0,
    negative_prompt: str = "", progress: bool = True,
) -> torch.Tensor:
    """Videos (B, channels, frames, H, W) in [-1, 1], one per prompt; the noise of video ``i`` comes
    from ``fold_in(key(seed), i)``, so a video does not depend on the others in the batch.

    >>> cfg = MovingDigitsConfig(num_heads=2, head_dim=12, ffn_dim=16, num_layers=1, text_dim=8, text_layers=1)
    >>> model = new_model(cfg, dsf.random.key(0))
    >>> a = generate_tensors(model, ["a digit one moving up"] * 2, seed=3, num_inference_steps=2, progress=False)
    >>> b = generate_tensors(model, ["a digit one moving up"], seed=3, num_inference_steps=2, progress=False)
    >>> torch.allclose(a[:1], b, atol=1e-6), torch.equal(a[0], a[1])
    (True, False)
    """
    prompts, negatives = prompt_lists(prompts, negative_prompt)
    check_finite(cfg_scale=cfg_scale)
    cfg = model.config
    key = dsf.random.key(seed)
    shape = (cfg.channels, cfg.frames, cfg.image_size, cfg.image_size)
    noise = torch.stack([dsf.random.normal(dsf.random.fold_in(key, i), shape) for i in range(len(prompts))])
    cond = {"text_embeds": model.text_embeds(model.params, prompts)}
    negative = {"text_embeds": model.text_embeds(model.params, negatives)}
    return sample(model.velocity, model.params, noise, SCHEDULE.sigmas(num_inference_steps), cond,
                  negative_cond=negative, cfg_scale=cfg_scale, progress=progress)


def video_strip(videos: torch.Tensor, per_row: int, scale: int = 4) -> Image.Image:
    """Videos (N, channels, frames, H, W) in [-1, 1] as one image: ``per_row`` videos a row, each its
    frames left to right (1-pixel gaps between frames, 4 between videos), upscaled ``scale``×.

    >>> video_strip(torch.zeros(6, 3, 5, 16, 16), per_row=3, scale=1).size
    (260, 33)
    """
    count, _, frames, height, width = videos.shape
    rows = -(-count // per_row)
    video_width = frames * (width + 1) - 1
    grid = Image.new("RGB", (per_row * (video_width + 4) - 4, rows * (height + 1) - 1), (96, 96, 96))
    pixels = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()  # (N, T, H, W, C)
    for i, video in enumerate(pixels):
        left, top = (i % per_row) * (video_width + 4), (i // per_row) * (height + 1)
        for t, frame in enumerate(video):
            grid.paste(Image.fromarray(np.ascontiguousarray(frame)), (left + t * (width + 1), top))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG at ``path`` through a temporary sibling file, so ``path`` is complete or absent.

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.open(save_image(Image.new("RGB", (3, 2)), Path(folder) / "strip.png")).size, os.listdir(folder)
    ((3, 2), ['strip.png'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path
