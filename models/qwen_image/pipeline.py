"""Qwen-Image text-to-image and image-to-image: prompt in, PIL images out, pure in one param tree.

``pipe.generate(params, prompt, ...)`` is a pure function of ``params = {"dit", "vae", "text_encoder"}`` (so any
transform wraps it: ``offload(...)(pipe.generate)``); ``pipe(prompt, ...)`` calls it with the loaded params. Each
component computes on the device and in the dtype of its own params.

Guidance is diffusers' "true CFG": the DiT runs on the prompt and on the negative prompt, the guided velocity
``neg + s·(pos − neg)`` is rescaled, token by token (2×2 latent patch), to the norm of the prompt's velocity.

Example (a tiny random pipeline; real ones come from :func:`load_pipeline`):
    >>> from dsf.models.qwen_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> image = pipe("a cat", seed=0, height=32, width=32, num_inference_steps=2, progress=False)
    >>> image.size
    (32, 32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from dsf.diffusion.sampling import sample, start_latents
from dsf.diffusion.schedules import FlowSchedule, from_diffusers_config
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.model_parts.pipelines import (
    ImagePipeline,
    check_size,
    component_options,
    component_source,
    device_of,
    dtype_of,
    pipeline_root,
    scheduler_config,
)
from dsf.models.qwen_image.keys import load_dit
from dsf.models.qwen_image.model import QwenImageDiT, patchify, unpatchify
from dsf.models.qwen_image.text import MAX_SEQUENCE_LENGTH, QwenTextEncoder, load_text_encoder
from dsf.models.qwen_image.vae import QwenImageVAE, load_vae

# Qwen/Qwen-Image's scheduler/scheduler_config.json: μ linear in the image token count (0.5 at 256, 0.9 at 8192),
# exponential shift, then the last σ stretched to 0.02
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential", "use_dynamic_shifting": True,
}
# the official model card's defaults
HEIGHT = WIDTH = 1328
NUM_INFERENCE_STEPS = 50
CFG_SCALE = 4.0
NEGATIVE_PROMPT = " "


def pipeline_schedule(scheduler_config: dict) -> FlowSchedule:
    """The σ schedule of a Qwen-Image scheduler config as diffusers' QwenImagePipeline runs it: the grid
    ``linspace(1, 1/N, N)``, the exponential shift with μ from the image token count, the terminal stretch.

    >>> pipeline_schedule(SCHEDULER_CONFIG).sigmas(4, image_seq_len=256)
    tensor([1.0000, 0.7446, 0.4267, 0.0200])
    """
    return dataclasses.replace(from_diffusers_config(scheduler_config), sigma_min=None)


def rescaled_guidance(positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``neg + s·(pos − neg)`` of velocities (B, C, H, W), each 2×2 patch token rescaled to the norm of ``positive``'s.

    >>> v = torch.randn(1, 16, 2, 2)
    >>> torch.allclose(rescaled_guidance(v, torch.zeros_like(v), 4.0), v)
    True
    """
    guided = patchify(negative + cfg_scale * (positive - negative))  # (B, S, C·4)
    scale = patchify(positive).norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
    return unpatchify(guided * scale, *positive.shape[-2:])


