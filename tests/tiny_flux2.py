"""A tiny random FLUX.2 (dev or klein) written to disk like the hub repos (a diffusers pipeline folder), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsf.models.flux2.tiny import random_lm_weights, tiny_lm_config, tiny_tokenizer
from tiny_flux import randomize

TEXT_LAYERS = {"dev": 30, "klein": 27, "klein-base": 27}  # enough for the real hidden-state layers (10, 20, 30) / (9, 18, 27)
DIT_TINY = dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
VAE_TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"}


def tiny_diffusers_components(variant: str) -> dict:
    """The diffusers/transformers modules of a tiny random FLUX.2 ``variant`` (``dev``, ``klein``, ``klein-base``)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoConfig, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    kind = "mistral" if variant == "dev" else "qwen3"
    transformer = Flux2Transformer2DModel(**DIT_TINY, guidance_embeds=variant == "dev").eval()
    vae = AutoencoderKLFlux2(**VAE_TINY).eval()
    for i, model in enumerate((transformer, vae)):
        randomize(model, seed=i)
    gen = torch.Generator().manual_seed(2)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=gen))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
    layers = TEXT_LAYERS[variant]
    text_class = Mistral3ForConditionalGeneration if kind == "mistral" else Qwen3ForCausalLM
    text_encoder = text_class(AutoConfig.for_model(**tiny_lm_config(kind, layers))).eval()
    text_encoder.load_state_dict(random_lm_weights(kind, seed=3, layers=layers))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                tokenizer=tiny_tokenizer(kind), transformer=transformer)


def write_tiny_flux2_pipeline(root: Path, variant: str = "klein-base"):
    """Save a tiny random diffusers ``Flux2Pipeline`` (dev) or ``Flux2KleinPipeline`` (klein, klein-base) to ``root``
    and return it."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    components = tiny_diffusers_components(variant)
    if variant == "dev":
        pipe = Flux2Pipeline(**components)
    else:
        pipe = Flux2KleinPipeline(**components, is_distilled=variant == "klein")
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe


def write_tiny_flux2_bfl_files(root: Path, variant: str = "klein-base") -> dict[str, Path]:
    """Tiny random FLUX.2 components as single files in the layouts the BFL repos ship (the DiT in BFL's layout, the VAE
    as ``ae.safetensors``) and the text encoder as transformers safetensors, each beside its config.json, and the
    tokenizer folder. Returns the paths of ``dit``, ``vae``, ``text`` and ``tokenizer``."""
    from safetensors.torch import save_file

    from dsf.models.flux2.keys import ours_to_bfl
    from dsf.models.flux2.vae import ours_to_bfl as vae_to_bfl

    parts = tiny_diffusers_components(variant)
    dit_config = {"_class_name": "Flux2Transformer2DModel", **DIT_TINY, "guidance_embeds": variant == "dev"}
    files = {
        "dit": (root / "dit" / "flux2-tiny.safetensors", ours_to_bfl(parts["transformer"].state_dict()), dit_config),
        "vae": (root / "vae" / "ae.safetensors", vae_to_bfl(parts["vae"].state_dict()),
                {"_class_name": "AutoencoderKLFlux2", **VAE_TINY}),
        "text": (root / "text" / "model.safetensors", parts["text_encoder"].state_dict(), parts["text_encoder"].config.to_dict()),
    }
    paths = {}
    for component, (path, state_dict, config) in files.items():
        path.parent.mkdir(parents=True)
        save_file({key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}, path)
        (path.parent / "config.json").write_text(json.dumps(config))
        paths[component] = path
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    return paths | {"tokenizer": root / "tokenizer"}
