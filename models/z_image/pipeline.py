"""Z-Image text-to-image and image-to-image: prompt in, PIL images out, pure in one param tree.

``pipe.generate(params, prompt, ...)`` is a pure function of ``params = {"dit", "vae", "text_encoder"}``
(so any transform wraps it); ``pipe(prompt, ...)`` calls it with the loaded params. Each component
computes on the device and in the dtype of its own params.

Sampling follows diffusers' ``ZImagePipeline``: σ = ``linspace(1, 1/N, N)`` shifted by the
scheduler's static shift (3), Euler steps to 0. Turbo (step-distilled) takes 8 steps without
guidance (the defaults; diffusers' example uses 9); the base model 50 steps with ``cfg_scale`` 4
(DiffSynth-Studio's setting; diffusers' ``guidance_scale`` g is ``cfg_scale`` g + 1 here) and
optionally diffusers' ``cfg_normalization`` (the guided prediction's norm capped at that multiple
of the conditional one's) and ``cfg_truncation`` (no guidance once 1 − σ passes it).

Example (a tiny random pipeline; real ones come from :func:`load_pipeline`):
    >>> from dsf.models.z_image.tiny import tiny_pipeline
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
from dsf.model_parts.flux_vae import FluxVAE
from dsf.model_parts.flux_vae_keys import load_vae
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.model_parts.pipelines import (
    ImagePipeline, check_size, component_options, component_source, device_of, dtype_of, pipeline_root, scheduler_config,
)
from dsf.models.z_image.keys import load_dit
from dsf.models.z_image.model import ZImageDiT
from dsf.models.z_image.text import MAX_SEQUENCE_LENGTH, Qwen3TextEncoder, load_text_encoder

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
TURBO_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
TURBO_STEPS, BASE_STEPS, BASE_CFG_SCALE = 8, 50, 4.0


def pipeline_schedule(scheduler_config: dict) -> FlowSchedule:
    """The σ schedule of a scheduler config as diffusers' ZImagePipeline runs it: the grid ``linspace(1, 1/N, N)``
    (it passes these sigmas itself), then the config's shift.

    >>> pipeline_schedule(TURBO_SCHEDULER_CONFIG).sigmas(8)[:3].tolist()
    [1.0, 0.9545454382896423, 0.8999999761581421]
    """
    return dataclasses.replace(from_diffusers_config(scheduler_config), grid="exclusive", sigma_min=0.0)


def guided(positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float, cfg_normalization: float) -> torch.Tensor:
    """``negative + cfg_scale·(positive − negative)``, each sample's norm capped at ``cfg_normalization`` times
    ``positive``'s when that is positive (diffusers' ``cfg_normalization``).

    >>> guided(torch.ones(1, 2), torch.zeros(1, 2), 3.0, 0.0).tolist(), guided(torch.ones(1, 2), torch.zeros(1, 2), 3.0, 1.0).tolist()
    ([[3.0, 3.0]], [[1.0, 1.0]])
    """
    prediction = negative + cfg_scale * (positive - negative)
    if cfg_normalization > 0:
        dims = tuple(range(1, prediction.ndim))
        limit = torch.linalg.vector_norm(positive.float(), dim=dims, keepdim=True) * cfg_normalization
        norm = torch.linalg.vector_norm(prediction.float(), dim=dims, keepdim=True)
        prediction = torch.where(norm > limit, prediction * (limit / norm).to(prediction.dtype), prediction)
    return prediction


def _padded_cat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two (B, L, ...) tensors joined on the batch, the shorter zero-padded (False-padded) along L.

    >>> _padded_cat(torch.ones(1, 2), torch.ones(1, 1)).tolist()
    [[1.0, 1.0], [1.0, 0.0]]
    """
    joined = first.new_zeros((first.shape[0] + second.shape[0], max(first.shape[1], second.shape[1]), *first.shape[2:]))
    joined[: first.shape[0], : first.shape[1]] = first
    joined[first.shape[0] :, : second.shape[1]] = second
    return joined


