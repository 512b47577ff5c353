"""FLUX.1 training pieces: its model files and tokenizers, the per-sample encoding, and the losses.

Model files are recognized by their key names (:mod:`dsf.files.model_files` with :data:`COMPONENTS`):
a DiT in the BFL, diffusers or ComfyUI layout, a VAE in the LDM/BFL or diffusers layout, a CLIP text
encoder, a T5 encoder (one all-in-one file may hold several). Tokenizer folders are recognized by
their files.

Training splits into the gradient-free steps, run once per sample by :class:`SampleEncoder` (VAE
encoding of the image, T5 and CLIP encoding of the prompt), and the loss on what they produce:
:func:`sft_loss` (flow matching on FLUX.1's training schedule) or :func:`direct_distill_loss` (the
student samples through :meth:`FluxPipeline.denoise` and matches the teacher image's latents).
Split training caches the encoded samples (:mod:`dsf.training.cache`) and trains on them unchanged.

Example:
    >>> import torch, dsf
    >>> from dsf.models.flux.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe.vae, pipe.clip, pipe.t5, 16)(pipe.params, {"image": torch.zeros(3, 32, 32), "prompt": "a cat"})
    >>> batch = {key: value[None] for key, value in encoded.items() if key != "prompt"}
    >>> sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0)).shape
    torch.Size([])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dsf.diffusion.losses import flow_matching_loss
from dsf.model_parts.family import Component
from dsf.models.flux.keys import DIT
from dsf.model_parts.flux_vae_keys import VAE
from dsf.models.flux.model import FluxDiT
from dsf.model_parts import pipelines
from dsf.model_parts.pipelines import device_of, dtype_of
from dsf.models.flux.pipeline import FluxPipeline
from dsf.models.flux.text import CLIP_MARKER, T5_MARKER, TextEncoder
from dsf.model_parts.flux_vae import FluxVAE
from dsf.diffusion.schedules import FLUX1, FlowSchedule

TOKENIZERS = {"clip": "CLIP tokenizer", "t5": "T5 tokenizer"}
TRAINING_GUIDANCE = 1.0  # FLUX.1 training feeds the distilled-guidance embedder 1.0 (DiffSynth's train.py)
IMAGE_KEY, PROMPT_KEY = "image", "prompt"
# DiffSynth's recommended FLUX.1 LoRA targets, in BFL names: attention, MLPs and modulations of every block
LORA_TARGETS = (
    "img_attn.qkv,txt_attn.qkv,img_attn.proj,txt_attn.proj,img_mlp.0,img_mlp.2,txt_mlp.0,txt_mlp.2,"
    "img_mod.lin,txt_mod.lin,linear1,linear2,modulation.lin"
)



# ----------------------------------------------------------------------------- model files


COMPONENTS = {  # what a FLUX.1 training recipe's --model_paths hold, recognized by their keys
    "dit": Component("DiT", lambda keys: DIT.detect_layout(keys) != "unknown", "flux1-dev.safetensors"),
    "vae": Component("VAE", lambda keys: VAE.detect_layout(keys) != "unknown", "ae.safetensors"),
    "clip": Component("CLIP", lambda keys: any(k.endswith(CLIP_MARKER) for k in keys), "text_encoder/"),
    "t5": Component("T5", lambda keys: any(k.endswith(T5_MARKER) for k in keys), "text_encoder_2/"),
}


# ----------------------------------------------------------------------------- tokenizers


def tokenizer_kind(folder: str | os.PathLike) -> str | None:
    """``"clip"`` (BPE ``vocab.json`` + ``merges.txt``), ``"t5"`` (``spiece.model``, or a Unigram
    ``tokenizer.json``), or ``None``, from the files in a tokenizer folder.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    >>> tokenizer_kind(folder)
    't5'
    """
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "clip"
    if (folder / "spiece.model").is_file():
        return "t5"
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file() and json.loads(tokenizer_json.read_text()).get("model", {}).get("type") == "Unigram":
        return "t5"
    return None


def recognize_tokenizers(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{"clip": folder, "t5": folder}`` from tokenizer folders in any order, recognized by their files.

    >>> recognize_tokenizers(["/nonexistent"])
    Traceback (most recent call last):
    ...
    FileNotFoundError: tokenizer folder /nonexistent does not exist; pass the folders of the CLIP and T5 tokenizers
    """
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist; pass the folders of the CLIP and T5 tokenizers")
        kind = tokenizer_kind(folder)
        if kind is None:
            files = sorted(p.name for p in folder.iterdir())
            raise ValueError(
                f"{folder} is neither a CLIP tokenizer (vocab.json + merges.txt) nor a T5 tokenizer (spiece.model, or a "
                f"Unigram tokenizer.json); it holds {files}"
            )
        if kind in found:
            raise ValueError(f"two {TOKENIZERS[kind]}s: {found[kind]} and {folder}; pass one of them")
        found[kind] = folder
    missing = [TOKENIZERS[kind] for kind in TOKENIZERS if kind not in found]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} among the tokenizer folders {[str(f) for f in folders]}")
    return found


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SampleEncoder:
    """The gradient-free steps of FLUX.1 training, run once per sample (split training caches their output).

    ``encoder(params, item)`` takes a dataset item with an ``image`` (3, H, W) in [-1, 1] and a
    ``prompt`` and returns the item's other columns plus ``latents`` (16, H/8, W/8, the VAE
    posterior mean, normalized), ``text_embeds`` (L, 4096) from T5 and ``pooled_embeds`` (768,)
    from CLIP. ``params`` holds ``vae``, ``clip`` and ``t5``; each computes on its own device and dtype.

    >>> from dsf.models.flux.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> encoded = SampleEncoder(pipe.vae, pipe.clip, pipe.t5, 16)(pipe.params, {"image": torch.zeros(3, 32, 32),
    ...                                                                         "prompt": "a cat", "seed": "3"})
    >>> {key: tuple(value.shape) if isinstance(value, torch.Tensor) else value for key, value in encoded.items()}
    {'prompt': 'a cat', 'seed': '3', 'latents': (16, 4, 4), 'text_embeds': (16, 16), 'pooled_embeds': (16,)}
    """

    vae: FluxVAE
    clip: TextEncoder
    t5: TextEncoder
    max_sequence_length: int = 512

    def __call__(self, params, item: Mapping[str, Any]) -> dict[str, Any]:
        missing = [key for key in (IMAGE_KEY, PROMPT_KEY) if key not in item]
        if missing:
            raise ValueError(
                f"a FLUX.1 training sample needs the columns {missing} (it has {sorted(item)}); name the image column "
                f"{IMAGE_KEY!r} and the prompt column {PROMPT_KEY!r} in the metadata"
            )
        prompt = [item[PROMPT_KEY]]
        with torch.no_grad():
            image = item[IMAGE_KEY][None].to(device_of(params["vae"]), dtype_of(params["vae"]))
            latents = self.vae.encode(params["vae"], image)
            text_embeds = self.t5.encode(params["t5"], prompt, max_length=self.max_sequence_length)
            pooled_embeds = self.clip.encode(params["clip"], prompt)
        columns = {key: value for key, value in item.items() if key != IMAGE_KEY}
        return {**columns, "latents": latents[0], "text_embeds": text_embeds[0], "pooled_embeds": pooled_embeds[0]}


