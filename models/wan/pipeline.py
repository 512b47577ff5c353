"""Wan 2.1 / 2.2 text-to-video and image-to-video: prompt (and image) in, PIL frames out, pure in one param tree.

``pipe.generate(params, prompt, ...)`` is a pure function of ``params = {"dit", "vae", "t5"}``
(plus ``"clip"`` for Wan2.1 image-to-video; ``params["dit"]`` is ``{"high_noise", "low_noise"}``
for a Wan2.2 A14B model), so any transform wraps it; ``pipe(prompt, ...)`` calls it with the loaded
params. Each component computes on the device and in the dtype of its own params; the latents stay
float32 between steps. Sampling is flow-matching Euler on DiffSynth-Studio's Wan schedule
(``linspace(1, 0, N+1)[:-1]``, static shift 5), with classifier-free guidance against a negative
prompt (Wan's own by default).

The task follows from the components (:attr:`WanPipeline.task`):

- ``text-to-video`` (Wan2.1 T2V, Wan2.2 T2V-A14B): no image;
- ``image-to-video`` (Wan2.1 I2V, Wan2.2 I2V-A14B): the image is required; the DiT gets 4 mask
  channels (1 on the first latent frame) and the VAE latents of the image followed by black
  frames, and, for Wan2.1, the image's CLIP features (as diffusers' ``WanImageToVideoPipeline``);
- ``text-image-to-video`` (Wan2.2 TI2V-5B, the Wan 2.2 VAE): with an image, the DiT sees the
  encoded image as the first latent frame, at σ 0 (one timestep per latent frame), and the result
  keeps it; without one, text-to-video.

Example (a tiny random pipeline; real ones come from :func:`load_pipeline`):
    >>> from dsf.models.wan.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> frames = pipe("a cat", seed=0, num_frames=5, height=32, width=32, num_inference_steps=2, progress=False)
    >>> len(frames), frames[0].size
    (5, (32, 32))
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from einops import rearrange
from PIL import Image

import dsf
from dsf.training.data import image_to_tensor, resize_and_crop, to_rgb
from dsf.files.hub import local_source
from dsf.model_parts.pipelines import check_size, component_options, component_source, device_of, dtype_of, pipeline_root, to_pil
from dsf.models.wan.config import WanConfig
from dsf.models.wan.keys import EXPERT_FOLDERS, load_dit, load_two_expert_dit
from dsf.models.wan.model import TwoExpertDiT, WanDiT
from dsf.models.wan.text import ImageEncoder, TextEncoder, load_clip_vision, load_umt5
from dsf.model_parts.wan_vae import WanVAE
from dsf.model_parts.wan_vae_keys import load_vae
from dsf.model_parts.input_checks import check_finite, prompt_lists
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import WAN

# Wan's default negative prompt (Wan2.1/2.2 shared_config.sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FPS = 16  # Wan's videos play at 16 frames a second
TEXT_TO_VIDEO, IMAGE_TO_VIDEO, TEXT_IMAGE_TO_VIDEO = "text-to-video", "image-to-video", "text-image-to-video"
EXPERTS = ("high_noise", "low_noise")


def check_frames(num_frames: int, temporal_factor: int = 4) -> None:
    """Refuse a frame count the causal VAE cannot encode (1 + 4k), naming the nearest counts that work.

    >>> check_frames(80)
    Traceback (most recent call last):
    ...
    ValueError: num_frames 80 is not 1 + 4k (the VAE takes the first frame alone, then 4 at a time); use 77 or 81
    """
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        lower = max(1, num_frames - (num_frames - 1) % temporal_factor)
        raise ValueError(
            f"num_frames {num_frames} is not 1 + {temporal_factor}k (the VAE takes the first frame alone, then "
            f"{temporal_factor} at a time); use {lower} or {lower + temporal_factor}"
        )


def with_first_frame(latents: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """``latents`` (B, C, T, H, W) with latent frame 0 replaced by ``first_frame`` (B, C, 1, H, W).

    >>> with_first_frame(torch.zeros(1, 1, 3, 1, 1), torch.ones(1, 1, 1, 1, 1)).flatten().tolist()
    [1.0, 0.0, 0.0]
    """
    return torch.cat([first_frame.to(latents), latents[:, :, 1:]], dim=2)


def first_frame_timestep(sigma: torch.Tensor, frames: int) -> torch.Tensor:
    """One σ per latent frame (B, T): 0 for the clean first frame, ``sigma`` (B,) for the others.

    >>> first_frame_timestep(torch.tensor([0.5]), 3).tolist()
    [[0.0, 0.5, 0.5]]
    """
    rest = sigma[:, None].expand(-1, frames - 1)
    return torch.cat([torch.zeros_like(sigma)[:, None], rest], dim=1)


def video_to_frames(video: torch.Tensor) -> list[list[Image.Image]]:
    """Videos (B, 3, T, H, W) in [-1, 1] as one list of PIL frames per video.

    >>> [len(frames) for frames in video_to_frames(torch.zeros(2, 3, 5, 4, 4))]
    [5, 5]
    """
    frames = to_pil(rearrange(video, "b c t h w -> (b t) c h w"))  # (B·T, 3, H, W)
    count = video.shape[2]
    return [frames[i : i + count] for i in range(0, len(frames), count)]


@dataclass(frozen=True)
class WanPipeline:
    """The components with their loaded params: the DiT (one, or two experts), the VAE, umT5 and (Wan2.1 I2V) CLIP."""

    dit: WanDiT | TwoExpertDiT
    dit_params: dict = field(repr=False)
    vae: WanVAE
    vae_params: dict = field(repr=False)
    t5: TextEncoder
    clip: ImageEncoder | None = None
    max_sequence_length: int = 512

    def __post_init__(self):
        config, latent_channels = self.dit_config, self.vae.config.z_dim
        if config.out_channels != latent_channels:
            raise ValueError(
                f"the VAE has {latent_channels} latent channels but the DiT denoises {config.out_channels}: pair "
                "Wan2.2-TI2V-5B with the Wan 2.2 VAE (48 channels) and the other Wan models with the Wan 2.1 VAE (16)"
            )
        if config.image_dim is not None and self.clip is None:
            raise ValueError(
                f"this Wan DiT attends to CLIP image features (image_dim {config.image_dim}): pass the CLIP vision "
                "encoder (a Wan2.1 I2V pipeline folder's image_encoder/)"
            )

    @property
    def dit_config(self) -> WanConfig:
        return self.dit.high_noise.config if isinstance(self.dit, TwoExpertDiT) else self.dit.config

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "t5"}``, plus ``"clip"`` for Wan2.1 I2V."""
        params = {"dit": self.dit_params, "vae": self.vae_params, "t5": self.t5.params}
        return params if self.clip is None else {**params, "clip": self.clip.params}

    @property
    def task(self) -> str:
        """``image-to-video`` (the DiT takes image channels), ``text-image-to-video`` (the Wan 2.2 VAE) or ``text-to-video``."""
        if self.dit_config.image_latent_channels:
            return IMAGE_TO_VIDEO
        return TEXT_IMAGE_TO_VIDEO if self.vae.config.is_residual else TEXT_TO_VIDEO

    @property
    def multiple(self) -> int:
        """What height and width must be multiples of: the VAE's factor × the DiT's 2×2 patches (16, or 32 for Wan 2.2)."""
        return self.vae.config.spatial_factor * self.dit_config.patch_size[1]

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of a num_frames × height × width video.

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> tiny_pipeline().latent_shape(81, 480, 832), tiny_pipeline("ti2v").latent_shape(81, 480, 832)
        ((16, 21, 60, 104), (48, 21, 30, 52))
        """
        factor, temporal = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        return self.vae.config.z_dim, (num_frames - 1) // temporal + 1, height // factor, width // factor

    def check_request(self, num_frames: int, height: int, width: int, image) -> None:
        """Raise a ValueError naming a frame count, size or image this pipeline cannot take, and the fix.

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> tiny_pipeline("ti2v").check_request(81, 480, 848, None)
        Traceback (most recent call last):
        ...
        ValueError: width 848 is not a multiple of 32; use 832 or 864
        """
        check_frames(num_frames, self.vae.config.temporal_factor)
        check_size(height, width, self.multiple)
        if self.task == IMAGE_TO_VIDEO and image is None:
            raise ValueError(
                f"this Wan model is image-to-video (its DiT takes {self.dit_config.image_latent_channels} image "
                "channels): pass image= (the first frame, a PIL image)"
            )
        if self.task == TEXT_TO_VIDEO and image is not None:
            raise ValueError(
                "this Wan model is text-to-video (Wan 2.1 VAE, no image channels): drop image=, or load an "
                "image-to-video model (Wan2.1-I2V, Wan2.2-I2V-A14B, Wan2.2-TI2V-5B)"
            )

    def encode_prompts(self, params, prompts: Sequence[str], device=None) -> torch.Tensor:
        """umT5 states (B, L, 4096) of prompts, zero past each prompt, in the DiT's dtype, on ``device``
        (default: the DiT's).

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> pipe.encode_prompts(pipe.params, ["a cat", "a dog"]).shape
        torch.Size([2, 16, 16])
        """
        text = self.t5.encode(params["t5"], list(prompts), max_length=self.max_sequence_length)
        return text.to(device or device_of(params["dit"]), dtype_of(params["dit"]))

    def noise(self, seed: int, batch: int, num_frames: int, height: int, width: int, params) -> torch.Tensor:
        """Initial noise (B, C, T', H', W'), float32, drawn on the CPU from ``seed`` (video i: ``fold_in(key, i)``).

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> pipe.noise(0, 2, 5, 32, 32, pipe.params).shape
        torch.Size([2, 16, 2, 4, 4])
        """
        key = dsf.random.key(seed)
        shape = self.latent_shape(num_frames, height, width)
        draws = [dsf.random.normal(dsf.random.fold_in(key, i), shape) for i in range(batch)]
        return torch.stack(draws).to(device_of(params["dit"]))

    def image_conditioning(self, params, image: Image.Image, num_frames: int, height: int, width: int, batch: int,
                           tiled: bool = True, device=None) -> dict:
        """What the DiT gets from the image, resized and center-cropped to height × width, for each of ``batch`` videos,
        on ``device`` (default: the DiT's).

        image-to-video: ``image_latents`` (B, 4 + C, T', H', W'), the mask then the VAE latents of
        the image followed by black frames, and (Wan2.1) ``image_embeds``, the CLIP features;
        text-image-to-video: ``first_frame`` (B, C, 1, H', W'), the image's latents (float32).

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("i2v")
        >>> cond = pipe.image_conditioning(pipe.params, Image.new("RGB", (48, 40)), 5, 32, 32, batch=2)
        >>> {name: tuple(value.shape) for name, value in cond.items()}
        {'image_latents': (2, 20, 2, 4, 4), 'image_embeds': (2, 5, 16)}
        """
        frame = resize_and_crop(to_rgb(image), height, width)
        pixels = image_to_tensor(frame)[None, :, None]  # (1, 3, 1, H, W)
        device, dtype = device or device_of(params["dit"]), dtype_of(params["dit"])
        if self.task == TEXT_IMAGE_TO_VIDEO:
            latents = self.vae.encode(params["vae"], pixels.to(device_of(params["vae"]), dtype_of(params["vae"])), tiled=tiled)
            return {"first_frame": latents.to(device, torch.float32).repeat(batch, 1, 1, 1, 1)}
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = self.vae.encode(params["vae"], video.to(device_of(params["vae"]), dtype_of(params["vae"])), tiled=tiled)
        mask = latents.new_zeros(1, self.dit_config.image_latent_channels - latents.shape[1], *latents.shape[2:])
        mask[:, :, 0] = 1
        cond = {"image_latents": torch.cat([mask, latents], dim=1).to(device, dtype).repeat(batch, 1, 1, 1, 1)}
        if self.clip is not None:
            features = self.clip.encode(params["clip"], [frame])
            cond["image_embeds"] = features.to(device, dtype).repeat(batch, 1, 1)
        return cond

    def velocity(self, params, latents, sigma, text_embeds, image_embeds=None, image_latents=None, first_frame=None):
        """The DiT's velocity at σ (B,); with ``first_frame`` the DiT sees that clean frame at σ 0 in place of frame 0.

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> pipe.velocity(pipe.params, torch.randn(1, 16, 2, 4, 4), torch.tensor([0.5]), torch.zeros(1, 3, 16)).shape
        torch.Size([1, 16, 2, 4, 4])
        """
        timestep = sigma
        if first_frame is not None:
            latents = with_first_frame(latents, first_frame)
            timestep = first_frame_timestep(sigma, latents.shape[2])
        return self.dit(params["dit"], latents.to(dtype_of(params["dit"])), timestep, text_embeds, image_embeds, image_latents)

    def denoise(
        self,
        params,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] = DEFAULT_NEGATIVE_PROMPT,
        image: Image.Image | None = None,
        seed: int = 0,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 50,
        cfg_scale: float = 5.0,
        sigma_shift: float = 5.0,
        tiled: bool = True,
        noise: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Final latents (B, C, T', H', W'), float32, for ``prompt`` (a string or a list); see :meth:`generate`.

        Differentiable in ``params`` when gradients are on.
        """
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_finite(cfg_scale=cfg_scale, sigma_shift=sigma_shift)
        self.check_request(num_frames, height, width, image)
        expected = (len(prompts), *self.latent_shape(num_frames, height, width))
        if noise is None:
            noise = self.noise(seed, len(prompts), num_frames, height, width, params)
        elif tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; {len(prompts)} videos of this size need {expected}")
        sigmas = dataclasses.replace(WAN, shift=sigma_shift).sigmas(num_inference_steps)
        extras = {} if image is None else self.image_conditioning(params, image, num_frames, height, width, len(prompts), tiled)
        cond = {"text_embeds": self.encode_prompts(params, prompts), **extras}
        negative_cond = {**cond, "text_embeds": self.encode_prompts(params, negatives)} if cfg_scale != 1.0 else None
        latents = sample(self.velocity, params, noise.float(), sigmas, cond, negative_cond=negative_cond, cfg_scale=cfg_scale,
                         progress=progress, desc="Wan")
        return latents if "first_frame" not in extras else with_first_frame(latents, extras["first_frame"])

    def decode(self, params, latents: torch.Tensor, tiled: bool = True) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] from latents, on the VAE's device and dtype (spatial tiles with ``tiled``).

        >>> from dsf.models.wan.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> pipe.decode(pipe.params, torch.zeros(1, 16, 2, 4, 4)).shape
        torch.Size([1, 3, 5, 32, 32])
        """
        return self.vae.decode(params["vae"], latents.to(device_of(params["vae"]), dtype_of(params["vae"])), tiled=tiled)

    def generate(self, params, prompt: str | Sequence[str], **kwargs) -> list[Image.Image] | list[list[Image.Image]]:
        """The frames of a video for ``prompt`` as PIL images: one list for a string, a list of lists for a list of prompts.

        ``negative_prompt`` (Wan's default), ``image`` (image-to-video: the first frame; resized and
        center-cropped), ``seed`` (0), ``num_frames`` (81, 1 + 4k), ``height``/``width``
        (480×832, multiples of 16; 32 for the Wan 2.2 VAE), ``num_inference_steps`` (50),
        ``cfg_scale`` (5; 1 skips the negative pass), ``sigma_shift`` (5), ``tiled`` (VAE tiling,
        on), ``noise`` (initial latents instead of the seeded ones), ``progress``.
        """
        tiled = kwargs.get("tiled", True)
        with torch.no_grad():
            videos = video_to_frames(self.decode(params, self.denoise(params, prompt, **kwargs), tiled=tiled))
        return videos[0] if isinstance(prompt, str) else videos

    def __call__(self, prompt, **kwargs):
        return self.generate(self.params, prompt, **kwargs)


def holds_two_experts(source) -> bool:
    """Whether ``source`` is a Wan2.2 A14B folder (``transformer/`` + ``transformer_2/``, or Wan-AI's expert folders).

    >>> holds_two_experts("/nonexistent")
    False
    """
    if not isinstance(source, (str, os.PathLike)):
        return False
    return any(all((Path(source) / name).is_dir() for name in pair) for pair in EXPERT_FOLDERS)


def expert_folder(source, expert: str) -> Path:
    """The folder of one expert (``high_noise`` or ``low_noise``) in a Wan2.2 A14B folder.

    >>> expert_folder("/nonexistent", "high_noise")
    Traceback (most recent call last):
    ...
    ValueError: /nonexistent is not a Wan2.2 A14B folder (transformer/ + transformer_2/, or high_noise_model/ + low_noise_model/): expert= picks one of its two DiTs
    """
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    if not holds_two_experts(source):
        wanted = ", or ".join(f"{high}/ + {low}/" for high, low in EXPERT_FOLDERS)
        raise ValueError(f"{source} is not a Wan2.2 A14B folder ({wanted}): expert= picks one of its two DiTs")
    pair = next(pair for pair in EXPERT_FOLDERS if all((Path(source) / name).is_dir() for name in pair))
    return Path(source) / pair[EXPERTS.index(expert)]


def load_pipeline(
    source=None,
    *,
    dit=None,
    vae=None,
    text_encoder=None,
    tokenizer=None,
    image_encoder=None,
    image_processor=None,
    dtype: torch.dtype | dict | None = None,
    device: str | torch.device | dict = "cpu",
    max_sequence_length: int = 512,
    dit_config: dict | None = None,
    vae_config: dict | None = None,
    boundary: float | None = None,
    expert: str | None = None,
) -> WanPipeline:
    """A Wan pipeline from a diffusers Wan pipeline folder or hub repo (``source``), or from one source per component.

    The folder holds ``transformer/`` (and ``transformer_2/`` for a Wan2.2 A14B model, whose
    experts switch at ``boundary``, by default its ``model_index.json`` ``boundary_ratio``),
    ``vae/``, ``text_encoder/``, ``tokenizer/`` and, for Wan2.1 I2V, ``image_encoder/`` and
    ``image_processor/``. Component sources (``dit``, ``vae``, ``text_encoder`` (umT5),
    ``image_encoder`` (CLIP)) win over ``source``; each may be a file, folder, shard list, state
    dict or :class:`dsf.files.hub.ModelSource` (Wan's original and ComfyUI layouts included). ``dtype``
    and ``device`` are one value or a dict per component (keys ``dit, vae, t5, clip``; a component
    a dict leaves out gets its checkpoint's dtype, on the CPU); on the ``meta`` device a component
    is built from its checkpoint's headers alone, for a task that never runs it.
    ``expert`` (``high_noise``/``low_noise``) loads one expert of an A14B model as the only DiT,
    for training it. The CLIP encoder is loaded only for a DiT that attends to image features.

    >>> load_pipeline(vae="/models/vae")
    Traceback (most recent call last):
    ...
    ValueError: no source for the dit: pass source= (a Wan pipeline folder) or dit=
    """
    root = pipeline_root(source, "Wan")

    def pick(component, name: str):
        return local_source(component_source(component, root, name, "Wan"))

    def options(name):
        return component_options(dtype, device, name)

    def beside_root(given, folder: str):
        return given if given is not None or root is None or not (root / folder).is_dir() else root / folder

    sources = {"dit": pick(dit, "dit"), "vae": pick(vae, "vae"), "t5": pick(text_encoder, "text_encoder")}
    if expert is not None:
        dit_model, dit_params = load_dit(expert_folder(sources["dit"], expert), dit_config, **options("dit"))
    elif holds_two_experts(sources["dit"]):
        dit_model, dit_params = load_two_expert_dit(sources["dit"], boundary, dit_config, **options("dit"))
    else:
        dit_model, dit_params = load_dit(sources["dit"], dit_config, **options("dit"))
    vae_model, vae_params = load_vae(sources["vae"], vae_config, **options("vae"))
    t5 = load_umt5(sources["t5"], beside_root(tokenizer, "tokenizer"), max_length=max_sequence_length, **options("t5"))
    config = dit_model.high_noise.config if isinstance(dit_model, TwoExpertDiT) else dit_model.config
    clip = None
    if config.image_dim is not None:
        clip = load_clip_vision(pick(image_encoder, "image_encoder"), beside_root(image_processor, "image_processor"),
                                **options("clip"))
    return WanPipeline(dit_model, dit_params, vae_model, vae_params, t5, clip, max_sequence_length=max_sequence_length)
