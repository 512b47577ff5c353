"""Z-Image training pieces: its model files, the per-sample encoding, and the flow-matching loss.

Model files are recognized by their key names (:mod:`dsf.files.model_files` with :data:`COMPONENTS`): a DiT in
the diffusers or Lumina2-style (original/ComfyUI) layout, the VAE (FLUX.1's autoencoder, LDM/BFL or diffusers), and
the Qwen3 text encoder (``text_encoder/`` shards or ComfyUI's ``qwen_3_4b.safetensors``).

Training splits into the gradient-free steps, run once per sample by :class:`SampleEncoder` (VAE encoding of
the image, Qwen3 encoding of the prompt), and :func:`sft_loss` on what they produce.

Example:
    >>> import torch, dsf
    >>> from dsf.models.z_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe.vae, pipe.text_encoder, 32)(pipe.params, {"image": torch.zeros(3, 32, 32), "prompt": "a cat"})
    >>> batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    >>> sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0)).shape
    torch.Size([])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.schedules import ZIMAGE, FlowSchedule
from dsf.model_parts import decoder_lm
from dsf.model_parts.family import Component
from dsf.model_parts.flux_vae import FluxVAE
from dsf.model_parts.flux_vae_keys import VAE
from dsf.model_parts import pipelines
from dsf.model_parts.pipelines import device_of, dtype_of
from dsf.models.z_image.keys import DIT
from dsf.models.z_image.model import ZImageDiT
from dsf.models.z_image.text import MAX_SEQUENCE_LENGTH, Qwen3TextEncoder

IMAGE_KEY, PROMPT_KEY = "image", "prompt"
# DiffSynth-Studio's and diffusers' Z-Image LoRA targets: attention and SwiGLU projections of every block
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,w1,w2,w3"

COMPONENTS = {  # what a Z-Image training recipe's --model_paths hold, recognized by their keys
    "dit": Component("DiT", lambda keys: DIT.detect_layout(keys) != "unknown", "z_image_turbo_bf16.safetensors"),
    "vae": Component("VAE", lambda keys: VAE.detect_layout(keys) != "unknown", "ae.safetensors"),
    "text_encoder": Component("Qwen3", lambda keys: any(k.endswith(decoder_lm.MARKER) for k in keys), "qwen_3_4b.safetensors"),
}


@dataclass(frozen=True)
class SampleEncoder:
    """The gradient-free steps of Z-Image training, run once per sample (split training caches their output).

    ``encoder(params, item)`` takes a dataset item with an ``image`` (3, H, W) in [-1, 1] and a ``prompt`` and
    returns the item's other columns plus ``latents`` (16, H/8, W/8, the VAE posterior mean, normalized),
    ``text_embeds`` (max_sequence_length, D), zero after the prompt's tokens, and ``text_mask`` (max_sequence_length,)
    True on them, so that samples stack into batches.

    >>> from dsf.models.z_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe.vae, pipe.text_encoder, 32)(pipe.params, {"image": torch.zeros(3, 32, 32), "prompt": "a"})
    >>> {key: tuple(value.shape) if isinstance(value, torch.Tensor) else value for key, value in encoded.items()}
    {'prompt': 'a', 'latents': (16, 4, 4), 'text_embeds': (32, 16), 'text_mask': (32,)}
    """

    vae: FluxVAE
    text_encoder: Qwen3TextEncoder
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def __call__(self, params, item: Mapping[str, Any]) -> dict[str, Any]:
        missing = [key for key in (IMAGE_KEY, PROMPT_KEY) if key not in item]
        if missing:
            raise ValueError(
                f"a Z-Image training sample needs the columns {missing} (it has {sorted(item)}); name the image column "
                f"{IMAGE_KEY!r} and the prompt column {PROMPT_KEY!r} in the metadata"
            )
        with torch.no_grad():
            image = item[IMAGE_KEY][None].to(device_of(params["vae"]), dtype_of(params["vae"]))
            latents = self.vae.encode(params["vae"], image)
            embeds, mask = self.text_encoder.encode(params["text_encoder"], [item[PROMPT_KEY]], self.max_sequence_length)
        pad = self.max_sequence_length - mask.shape[1]
        columns = {key: value for key, value in item.items() if key != IMAGE_KEY}
        return {**columns, "latents": latents[0], "text_embeds": F.pad(embeds[0], (0, 0, 0, pad)),
                "text_mask": F.pad(mask[0], (0, pad))}


def sft_loss(dit: ZImageDiT, schedule: FlowSchedule = ZIMAGE):
    """``loss(params, batch, key)``: flow matching of the DiT (``params["dit"]``) on a batch of encoded samples.

    Timesteps are drawn from Z-Image's 1000-step training grid (shift 3, DiffSynth-Studio's) with its loss weights
    (:func:`dsf.diffusion.losses.flow_matching_loss`). The batch holds ``latents`` (B, 16, h, w), ``text_embeds``
    (B, L, D) and ``text_mask`` (B, L).

    >>> import dsf
    >>> from dsf.models.z_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 2, 2), "text_embeds": torch.zeros(1, 4, 16), "text_mask": torch.ones(1, 4, dtype=torch.bool)}
    >>> float(sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """

    def velocity(dit_params, latents, sigma, text_embeds, text_mask):
        return dit(dit_params, latents, sigma.to(latents.dtype), text_embeds=text_embeds, text_mask=text_mask)

    def loss(params, batch, key):
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        cond = {"text_embeds": batch["text_embeds"].to(device, dtype), "text_mask": batch["text_mask"].to(device).bool()}
        return flow_matching_loss(velocity, params["dit"], batch["latents"].to(device, dtype), key, cond, schedule=schedule)

    return loss


def direct_distill_loss(pipe):
    """:func:`dsf.model_parts.pipelines.direct_distill_loss` of Z-Image: the student samples at the teacher image's
    size (8 pixels per latent) with its ``cfg_scale``.

    >>> import dsf
    >>> from dsf.models.z_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 4, 4), "prompt": ["a cat"], "seed": ["0"], "num_inference_steps": ["2"],
    ...          "cfg_scale": ["1"]}
    >>> float(direct_distill_loss(pipe)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """
    return pipelines.direct_distill_loss(pipe, pipe.vae.config.downsample_factor)