# ----------------------------------------------------------------------------- losses


def training_guidance(dit: FluxDiT, batch_size: int, device, dtype) -> torch.Tensor | None:
    """The embedded guidance FLUX.1 trains with (1.0 per sample), or ``None`` for a DiT without a guidance embedder.

    >>> from dsf.models.flux.config import FluxConfig
    >>> training_guidance(FluxDiT(FluxConfig()), 2, "cpu", torch.float32)
    tensor([1., 1.])
    """
    if not dit.config.guidance_embeds:
        return None
    return torch.full((batch_size,), TRAINING_GUIDANCE, device=device, dtype=dtype)


def sft_loss(dit: FluxDiT, schedule: FlowSchedule = FLUX1):
    """``loss(params, batch, key)``: flow matching of the DiT (``params["dit"]``) on a batch of encoded samples.

    Timesteps are drawn from FLUX.1's 1000-step training grid (shift 3) with its loss weights
    (:func:`dsf.diffusion.losses.flow_matching_loss`); the embedded guidance is :data:`TRAINING_GUIDANCE`.
    The batch holds ``latents`` (B, 16, h, w), ``text_embeds`` (B, L, D) and ``pooled_embeds`` (B, P).

    >>> import dsf
    >>> from dsf.models.flux.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 2, 2), "text_embeds": torch.zeros(1, 4, 16), "pooled_embeds": torch.zeros(1, 16)}
    >>> float(sft_loss(pipe.dit)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """

    def velocity(dit_params, latents, sigma, text_embeds, pooled_embeds, guidance):
        return dit(dit_params, latents, sigma.to(latents.dtype), text_embeds=text_embeds, pooled_embeds=pooled_embeds,
                   guidance=guidance)

    def loss(params, batch, key):
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        latents = batch["latents"].to(device, dtype)
        cond = {
            "text_embeds": batch["text_embeds"].to(device, dtype),
            "pooled_embeds": batch["pooled_embeds"].to(device, dtype),
            "guidance": training_guidance(dit, latents.shape[0], device, dtype),
        }
        return flow_matching_loss(velocity, params["dit"], latents, key, cond, schedule=schedule)

    return loss


def direct_distill_loss(pipe: FluxPipeline):
    """:func:`dsf.model_parts.pipelines.direct_distill_loss` of FLUX.1: the student samples at the teacher image's size
    (8 pixels per latent) with its ``cfg_scale`` and the embedded guidance of training.

    >>> import dsf
    >>> from dsf.models.flux.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 4, 4), "prompt": ["a cat"], "seed": ["0"], "num_inference_steps": ["2"],
    ...          "cfg_scale": ["1"]}
    >>> float(direct_distill_loss(pipe)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """
    return pipelines.direct_distill_loss(pipe, pipe.vae.config.downsample_factor, embedded_guidance=TRAINING_GUIDANCE)
