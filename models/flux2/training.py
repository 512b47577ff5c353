"""FLUX.2 training pieces: its model files, the per-sample encoding (with reference images for editing), the loss.

Model files are recognized by their key names (:mod:`dsf.files.model_files` with :data:`COMPONENTS`): a DiT in
the BFL, diffusers or ComfyUI layout, a VAE in the BFL or diffusers layout, a text encoder (Mistral3 or Qwen3).

Training splits into the gradient-free steps, run once per sample by :class:`SampleEncoder` (VAE encoding of the
image and of its reference images, the prompt's stacked hidden states), and :func:`sft_loss` on what they produce:
flow matching on FLUX.2's training schedule (DiffSynth-Studio's: ``σ = linspace(1, 1/1000, 1000)`` shifted at
μ = 0.8), the reference images' latents attended as extra tokens, dev's embedded guidance 1.0. Or
:func:`direct_distill_loss`: the student samples through :meth:`Flux2Pipeline.denoise` and matches the latents of
the teacher's image.

Example:
    >>> import torch, dsf
    >>> from dsf.models.flux2.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe.vae, pipe.text, 32)(pipe.params, {"image": torch.zeros(3, 32, 32), "prompt": "a cat"})
    >>> batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    >>> sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0)).shape
    torch.Size([])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.schedules import FLUX2, FlowSchedule
from dsf.model_parts import decoder_lm
from dsf.model_parts.family import Component
from dsf.model_parts import pipelines
from dsf.model_parts.pipelines import device_of, dtype_of
from dsf.models.flux2.keys import DIT
from dsf.models.flux2.model import Flux2DiT
from dsf.models.flux2.pipeline import Flux2Pipeline
from dsf.models.flux2.text import MAX_TOKENS, Flux2TextEncoder
from dsf.models.flux2.vae import VAE, Flux2VAE

TRAINING_GUIDANCE = 1.0  # the embedded guidance FLUX.2-dev trains with (DiffSynth-Studio's train.py)
IMAGE_KEY, PROMPT_KEY = "image", "prompt"
REFERENCE_KEY = "reference_latents_{}"  # the encoded sample's key of reference image k
# LoRA targets in BFL names: the attention and MLP projections of every block (DiffSynth-Studio's FLUX.2 examples
# target the same layers in diffusers names: to_q ... to_add_out, linear_in/out, to_qkv_mlp_proj, to_out)
LORA_TARGETS = "img_attn.qkv,txt_attn.qkv,img_attn.proj,txt_attn.proj,img_mlp.0,img_mlp.2,txt_mlp.0,txt_mlp.2,linear1,linear2"

COMPONENTS = {  # what a FLUX.2 training recipe's model files hold, recognized by their keys
    "dit": Component("DiT", lambda keys: DIT.detect_layout(keys) != "unknown", "flux2-dev.safetensors"),
    "vae": Component("VAE", lambda keys: VAE.detect_layout(keys) != "unknown", "ae.safetensors"),
    "text": Component("text encoder", lambda keys: any(k.endswith(decoder_lm.MARKER) for k in keys), "text_encoder/"),
}


@dataclass(frozen=True)
class SampleEncoder:
    """The gradient-free steps of FLUX.2 training, run once per sample (split training caches their output).

    ``encoder(params, item)`` takes a dataset item with an ``image`` (3, H, W) in [-1, 1], a ``prompt`` and, for
    editing, the images of the ``reference_keys`` columns (each (3, H_k, W_k), sides multiples of 16), and returns
    the item's other columns plus ``latents`` (128, H/16, W/16), ``text_embeds`` (L, 3·hidden) and
    ``reference_latents_k`` (128, H_k/16, W_k/16). ``params`` holds ``vae`` and ``text``.
    """

    vae: Flux2VAE
    text: Flux2TextEncoder
    max_sequence_length: int = MAX_TOKENS
    reference_keys: Sequence[str] = ()

    def __call__(self, params, item: Mapping[str, Any]) -> dict[str, Any]:
        missing = [key for key in (IMAGE_KEY, PROMPT_KEY, *self.reference_keys) if key not in item]
        if missing:
            raise ValueError(
                f"a FLUX.2 training sample needs the columns {missing} (it has {sorted(item)}); name the image column "
                f"{IMAGE_KEY!r}, the prompt column {PROMPT_KEY!r} and the reference images' columns as --reference_columns"
            )
        with torch.no_grad():
            encoded = {"latents": self._latents(params, item[IMAGE_KEY])}
            encoded["text_embeds"] = self.text.encode(params["text"], [item[PROMPT_KEY]], max_length=self.max_sequence_length)[0]
            for k, key in enumerate(self.reference_keys):
                encoded[REFERENCE_KEY.format(k)] = self._latents(params, item[key])
        columns = {key: value for key, value in item.items() if key not in (IMAGE_KEY, *self.reference_keys)}
        return {**columns, **encoded}

    def _latents(self, params, image: torch.Tensor) -> torch.Tensor:
        pixels = image[None].to(device_of(params["vae"]), dtype_of(params["vae"]))
        return self.vae.encode(params["vae"], pixels)[0]


def reference_latents(batch: Mapping[str, Any], device, dtype) -> list[torch.Tensor]:
    """The batch's reference latents ``reference_latents_0, _1, ...`` in order, on ``device`` in ``dtype``.

    >>> [tuple(r.shape) for r in reference_latents({"reference_latents_0": torch.zeros(1, 8, 2, 2), "latents": 0}, "cpu", torch.float32)]
    [(1, 8, 2, 2)]
    """
    found, k = [], 0
    while REFERENCE_KEY.format(k) in batch:
        found.append(batch[REFERENCE_KEY.format(k)].to(device, dtype))
        k += 1
    return found


def sft_loss(dit: Flux2DiT, schedule: FlowSchedule = FLUX2):
    """``loss(params, batch, key)``: flow matching of the DiT (``params["dit"]``) on a batch of encoded samples.

    Timesteps are drawn from FLUX.2's 1000-step training grid (μ = 0.8) with its loss weights
    (:func:`dsf.diffusion.losses.flow_matching_loss`); a guidance-distilled DiT (dev) gets the embedded guidance
    :data:`TRAINING_GUIDANCE`. The batch holds ``latents`` (B, 128, h, w), ``text_embeds`` (B, L, D) and, for
    editing, ``reference_latents_k`` (B, 128, h_k, w_k).

    >>> import dsf
    >>> from dsf.models.flux2.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline(variant="dev")
    >>> batch = {"latents": torch.zeros(1, 16, 2, 2), "text_embeds": torch.zeros(1, 4, 24)}
    >>> float(sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """

    def velocity(dit_params, latents, sigma, text_embeds, guidance, reference_latents):
        return dit(dit_params, latents, sigma.to(latents.dtype), text_embeds=text_embeds, guidance=guidance,
                   reference_latents=reference_latents)

    def loss(params, batch, key):
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        latents = batch["latents"].to(device, dtype)
        guidance = torch.full((latents.shape[0],), TRAINING_GUIDANCE, device=device, dtype=dtype)
        cond = {
            "text_embeds": batch["text_embeds"].to(device, dtype),
            "guidance": guidance if dit.config.guidance_embeds else None,
            "reference_latents": reference_latents(batch, device, dtype),
        }
        return flow_matching_loss(velocity, params["dit"], latents, key, cond, schedule=schedule)

    return loss


def direct_distill_loss(pipe: Flux2Pipeline):
    """:func:`dsf.model_parts.pipelines.direct_distill_loss` of FLUX.2: the student samples at the teacher image's size
    (16 pixels per latent) with its ``cfg_scale`` as the guidance scale (dev embeds it, klein base guides with it).

    >>> import dsf
    >>> from dsf.models.flux2.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 2, 2), "prompt": ["a cat"], "seed": ["0"], "num_inference_steps": ["2"],
    ...          "cfg_scale": ["1"]}
    >>> float(direct_distill_loss(pipe)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """
    return pipelines.direct_distill_loss(pipe, pipe.multiple, guidance="guidance_scale")
