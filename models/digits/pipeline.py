"""The digits pipeline: a saved model folder, and prompts to PIL images.

A model folder holds ``config.json`` (the :class:`DigitsConfig`), ``dit.safetensors``,
``text_encoder/model.safetensors`` and ``tokenizer/tokenizer.json``; :func:`save_model` writes it
to a temporary folder and renames it, so a folder is either complete or absent.

Example:
    >>> import tempfile, dsf
    >>> from dsf.models.digits import DigitsConfig, new_model, save_model, load_model, generate
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = save_model(model, folder + "/digits")
    ...     images = generate(load_model(folder + "/digits"), ["a handwritten digit three"], seed=0,
    ...                       num_inference_steps=2, progress=False)
    >>> images[0].size
    (16, 16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import dsf
from dsf.models.digits.config import DigitsConfig
from dsf.models.digits.folder import read_model_folder, write_model_folder
from dsf.models.digits.model import dit_apply, init_dit
from dsf.models.digits.text import build_tokenizer, text_encoder_fn, text_encoder_module, tokenize
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FlowSchedule

SCHEDULE = FlowSchedule()  # σ uniform on [0, 1]: no shift for 16×16 images


@dataclass(frozen=True)
class DigitsModel:
    """Everything generation needs: the config, ``params = {"dit": ..., "text_encoder": ...}``,
    the pure text encoder and the tokenizer."""

    config: DigitsConfig
    params: dict
    encode_text: Callable
    tokenizer: object

    def velocity(self, params, x, sigma, text_embeds):
        return dit_apply(params["dit"], x, sigma, text_embeds, config=self.config)

    def text_embeds(self, params, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_text(params["text_encoder"], tokenize(self.tokenizer, prompts, self.config.max_prompt_tokens))


def new_model(config: DigitsConfig, key: dsf.random.Key) -> DigitsModel:
    """A freshly initialized model (DiT and seeded text encoder) drawn from ``key``."""
    dit_key, text_key = dsf.random.split(key)
    encode, text_params = text_encoder_fn(text_encoder_module(config, text_key))
    return DigitsModel(config, {"dit": init_dit(config, dit_key), "text_encoder": text_params}, encode, build_tokenizer())


def save_model(model: DigitsModel, folder: str | os.PathLike) -> Path:
    """Write the model folder atomically (:func:`dsf.models.digits.folder.write_model_folder`)."""
    return write_model_folder(folder, model.config.to_dict(), model.params, model.tokenizer)


def load_model(folder: str | os.PathLike) -> DigitsModel:
    """Read a folder written by :func:`save_model`."""
    config, params, tokenizer = read_model_folder(folder, "recipes/train_from_scratch.py")
    config = DigitsConfig(**config)
    encode, _ = text_encoder_fn(text_encoder_module(config))
    return DigitsModel(config, params, encode, tokenizer)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] as PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


@torch.no_grad()
def generate_tensors(
    model: DigitsModel, prompts: Sequence[str], seed: int, num_inference_steps: int = 20, cfg_scale: float = 3.0,
    negative_prompt: str = "", progress: bool = True,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], one per prompt; the noise of image ``i`` comes from ``fold_in(key(seed), i)``."""
    prompts, negatives = prompt_lists(prompts, negative_prompt)
    check_finite(cfg_scale=cfg_scale)
    cfg = model.config
    key = dsf.random.key(seed)
    noise = torch.stack([dsf.random.normal(dsf.random.fold_in(key, i), (cfg.channels, cfg.image_size, cfg.image_size))
                         for i in range(len(prompts))])
    cond = {"text_embeds": model.text_embeds(model.params, prompts)}
    negative = {"text_embeds": model.text_embeds(model.params, negatives)}
    return sample(model.velocity, model.params, noise, SCHEDULE.sigmas(num_inference_steps), cond,
                  negative_cond=negative, cfg_scale=cfg_scale, progress=progress)


def generate(model: DigitsModel, prompts: Sequence[str], seed: int, **kwargs) -> list[Image.Image]:
    """PIL images for ``prompts``; keyword arguments as :func:`generate_tensors`."""
    return to_pil(generate_tensors(model, prompts, seed, **kwargs))
