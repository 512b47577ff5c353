"""FLUX.2 text-to-image and editing (dev and klein): prompt and reference images in, PIL images out, pure in one
param tree.

``pipe.generate(params, prompt, ...)`` is a pure function of ``params = {"dit", "vae", "text"}`` (so any transform
wraps it: ``offload(...)(pipe.generate)``); ``pipe(prompt, ...)`` calls it with the loaded params. Each component
computes on the device and in the dtype of its own params. Guidance follows the model: dev embeds the guidance
scale (4.0) in the DiT; klein base runs classifier-free guidance (4.0, against the negative prompt, "" by default);
a distilled klein runs neither. Reference images (editing) are encoded by the VAE and attended as extra tokens at
time coordinates 10, 20, ... . The σ schedule is FLUX.2's: ``linspace(1, 1/N, N)`` shifted by the empirical μ of
the image token count and the step count.

Example (a tiny random pipeline; real ones come from :func:`load_pipeline`):
    >>> from dsf.models.flux2.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> image = pipe("a cat", seed=0, height=32, width=32, num_inference_steps=2, progress=False)
    >>> image.size
    (32, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX2, FlowSchedule
from dsf.files.io import read_json
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.model_parts.pipelines import (
    ImagePipeline,
    check_size,
    component_options,
    component_source,
    device_of,
    dtype_of,
    pipeline_root,
)
from dsf.models.flux2.keys import load_dit
from dsf.models.flux2.model import Flux2DiT
from dsf.models.flux2.text import MAX_TOKENS, Flux2TextEncoder, load_text_encoder
from dsf.models.flux2.vae import Flux2VAE, load_vae
from dsf.training.data import image_to_tensor, resize_and_crop, to_rgb

REFERENCE_MAX_PIXELS = 1024 * 1024  # a larger reference image is scaled down to this area first, as in diffusers
DEFAULT_STEPS = {"dev": 50, "klein-base": 50, "klein": 4}


def reference_image_tensor(image: Image.Image, multiple: int) -> torch.Tensor:
    """A reference image as the VAE takes it (3, H, W) in [−1, 1]: scaled (Lanczos) to at most 1024² pixels, its
    sides cut down to multiples of ``multiple`` by a centered crop.

    >>> reference_image_tensor(Image.new("RGB", (70, 40)), 16).shape
    torch.Size([3, 32, 64])
    """
    image = to_rgb(image)
    if image.width * image.height > REFERENCE_MAX_PIXELS:
        scale = math.sqrt(REFERENCE_MAX_PIXELS / (image.width * image.height))
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
    height, width = image.height // multiple * multiple, image.width // multiple * multiple
    if min(height, width) == 0:
        raise ValueError(f"a reference image of {image.width}×{image.height} pixels is smaller than {multiple}×{multiple}")
    return image_to_tensor(resize_and_crop(image, height, width))


@dataclass(frozen=True)
class Flux2Pipeline(ImagePipeline):
    """The three components with their loaded params, the σ schedule, and whether the model is step-distilled; seeded
    noise, decoding and PIL images are :class:`dsf.model_parts.pipelines.ImagePipeline`'s."""

    dit: Flux2DiT
    dit_params: dict = field(repr=False)
    vae: Flux2VAE
    vae_params: dict = field(repr=False)
    text: Flux2TextEncoder
    schedule: FlowSchedule = FLUX2
    max_sequence_length: int = MAX_TOKENS
    distilled: bool = False

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "text"}``."""
        return {"dit": self.dit_params, "vae": self.vae_params, "text": self.text.params}

    @property
    def multiple(self) -> int:
        return 2 * self.vae.config.downsample_factor

    @property
    def variant(self) -> str:
        """``"dev"`` (embedded guidance), ``"klein"`` (step-distilled) or ``"klein-base"``."""
        if self.dit.config.guidance_embeds:
            return "dev"
        return "klein" if self.distilled else "klein-base"

    def encode_prompts(self, params, prompts: Sequence[str]) -> torch.Tensor:
        """The DiT's ``text_embeds`` (B, L, 3·hidden) of prompts, on the DiT's device and dtype."""
        embeds = self.text.encode(params["text"], list(prompts), max_length=self.max_sequence_length)
        return embeds.to(device_of(params["dit"]), dtype_of(params["dit"]))

    def velocity(self, params, latents, sigma, text_embeds, guidance, reference_latents):
        return self.dit(params["dit"], latents, sigma.to(latents.dtype), text_embeds=text_embeds, guidance=guidance,
                        reference_latents=reference_latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One image's latents: (128, H/16, W/16)."""
        return self.vae.config.patch_channels, height // self.multiple, width // self.multiple

    def encode_references(self, params, images: Sequence[Image.Image], batch: int) -> list[torch.Tensor]:
        """Each reference image as normalized latents (B, 128, h_k, w_k) on the DiT's device (the mode, no noise)."""
        latents = []
        for image in images:
            pixels = reference_image_tensor(image, self.multiple)[None]
            encoded = self.vae.encode(params["vae"], pixels.to(device_of(params["vae"]), dtype_of(params["vae"])))
            latents.append(encoded.to(device_of(params["dit"]), dtype_of(params["dit"])).expand(batch, -1, -1, -1))
        return latents

    def denoise(
        self,
        params,
        prompt: str | Sequence[str],
        *,
        images: Sequence[Image.Image] = (),
        negative_prompt: str | Sequence[str] = "",
        seed: int = 0,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 4.0,
        noise: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, 128, H/16, W/16) for ``prompt`` (a string or a list).

        ``images`` (reference images to edit from or combine; the output takes the last one's size unless
        ``height``/``width`` are given), ``negative_prompt`` (klein base), ``seed`` (0), ``num_inference_steps``
        (dev and klein base 50, distilled klein 4), ``height``/``width`` (1024, multiples of 16),
        ``guidance_scale`` (4.0: embedded for dev, classifier-free for klein base, unused by distilled klein),
        ``noise`` (initial latents (B, 128, H/16, W/16) instead of the seeded ones), ``progress``. Differentiable
        in ``params`` when gradients are on (direct distillation trains through it).
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_finite(guidance_scale=guidance_scale)
        references = self.encode_references(params, images, len(prompts))
        if references:
            height = height or references[-1].shape[-2] * self.multiple
            width = width or references[-1].shape[-1] * self.multiple
        height, width = height or 1024, width or 1024
        check_size(height, width, self.multiple)
        if noise is None:
            noise = self.noise(seed, len(prompts), height, width, params)
        steps = num_inference_steps or DEFAULT_STEPS[self.variant]
        sigmas = self.schedule.sigmas(steps, image_seq_len=(height // self.multiple) * (width // self.multiple))
        guidance = torch.full((len(prompts),), guidance_scale, device=noise.device, dtype=noise.dtype)
        embedded = guidance if self.dit.config.guidance_embeds else None
        cond = {"text_embeds": self.encode_prompts(params, prompts), "guidance": embedded, "reference_latents": references}
        cfg_scale = guidance_scale if self.variant == "klein-base" and guidance_scale > 1 else 1.0
        negative_cond = None if cfg_scale == 1.0 else cond | {"text_embeds": self.encode_prompts(params, negatives)}
        return sample(self.velocity, params, noise, sigmas, cond, negative_cond=negative_cond, cfg_scale=cfg_scale,
                      progress=progress, desc="FLUX.2")



def load_pipeline(
    source=None,
    *,
    dit=None,
    vae=None,
    text_encoder=None,
    tokenizer=None,
    dtype: torch.dtype | dict | None = None,
    device: str | torch.device | dict = "cpu",
    max_sequence_length: int = MAX_TOKENS,
    dit_config: dict | None = None,
    vae_config: dict | None = None,
    text_config: dict | None = None,
    distilled: bool | None = None,
) -> Flux2Pipeline:
    """A FLUX.2 pipeline (dev or klein) from a diffusers folder or hub repo (``source``), or one source per component.

    Component sources (``dit``, ``vae``, ``text_encoder``) win over ``source``; each may be a file, folder, shard list,
    state dict or :class:`dsf.files.hub.ModelSource` (BFL's ``flux2-dev.safetensors``, ``flux2-klein-4b.safetensors``
    and ``ae.safetensors``, ComfyUI's files). ``dtype`` and ``device`` are one value or a dict per component (keys
    ``dit, vae, text``); ``dit_config``/``vae_config``/``text_config`` fill in what shapes cannot tell. ``distilled``
    (klein: 4 steps, no CFG) defaults to the folder's ``model_index.json`` ``is_distilled``, else False.
    """
    root = pipeline_root(source, "FLUX.2")

    def options(name):
        return component_options(dtype, device, name)

    given = {"dit": (dit, "dit"), "vae": (vae, "vae"), "text": (text_encoder, "text_encoder")}
    sources = {key: component_source(value, root, name, "FLUX.2") for key, (value, name) in given.items()}
    dit_model, dit_params = load_dit(sources["dit"], dit_config, **options("dit"))
    vae_model, vae_params = load_vae(sources["vae"], vae_config, **options("vae"))
    text = load_text_encoder(sources["text"], tokenizer, config=text_config, max_length=max_sequence_length, **options("text"))
    index = root / "model_index.json" if root is not None else None
    if distilled is None:
        distilled = bool(read_json(index).get("is_distilled", False)) if index is not None and index.is_file() else False
    return Flux2Pipeline(dit_model, dit_params, vae_model, vae_params, text, max_sequence_length=max_sequence_length,
                         distilled=distilled)