@dataclass(frozen=True)
class ZImagePipeline(ImagePipeline):
    """The three components with their loaded params, and the σ schedule."""

    dit: ZImageDiT
    dit_params: dict = field(repr=False)
    vae: FluxVAE
    vae_params: dict = field(repr=False)
    text_encoder: Qwen3TextEncoder
    schedule: FlowSchedule = field(default_factory=lambda: pipeline_schedule(TURBO_SCHEDULER_CONFIG))
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "text_encoder"}``."""
        return {"dit": self.dit_params, "vae": self.vae_params, "text_encoder": self.text_encoder.params}

    @property
    def multiple(self) -> int:
        return 2 * self.vae.config.downsample_factor

    def encode_prompts(self, params, prompts: Sequence[str]) -> dict:
        """DiT conditioning of prompts: Qwen3 states and their mask, on the DiT's device and dtype."""
        embeds, mask = self.text_encoder.encode(params["text_encoder"], list(prompts), self.max_sequence_length)
        device = device_of(params["dit"])
        return {"text_embeds": embeds.to(device, dtype_of(params["dit"])), "text_mask": mask.to(device)}

    def velocity(self, params, latents, sigma, text_embeds, text_mask, negative=None, cfg_scale=1.0,
                 cfg_normalization=0.0, cfg_truncation=1.0):
        """The (guided) velocity at σ; with guidance the conditional and negative halves run as one batch.

        Guidance applies while ``1 − σ ≤ cfg_truncation`` (diffusers' ``cfg_truncation``)."""
        sigma = sigma.to(latents.dtype)
        if negative is None or cfg_scale == 1.0 or float(1 - sigma[0]) > cfg_truncation:
            return self.dit(params["dit"], latents, sigma, text_embeds=text_embeds, text_mask=text_mask)
        both = self.dit(params["dit"], torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                        text_embeds=_padded_cat(text_embeds, negative["text_embeds"]),
                        text_mask=_padded_cat(text_mask, negative["text_mask"]))
        positive, negative_velocity = both.chunk(2)
        return guided(positive.float(), negative_velocity.float(), cfg_scale, cfg_normalization).to(latents.dtype)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One image's latents: (16, H/8, W/8)."""
        factor = self.vae.config.downsample_factor
        return self.vae.config.latent_channels, height // factor, width // factor

    def denoise(
        self,
        params,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = "",
        seed: int = 0,
        num_inference_steps: int = TURBO_STEPS,
        height: int = 1024,
        width: int = 1024,
        cfg_scale: float = 1.0,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        noise: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, 16, H/8, W/8) for ``prompt`` (a string or a list).

        ``negative_prompt``, ``seed`` (0), ``num_inference_steps`` (8, Turbo; 50 for the base model),
        ``height``/``width`` (1024, multiples of 16), ``cfg_scale`` (1.0: no guidance, Turbo; 4 for the base
        model, two DiT passes per step), ``cfg_normalization`` (0: off), ``cfg_truncation`` (1.0: guidance at every
        step), ``input_image`` with ``denoising_strength`` < 1 (image-to-image), ``noise`` (initial latents
        (B, 16, H/8, W/8) instead of the seeded ones), ``progress``.

        Differentiable in ``params`` when gradients are on.
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_finite(cfg_scale=cfg_scale, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation,
                     denoising_strength=denoising_strength)
        check_size(height, width, self.multiple)
        if noise is None:
            noise = self.noise(seed, len(prompts), height, width, params)
        sigmas = self.schedule.sigmas(num_inference_steps, denoising_strength=denoising_strength,
                                      image_seq_len=(height // self.multiple) * (width // self.multiple))
        input_latents = None if input_image is None else self.encode_image(params, input_image, height, width, len(prompts))
        latents = start_latents(sigmas, noise, input_latents)
        cond = self.encode_prompts(params, prompts)
        if cfg_scale != 1.0:
            cond |= {"negative": self.encode_prompts(params, negatives), "cfg_scale": cfg_scale,
                     "cfg_normalization": cfg_normalization, "cfg_truncation": cfg_truncation}
        return sample(self.velocity, params, latents, sigmas, cond, progress=progress, desc="Z-Image")


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
) -> ZImagePipeline:
    """A Z-Image pipeline from a diffusers folder or hub repo (``source``: ``Tongyi-MAI/Z-Image-Turbo``,
    ``Tongyi-MAI/Z-Image``), or from one source per component.

    Component sources (``dit``, ``vae``, ``text_encoder`` (Qwen3)) win over ``source``; each may be a file,
    folder, shard list, state dict or :class:`dsf.files.hub.ModelSource` (Comfy-Org's single files such as
    ``z_image_turbo_bf16.safetensors``, ``ae.safetensors`` and ``qwen_3_4b.safetensors`` included; then pass
    ``tokenizer``, a folder with Z-Image's tokenizer files). ``dtype`` and ``device`` are one value or a dict per
    component (keys ``dit, vae, text_encoder``); the ``*_config`` dicts fill in what shapes cannot tell. The σ
    schedule comes from ``scheduler/scheduler_config.json`` when the folder has one, else Turbo's.
    """
    root = pipeline_root(source, "Z-Image")

    def options(name):
        return component_options(dtype, device, name)

    given = {"dit": dit, "vae": vae, "text_encoder": text_encoder}
    sources = {key: component_source(value, root, key, "Z-Image") for key, value in given.items()}
    dit_model, dit_params = load_dit(sources["dit"], dit_config, **options("dit"))
    vae_model, vae_params = load_vae(sources["vae"], vae_config, **options("vae"))
    encoder = load_text_encoder(sources["text_encoder"], tokenizer, config=text_encoder_config,
                                max_length=max_sequence_length, **options("text_encoder"))
    scheduler = scheduler_config(root, TURBO_SCHEDULER_CONFIG)
    return ZImagePipeline(dit_model, dit_params, vae_model, vae_params, encoder, schedule=pipeline_schedule(scheduler),
                          max_sequence_length=max_sequence_length)