@dataclass(frozen=True)
class QwenImagePipeline(ImagePipeline):
    """The three components with their loaded params, and the σ schedule (``generate``, ``decode``, ``noise``,
    ``encode_image`` and ``__call__`` from :class:`dsf.model_parts.pipelines.ImagePipeline`)."""

    dit: QwenImageDiT
    dit_params: dict = field(repr=False)
    vae: QwenImageVAE
    vae_params: dict = field(repr=False)
    text_encoder: QwenTextEncoder
    schedule: FlowSchedule = field(default_factory=lambda: pipeline_schedule(SCHEDULER_CONFIG))

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "text_encoder"}``."""
        return {"dit": self.dit_params, "vae": self.vae_params, "text_encoder": self.text_encoder.params}

    @property
    def multiple(self) -> int:
        return 2 * self.vae.config.spatial_factor

    def encode_prompts(self, params, prompts: Sequence[str]) -> dict:
        """DiT conditioning of prompts: ``text_embeds`` and ``text_mask``, on the DiT's device (embeds in its dtype)."""
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        embeds, mask = self.text_encoder.encode(params["text_encoder"], list(prompts))
        return {"text_embeds": embeds.to(device, dtype), "text_mask": mask.to(device)}

    def velocity(self, params, latents, sigma, positive: dict, negative: dict | None = None, cfg_scale: float = 1.0):
        """The DiT's velocity for the prompt (``positive``: DiT keyword arguments), guided against ``negative``
        (:func:`rescaled_guidance`) when ``cfg_scale != 1``."""
        sigma = sigma.to(latents.dtype)
        velocity = self.dit(params["dit"], latents, sigma, **positive)
        if cfg_scale == 1.0:
            return velocity
        return rescaled_guidance(velocity, self.dit(params["dit"], latents, sigma, **negative), cfg_scale)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One image's latents: (16, H/8, W/8)."""
        factor = self.vae.config.spatial_factor
        return self.vae.config.z_dim, height // factor, width // factor

    def denoise(
        self,
        params,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = NEGATIVE_PROMPT,
        seed: int = 0,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        height: int = HEIGHT,
        width: int = WIDTH,
        cfg_scale: float = CFG_SCALE,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        noise: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, 16, H/8, W/8) for ``prompt`` (a string or a list); differentiable in ``params`` when
        gradients are on.

        ``negative_prompt`` (" "), ``seed`` (0), ``num_inference_steps`` (50), ``height``/``width`` (1328,
        multiples of 16), ``cfg_scale`` (4.0; 1.0 runs the DiT once a step, without the negative prompt),
        ``input_image`` with ``denoising_strength`` < 1 (image-to-image from the encoded image noised to the
        schedule's first σ), ``noise`` (initial latents (B, 16, H/8, W/8) instead of the seeded ones), ``progress``.
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_finite(cfg_scale=cfg_scale, denoising_strength=denoising_strength)
        check_size(height, width, self.multiple)
        if noise is None:
            noise = self.noise(seed, len(prompts), height, width, params)
        tokens = (height // self.multiple) * (width // self.multiple)
        sigmas = self.schedule.sigmas(num_inference_steps, denoising_strength=denoising_strength, image_seq_len=tokens)
        input_latents = None if input_image is None else self.encode_image(params, input_image, height, width, len(prompts))
        latents = start_latents(sigmas, noise, input_latents)
        guidance = {"positive": self.encode_prompts(params, prompts), "cfg_scale": cfg_scale}
        if cfg_scale != 1.0:
            guidance["negative"] = self.encode_prompts(params, negatives)
        return sample(self.velocity, params, latents, sigmas, guidance, progress=progress, desc="Qwen-Image")


def load_pipeline(
    source=None,
    *,
    dit=None,
    vae=None,
    text_encoder=None,
    tokenizer=None,
    dtype: torch.dtype | dict | None = None,
    device: str | torch.device | dict = "cpu",
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    dit_config: dict | None = None,
    vae_config: dict | None = None,
    text_encoder_config: dict | None = None,
) -> QwenImagePipeline:
    """A Qwen-Image pipeline from a diffusers folder or hub repo (``source``: ``Qwen/Qwen-Image``), or from one source
    per component.

    Component sources (``dit``, ``vae``, ``text_encoder``) win over ``source``; each may be a file, folder, shard
    list, state dict or :class:`dsf.files.hub.ModelSource` (ComfyUI's ``qwen_image_bf16.safetensors``,
    ``qwen_image_vae.safetensors`` and ``qwen_2.5_vl_7b.safetensors`` included; give ``tokenizer=`` with the last).
    ``dtype`` and ``device`` are one value or a dict per component (keys ``dit, vae, text_encoder``); the
    ``*_config`` (diffusers / transformers config keys) fill in what shapes cannot tell. The σ schedule comes from
    ``scheduler/scheduler_config.json`` when the folder has one, else Qwen-Image's.
    """
    root = pipeline_root(source, "Qwen-Image")

    def options(name):
        return component_options(dtype, device, name)

    given = {"dit": dit, "vae": vae, "text_encoder": text_encoder}
    sources = {name: component_source(value, root, name, "Qwen-Image") for name, value in given.items()}
    dit_model, dit_params = load_dit(sources["dit"], dit_config, **options("dit"))
    vae_model, vae_params = load_vae(sources["vae"], vae_config, **options("vae"))
    encoder = load_text_encoder(sources["text_encoder"], tokenizer, config=text_encoder_config,
                                max_sequence_length=max_sequence_length, **options("text_encoder"))
    scheduler = scheduler_config(root, SCHEDULER_CONFIG)
    return QwenImagePipeline(dit_model, dit_params, vae_model, vae_params, encoder, schedule=pipeline_schedule(scheduler))
