"""FLUX.1 text-to-image and image-to-image: prompt in, PIL images out, pure in one param tree.

``pipe.generate(params, prompt, ...)`` is a pure function of ``params = {"dit", "vae", "clip",
"t5"}`` (so any transform wraps it: ``offload(...)(pipe.generate)``); ``pipe(prompt, ...)`` calls
it with the loaded params. Each component computes on the device and in the dtype of its own
params, so a pipeline can keep, say, T5 on the CPU and the DiT in bf16 on a GPU.

Example (a tiny random pipeline; real ones come from :func:`load_pipeline`):
    >>> from dsf.models.flux.tiny import tiny_pipeline
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

from dsf.models.flux.keys import load_dit
from dsf.models.flux.model import FluxDiT
from dsf.models.flux.text import TextEncoder, load_clip, load_t5
from dsf.model_parts.flux_vae import FluxVAE
from dsf.model_parts.flux_vae_keys import load_vae
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.diffusion.sampling import sample, start_latents
from dsf.model_parts.pipelines import (
    ImagePipeline, check_size, component_options, component_source, device_of, dtype_of, pipeline_root, scheduler_config,
)
from dsf.diffusion.schedules import FlowSchedule, from_diffusers_config

# FLUX.1-dev's scheduler_config.json: μ linear in the image token count (0.5 at 256, 1.15 at 4096)
DEV_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


def pipeline_schedule(scheduler_config: dict) -> FlowSchedule:
    """The σ schedule of a FLUX.1 scheduler config as diffusers' FluxPipeline runs it: the grid
    ``linspace(1, 1/N, N)`` then the config's shift (dynamic in the image token count for dev)."""
    return dataclasses.replace(from_diffusers_config(scheduler_config), sigma_min=None)


@dataclass(frozen=True)
class FluxPipeline(ImagePipeline):
    """The four components with their loaded params, and the σ schedule."""

    dit: FluxDiT
    dit_params: dict = field(repr=False)
    vae: FluxVAE
    vae_params: dict = field(repr=False)
    clip: TextEncoder
    t5: TextEncoder
    schedule: FlowSchedule = field(default_factory=lambda: pipeline_schedule(DEV_SCHEDULER_CONFIG))
    max_sequence_length: int = 512

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "clip", "t5"}``."""
        return {"dit": self.dit_params, "vae": self.vae_params, "clip": self.clip.params, "t5": self.t5.params}

    @property
    def multiple(self) -> int:
        return 2 * self.vae.config.downsample_factor

    def encode_prompts(self, params, prompts: Sequence[str]) -> dict:
        """DiT conditioning of prompts: T5 states and pooled CLIP output, on the DiT's device and dtype."""
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        text = self.t5.encode(params["t5"], list(prompts), max_length=self.max_sequence_length)
        pooled = self.clip.encode(params["clip"], list(prompts))
        return {"text_embeds": text.to(device, dtype), "pooled_embeds": pooled.to(device, dtype)}

    def velocity(self, params, latents, sigma, text_embeds, pooled_embeds, guidance):
        return self.dit(params["dit"], latents, sigma.to(latents.dtype), text_embeds=text_embeds,
                        pooled_embeds=pooled_embeds, guidance=guidance)

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
        num_inference_steps: int = 30,
        height: int = 1024,
        width: int = 1024,
        embedded_guidance: float = 3.5,
        cfg_scale: float = 1.0,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        noise: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, 16, H/8, W/8) for ``prompt`` (a string or a list).

        ``negative_prompt``, ``seed`` (0), ``num_inference_steps`` (30), ``height``/``width``
        (1024, multiples of 16), ``embedded_guidance`` (3.5: the distilled guidance of dev models),
        ``cfg_scale`` (1.0; above 1, true classifier-free guidance against ``negative_prompt``, two
        DiT calls per step), ``input_image`` with ``denoising_strength`` < 1 (image-to-image from
        the encoded image noised to the schedule's first σ), ``noise`` (initial latents
        (B, 16, H/8, W/8) instead of the seeded ones), ``progress``.

        Differentiable in ``params`` when gradients are on (distillation trains through it).
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_finite(embedded_guidance=embedded_guidance, cfg_scale=cfg_scale, denoising_strength=denoising_strength)
        check_size(height, width, self.multiple)
        if noise is None:
            noise = self.noise(seed, len(prompts), height, width, params)
        factor = self.vae.config.downsample_factor
        tokens = (height // (2 * factor)) * (width // (2 * factor))
        sigmas = self.schedule.sigmas(num_inference_steps, denoising_strength=denoising_strength, image_seq_len=tokens)
        input_latents = None if input_image is None else self.encode_image(params, input_image, height, width, len(prompts))
        latents = start_latents(sigmas, noise, input_latents)

        guidance = None
        if self.dit.config.guidance_embeds:
            guidance = torch.full((len(prompts),), embedded_guidance, device=noise.device, dtype=noise.dtype)
        cond = {**self.encode_prompts(params, prompts), "guidance": guidance}
        negative_cond = {**self.encode_prompts(params, negatives), "guidance": guidance} if cfg_scale != 1.0 else None
        return sample(self.velocity, params, latents, sigmas, cond, negative_cond=negative_cond, cfg_scale=cfg_scale,
                      progress=progress, desc="FLUX.1")


def load_pipeline(
    source=None,
    *,
    dit=None,
    vae=None,
    text_encoder=None,
    text_encoder_2=None,
    tokenizer=None,
    tokenizer_2=None,
    dtype: torch.dtype | dict | None = None,
    device: str | torch.device | dict = "cpu",
    max_sequence_length: int = 512,
    dit_config: dict | None = None,
    vae_config: dict | None = None,
) -> FluxPipeline:
    """A FLUX.1 pipeline from a diffusers folder or hub repo (``source``), or from one source per component.

    Component sources (``dit``, ``vae``, ``text_encoder`` (CLIP), ``text_encoder_2`` (T5)) win over
    ``source``; each may be a file, folder, shard list, state dict or :class:`dsf.files.hub.ModelSource`
    (BFL single files such as ``flux1-dev.safetensors`` and ``ae.safetensors`` included).
    ``dtype`` and ``device`` are one value or a dict per component (keys ``dit, vae, clip, t5``);
    ``dit_config``/``vae_config`` (diffusers config keys) fill in what shapes cannot tell.
    The σ schedule comes from ``scheduler/scheduler_config.json`` when the folder has one, else
    FLUX.1-dev's.
    """
    root = pipeline_root(source, "FLUX.1")

    def options(name):
        return component_options(dtype, device, name)

    given = {"dit": (dit, "dit"), "vae": (vae, "vae"), "clip": (text_encoder, "text_encoder"),
             "t5": (text_encoder_2, "text_encoder_2")}
    sources = {key: component_source(value, root, name, "FLUX.1") for key, (value, name) in given.items()}
    dit_model, dit_params = load_dit(sources["dit"], dit_config, **options("dit"))
    vae_model, vae_params = load_vae(sources["vae"], vae_config, **options("vae"))
    clip = load_clip(sources["clip"], tokenizer, **options("clip"))
    t5 = load_t5(sources["t5"], tokenizer_2, max_length=max_sequence_length, **options("t5"))
    scheduler = scheduler_config(root, DEV_SCHEDULER_CONFIG)
    return FluxPipeline(dit_model, dit_params, vae_model, vae_params, clip, t5, schedule=pipeline_schedule(scheduler),
                        max_sequence_length=max_sequence_length)
