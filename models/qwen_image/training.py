"""Qwen-Image training pieces: its model files, the per-sample encoding, and the loss.

Model files are recognized by their key names (:mod:`dsf.files.model_files` with :data:`COMPONENTS`): a DiT in
the diffusers layout (with or without ComfyUI's prefix), a VAE in the diffusers or original Wan layout, the
Qwen2.5-VL text encoder.

Training splits into the gradient-free steps, run once per sample by :class:`SampleEncoder` (VAE encoding of the
image, Qwen2.5-VL encoding of the prompt; for an Edit model with an ``edit_image`` column, the condition images'
VAE latents and the prompt encoded with them), and :func:`sft_loss`, flow matching of the DiT on what they produce,
on Qwen-Image's training schedule (DiffSynth's: exponential shift μ 0.8, terminal 0.02), or
:func:`direct_distill_loss` (the student samples through :meth:`QwenImagePipeline.denoise` and matches the teacher
image's latents). The prompt states are padded to ``max_sequence_length`` so that samples batch; the loss cuts the
batch back to its longest prompt.

Example:
    >>> import torch, dsf
    >>> from dsf.models.qwen_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe)(pipe.params, {"image": torch.zeros(3, 32, 32), "prompt": "a cat"})
    >>> {key: tuple(value.shape) for key, value in encoded.items() if key != "prompt"}
    {'latents': (16, 4, 4), 'text_embeds': (16, 16), 'text_mask': (16,)}
    >>> batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    >>> sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0)).shape
    torch.Size([])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.schedules import QWEN_IMAGE, FlowSchedule
from dsf.model_parts.decoder_lm import MARKER as LM_MARKER
from dsf.model_parts.family import Component
from dsf.model_parts import pipelines
from dsf.model_parts.pipelines import device_of, dtype_of
from dsf.models.qwen_image.keys import DIT
from dsf.models.qwen_image.model import QwenImageDiT
from dsf.models.qwen_image.pipeline import QwenImagePipeline
from dsf.models.qwen_image.vae import VAE
from dsf.training.data import load_image, resolve_data_path, to_rgb

IMAGE_KEY, PROMPT_KEY, EDIT_KEY = "image", "prompt", "edit_image"
# DiffSynth-Studio's Qwen-Image LoRA targets (examples/qwen_image/model_training/lora/Qwen-Image.sh): every
# attention projection of both streams, the second MLP layers and the modulations
LORA_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"
COMPONENTS = {  # what a Qwen-Image training recipe's model files hold, recognized by their keys
    "dit": Component("DiT", lambda keys: DIT.detect_layout(keys) != "unknown", "qwen_image_bf16.safetensors"),
    "vae": Component("VAE", lambda keys: VAE.detect_layout(keys) != "unknown", "qwen_image_vae.safetensors"),
    "text_encoder": Component("Qwen2.5-VL", lambda keys: any(k.endswith(LM_MARKER) for k in keys),
                              "qwen_2.5_vl_7b.safetensors"),
}


@dataclass(frozen=True)
class SampleEncoder:
    """The gradient-free steps of Qwen-Image training, run once per sample (split training caches their output).

    ``encoder(params, item)`` takes a dataset item with an ``image`` (3, H, W) in [-1, 1] and a ``prompt`` and
    returns the item's other columns plus ``latents`` (16, H/8, W/8, the VAE posterior mode, normalized),
    ``text_embeds`` (max_sequence_length, 3584) zero-padded (an Edit prompt's longer states are kept whole) and ``text_mask`` (max_sequence_length,) bool. ``params``
    holds ``vae`` and ``text_encoder``; each computes on its own device and dtype.
    """

    pipe: QwenImagePipeline
    base_path: str | None = None  # the dataset folder, where an ``edit_image`` column's paths are

    def __call__(self, params, item: Mapping[str, Any]) -> dict[str, Any]:
        missing = [key for key in (IMAGE_KEY, PROMPT_KEY) if key not in item]
        if missing:
            raise ValueError(
                f"a Qwen-Image training sample needs the columns {missing} (it has {sorted(item)}); name the image "
                f"column {IMAGE_KEY!r} and the prompt column {PROMPT_KEY!r} in the metadata"
            )
        edit_images = self.edit_images(item)
        with torch.no_grad():
            image = item[IMAGE_KEY][None].to(device_of(params["vae"]), dtype_of(params["vae"]))
            latents = self.pipe.vae.encode(params["vae"], image)
            if edit_images:
                embeds, mask = self.pipe.edit_prompt_states(params, [item[PROMPT_KEY]], edit_images)
                references = {"reference_latents": [r[0] for r in self.pipe.condition_latents(params, edit_images)]}
            else:
                embeds, mask = self.pipe.text_encoder.encode(params["text_encoder"], [item[PROMPT_KEY]])
                references = {}
        padding = max(self.pipe.text_encoder.max_sequence_length - mask.shape[1], 0)  # Edit prompts may be longer: kept whole
        columns = {key: value for key, value in item.items() if key not in (IMAGE_KEY, EDIT_KEY)}
        return {**columns, "latents": latents[0], "text_embeds": torch.nn.functional.pad(embeds[0], (0, 0, 0, padding)),
                "text_mask": torch.nn.functional.pad(mask[0], (0, padding)), **references}

    def edit_images(self, item: Mapping[str, Any]) -> list:
        """The item's condition images (``edit_image``: a path or a list of paths inside the dataset folder, a JSON
        list in a csv cell); none without the column."""
        paths = item.get(EDIT_KEY)
        if paths in (None, ""):
            return []
        if isinstance(paths, str):
            paths = json.loads(paths) if paths.startswith("[") else [paths]
        if self.base_path is None or not hasattr(self.pipe, "vision"):
            raise ValueError(f"a sample with {EDIT_KEY!r} trains a Qwen-Image-Edit model: load an Edit pipeline and give "
                             "SampleEncoder the dataset folder (base_path=)")
        return [to_rgb(load_image(resolve_data_path(Path(self.base_path), path, f"column {EDIT_KEY!r}"))) for path in paths]


def trimmed_text(text_embeds: torch.Tensor, text_mask: torch.Tensor) -> dict:
    """``text_embeds`` and ``text_mask`` cut to the batch's longest prompt (valid tokens come first); the mask
    ``None`` where every kept token is valid (the DiT then attends without one).

    >>> trimmed = trimmed_text(torch.ones(2, 4, 1), torch.tensor([[True, True, False, False], [True, False, False, False]]))
    >>> tuple(trimmed["text_embeds"].shape), trimmed["text_mask"].tolist()
    ((2, 2, 1), [[True, True], [True, False]])
    """
    length = max(int(text_mask.sum(1).max()), 1)
    mask = text_mask[:, :length]
    return {"text_embeds": text_embeds[:, :length], "text_mask": None if bool(mask.all()) else mask}


def reference_batch(per_sample: list, device, dtype) -> list[torch.Tensor]:
    """The condition images' latents of a batch (per sample, a list of (16, h, w)) as one (B, 16, h, w) per image.

    >>> [tuple(r.shape) for r in reference_batch([[torch.zeros(16, 2, 2)], [torch.ones(16, 2, 2)]], "cpu", torch.float32)]
    [(2, 16, 2, 2)]
    """
    if len({len(sample) for sample in per_sample}) > 1:
        raise ValueError("the samples of a batch have different numbers of edit images; use --batch_size 1")
    return [torch.stack(images).to(device, dtype) for images in zip(*per_sample)]


def sft_loss(dit: QwenImageDiT, schedule: FlowSchedule = QWEN_IMAGE):
    """``loss(params, batch, key)``: flow matching of the DiT (``params["dit"]``) on a batch of encoded samples.

    Timesteps are drawn from Qwen-Image's 1000-step training grid with its loss weights
    (:func:`dsf.diffusion.losses.flow_matching_loss`). The batch holds ``latents`` (B, 16, h, w), ``text_embeds``
    (B, L, D) and ``text_mask`` (B, L), and for Edit models ``reference_latents`` (per sample, the condition images').

    >>> import dsf
    >>> from dsf.models.qwen_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 2, 2), "text_embeds": torch.ones(1, 4, 16), "text_mask": torch.ones(1, 4, dtype=torch.bool)}
    >>> float(sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """

    def velocity(dit_params, latents, sigma, text_embeds, text_mask, reference_latents=()):
        return dit(dit_params, latents, sigma.to(latents.dtype), text_embeds=text_embeds, text_mask=text_mask,
                   reference_latents=reference_latents)

    def loss(params, batch, key):
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        latents = batch["latents"].to(device, dtype)
        cond = trimmed_text(batch["text_embeds"].to(device, dtype), batch["text_mask"].to(device))
        if "reference_latents" in batch:
            cond["reference_latents"] = reference_batch(batch["reference_latents"], device, dtype)
        return flow_matching_loss(velocity, params["dit"], latents, key, cond, schedule=schedule)

    return loss


def direct_distill_loss(pipe: QwenImagePipeline):
    """:func:`dsf.model_parts.pipelines.direct_distill_loss` of Qwen-Image: the student samples at the teacher image's
    size (8 pixels per latent) with its ``cfg_scale``.

    >>> import dsf
    >>> from dsf.models.qwen_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 4, 4), "prompt": ["a cat"], "seed": ["0"], "num_inference_steps": ["2"],
    ...          "cfg_scale": ["1"]}
    >>> float(direct_distill_loss(pipe)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """
    return pipelines.direct_distill_loss(pipe, pipe.vae.config.spatial_factor)
