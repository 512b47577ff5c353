"""Wan training pieces: a dataset of videos and images, the per-sample encoding, the loss, one expert's σ range.

Training splits into the gradient-free steps, run once per sample by :class:`SampleEncoder` (VAE
latents of the video, umT5 states of the prompt, and for image-to-video models the conditioning
from the video's first frame: for Wan2.2-TI2V-5B that frame's clean latents, which the DiT sees at
σ 0 while the loss leaves them out), and :func:`sft_loss`, flow matching of the DiT on what they
produce, on Wan's training schedule (shift 5), optionally on one index range of it: the σ range
of one Wan2.2 A14B expert (:func:`expert_timestep_boundaries`).

Example:
    >>> import torch, dsf
    >>> from dsf.models.wan.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe)(pipe.params, {"video": torch.zeros(3, 5, 32, 32), "prompt": "a cat"})
    >>> batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    >>> sft_loss(pipe)(pipe.params, batch, dsf.random.key(0)).shape
    torch.Size([])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from dsf.training.data import image_to_tensor, load_image, read_metadata, resize_and_crop, resolve_data_path, to_rgb
from dsf.files.io import read_json
from dsf.diffusion.losses import flow_matching_loss
from dsf.model_parts.pipelines import device_of, dtype_of, to_pil
from dsf.model_parts.family import Component
from dsf.model_parts.t5_encoder import MARKER as T5_MARKER
from dsf.models.wan.config import WanConfig
from dsf.models.wan.keys import DIT
from dsf.models.wan.text import CLIP_MARKER, WAN_T5_MARKER
from dsf.model_parts.wan_vae_keys import VAE
from dsf.models.wan.model import default_boundary, expert_timestep_ranges
from dsf.models.wan.pipeline import IMAGE_TO_VIDEO, TEXT_IMAGE_TO_VIDEO, WanPipeline
from dsf.diffusion.schedules import WAN
from dsf.files.video import read_video

VIDEO_KEY, IMAGE_KEY, PROMPT_KEY = "video", "image", "prompt"
# DiffSynth's Wan LoRA targets (q,k,v,o,ffn.0,ffn.2 in Wan's names): every attention projection and the MLP
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2"
COMPONENTS = {  # the files of a Wan model, recognized by their keys
    "dit": Component("DiT", lambda keys: DIT.detect_layout(keys) != "unknown", "diffusion_pytorch_model.safetensors"),
    "vae": Component("VAE", lambda keys: VAE.detect_layout(keys) != "unknown", "Wan2.1_VAE.safetensors"),
    "t5": Component("umT5", lambda keys: any(k.endswith((T5_MARKER, WAN_T5_MARKER)) for k in keys),
                    "models_t5_umt5-xxl-enc-bf16.safetensors"),
    "clip": Component("CLIP", lambda keys: any(k.endswith(CLIP_MARKER) for k in keys),
                      "models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors"),
}


def usable_frames(available: int, wanted: int, temporal_factor: int = 4) -> int:
    """How many frames of a video to train on: ``wanted``, or the most frames of the form 1 + 4k it has.

    >>> usable_frames(100, 81), usable_frames(40, 81), usable_frames(1, 81)
    (81, 37, 1)
    """
    count = min(available, wanted)
    return count - (count - 1) % temporal_factor


def frames_to_tensor(frames, height: int, width: int) -> torch.Tensor:
    """PIL frames resized (bilinear) to cover height × width and center-cropped, as a video (3, T, H, W) in [-1, 1].

    >>> from PIL import Image
    >>> frames_to_tensor([Image.new("RGB", (64, 48))] * 5, 32, 32).shape
    torch.Size([3, 5, 32, 32])
    """
    return torch.stack([image_to_tensor(resize_and_crop(to_rgb(frame), height, width)) for frame in frames], dim=1)


class VideoDataset:
    """Samples of a dataset folder: each metadata row has a ``video`` or an ``image`` column (a path
    inside the folder) and a ``prompt``; ``len`` is rows × ``repeat``.

    Item ``i`` is row ``i % rows`` with ``video`` (3, T, height, width) in [-1, 1]: the first
    ``num_frames`` frames of the video (fewer when it is shorter: the most of the form 1 + 4k), or
    the image as one frame; the other columns pass through.

    >>> import tempfile
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (40, 40)).save(folder / "a.png")
    >>> _ = (folder / "metadata.csv").write_text("image,prompt\\na.png,a square\\n")
    >>> item = VideoDataset(folder, folder / "metadata.csv", num_frames=81, height=32, width=32)[0]
    >>> tuple(item["video"].shape), item["prompt"]
    ((3, 1, 32, 32), 'a square')
    """

    def __init__(self, base_path, metadata_path, *, num_frames: int, height: int, width: int, repeat: int = 1):
        self.base_path, self.metadata_path = Path(base_path), Path(metadata_path)
        if not self.base_path.is_dir():
            raise FileNotFoundError(f"dataset folder {self.base_path} does not exist; pass the folder holding the videos")
        self.num_frames, self.height, self.width, self.repeat = num_frames, height, width, repeat
        self.rows = read_metadata(self.metadata_path)
        self.files = [self._file(index, row) for index, row in enumerate(self.rows)]

    def _file(self, index: int, row: Mapping[str, Any]) -> tuple[str, Path]:
        given = [key for key in (VIDEO_KEY, IMAGE_KEY) if row.get(key)]
        where = f"metadata file {self.metadata_path}, row {index}"
        if len(given) != 1 or PROMPT_KEY not in row:
            raise ValueError(
                f"{where} has the columns {sorted(row)}; each row needs a {PROMPT_KEY!r} and one of {VIDEO_KEY!r} "
                f"(a video file) or {IMAGE_KEY!r} (an image file)"
            )
        key = given[0]
        return key, resolve_data_path(self.base_path, row[key], f"{where}, column {key!r}")

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_index = index % len(self.rows)
        kind, path = self.files[row_index]
        if kind == VIDEO_KEY:
            frames = read_video(path, max_frames=self.num_frames)
            frames = frames[: usable_frames(len(frames), self.num_frames)]
        else:
            frames = [load_image(path)]
        columns = {key: value for key, value in self.rows[row_index].items() if key not in (VIDEO_KEY, IMAGE_KEY)}
        return {**columns, VIDEO_KEY: frames_to_tensor(frames, self.height, self.width)}


@dataclass(frozen=True)
class SampleEncoder:
    """The gradient-free steps of Wan training, run once per sample.

    ``encoder(params, item)`` takes an item with a ``video`` (3, T, H, W) in [-1, 1] and a
    ``prompt`` and returns, on the VAE's device (the DiT's may be ``meta`` while a dataset is
    encoded for split training), the other columns plus ``latents`` (C, T', H', W', the VAE posterior
    mean, normalized) and ``text_embeds`` (L, 4096); for an image-to-video model also the
    conditioning of the video's first frame, ``image_latents`` and (Wan2.1) ``image_embeds``; for
    Wan2.2-TI2V-5B ``first_frame`` (C, 1, H', W'), the first latent frame (the causal VAE encodes
    frame 0 alone, so it equals the image's latents), unless ``first_frame_conditioning`` is off and
    the model trains as text-to-video (DiffSynth trains TI2V with it on, ``--extra_inputs input_image``),
    or the item is a single image (its one frame is what the model learns).

    >>> from dsf.models.wan.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("i2v")
    >>> encoded = SampleEncoder(pipe)(pipe.params, {"video": torch.zeros(3, 5, 32, 32), "prompt": "a cat"})
    >>> {key: tuple(value.shape) for key, value in encoded.items() if key != "prompt"}
    {'latents': (16, 2, 4, 4), 'text_embeds': (16, 16), 'image_latents': (20, 2, 4, 4), 'image_embeds': (5, 16)}
    """

    pipe: WanPipeline
    tiled: bool = True
    first_frame_conditioning: bool = True

    def __call__(self, params, item: Mapping[str, Any]) -> dict[str, Any]:
        missing = [key for key in (VIDEO_KEY, PROMPT_KEY) if key not in item]
        if missing:
            raise ValueError(f"a Wan training sample needs the columns {missing} (it has {sorted(item)})")
        video = item[VIDEO_KEY]
        frames, height, width = video.shape[1:]
        first = to_pil(video[None, :, 0])[0] if self.pipe.task == IMAGE_TO_VIDEO else None
        self.pipe.check_request(frames, height, width, first)
        with torch.no_grad():
            device = device_of(params["vae"])
            latents = self.pipe.vae.encode(params["vae"], video[None].to(device, dtype_of(params["vae"])), tiled=self.tiled)
            encoded = {"latents": latents[0], "text_embeds": self.pipe.encode_prompts(params, [item[PROMPT_KEY]], device)[0]}
            if first is not None:
                cond = self.pipe.image_conditioning(params, first, frames, height, width, 1, self.tiled, device)
                encoded |= {key: value[0] for key, value in cond.items()}
            if self.pipe.task == TEXT_IMAGE_TO_VIDEO and self.first_frame_conditioning and latents.shape[2] > 1:
                encoded["first_frame"] = latents[0, :, :1]
        columns = {key: value for key, value in item.items() if key != VIDEO_KEY}
        return {**columns, **encoded}


def sft_loss(pipe: WanPipeline, min_timestep_boundary: float = 0.0, max_timestep_boundary: float = 1.0):
    """``loss(params, batch, key)``: flow matching of the DiT (``params["dit"]``) on a batch of encoded samples.

    σ is drawn from Wan's 1000-step training grid (shift 5) with its loss weights, within
    ``[min, max)_timestep_boundary`` of the grid (fractions; 0 is σ = 1). The batch holds
    ``latents`` (B, C, T', H', W') and ``text_embeds``, plus ``image_latents``/``image_embeds``
    for image-to-video models. With ``first_frame`` (Wan2.2-TI2V-5B) the DiT sees those clean
    latents at σ 0 in place of latent frame 0, and the error is taken over the other frames only.

    >>> import dsf
    >>> from dsf.models.wan.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 1, 2, 2), "text_embeds": torch.zeros(1, 4, 16)}
    >>> float(sft_loss(pipe)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """
    conditioning = ("text_embeds", "image_latents", "image_embeds", "first_frame")

    def loss(params, batch, key):
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        cond = {name: batch[name].to(device, dtype) for name in conditioning if name in batch}
        return flow_matching_loss(pipe.velocity, params, batch["latents"].to(device, dtype), key, cond,
                                  schedule=WAN, min_timestep_boundary=min_timestep_boundary,
                                  max_timestep_boundary=max_timestep_boundary,
                                  scored=after_first_frame if "first_frame" in cond else None)

    return loss


def after_first_frame(latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, T, H, W) without latent frame 0: the part of a TI2V prediction that is scored.

    >>> after_first_frame(torch.zeros(1, 48, 3, 2, 2)).shape
    torch.Size([1, 48, 2, 2, 2])
    """
    return latents[:, :, 1:]


def expert_timestep_boundaries(folder, expert: str, config: WanConfig, boundary: float | None = None) -> dict[str, float]:
    """``min/max_timestep_boundary`` that train one expert of the Wan2.2 A14B model in ``folder``.

    The σ boundary is ``boundary``, else the folder's ``model_index.json`` ``boundary_ratio``, else
    Wan2.2's (0.875 text-to-video, 0.9 image-to-video).

    >>> expert_timestep_boundaries("/nonexistent", "high_noise", WanConfig())
    {'min_timestep_boundary': 0.0, 'max_timestep_boundary': 0.417}
    """
    index = Path(folder) / "model_index.json" if isinstance(folder, (str, os.PathLike)) else None
    if boundary is None and index is not None and index.is_file():
        boundary = read_json(index).get("boundary_ratio")
    return expert_timestep_ranges(default_boundary(config) if boundary is None else boundary)[expert]

