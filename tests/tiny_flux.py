"""A tiny random FLUX.1 written to disk like the real ones (diffusers pipeline folder), for tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_TINY = {"vocab_size": 54, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
T5_TINY = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2}
DIT_TINY = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                latent_channels=16, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP's BPE files as FLUX.1-dev ships them (vocab.json, merges.txt), over single letters."""
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def write_t5_tokenizer(folder: Path) -> None:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(folder)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so a swapped or misplaced tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and "linear" not in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def write_tiny_flux_pipeline(root: Path, guidance_embeds: bool = True):
    """Save a tiny random diffusers ``FluxPipeline`` to ``root`` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from dsf.models.flux.pipeline import DEV_SCHEDULER_CONFIG
    from dsf.models.flux.text import CLIP_L_CONFIG, T5_XXL_CONFIG

    transformer = FluxTransformer2DModel(**DIT_TINY, guidance_embeds=guidance_embeds).eval()
    vae = AutoencoderKL(**VAE_TINY).eval()
    for i, model in enumerate((transformer, vae)):
        randomize(model, seed=i)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG | CLIP_TINY)).eval()
    t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG | T5_TINY)).eval()
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe


def write_tiny_flux_bfl_files(root: Path, guidance_embeds: bool = True) -> dict[str, Path]:
    """Tiny random FLUX.1 components as single files in the layouts FLUX.1-dev ships, and its tokenizers.

    The DiT is in BFL's layout (like ``flux1-dev.safetensors``), the VAE in LDM's (like
    ``ae.safetensors``), the CLIP and T5 encoders as transformers safetensors; each file lies in a
    folder of its own beside its config.json (the tiny sizes are not FLUX.1's). Returns the paths
    of ``dit``, ``vae``, ``clip``, ``t5`` and the tokenizer folders ``tokenizer`` (CLIP) and
    ``tokenizer_2`` (T5).
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dsf.models.flux.keys import ours_to_bfl
    from dsf.models.flux.text import CLIP_L_CONFIG, T5_XXL_CONFIG
    from dsf.model_parts.flux_vae_keys import ours_to_ldm

    transformer = FluxTransformer2DModel(**DIT_TINY, guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(**VAE_TINY)
    for i, model in enumerate((transformer, vae)):
        randomize(model, seed=i)
    torch.manual_seed(0)
    clip_config, t5_config = CLIPTextConfig(**CLIP_L_CONFIG | CLIP_TINY), T5Config(**T5_XXL_CONFIG | T5_TINY)
    clip, t5 = CLIPTextModel(clip_config), T5EncoderModel(t5_config)
    files = {
        "dit": (root / "dit" / "flux1-tiny.safetensors", ours_to_bfl(transformer.state_dict()),
                {"_class_name": "FluxTransformer2DModel", **DIT_TINY, "guidance_embeds": guidance_embeds}),
        "vae": (root / "vae" / "ae.safetensors", ours_to_ldm(vae.state_dict()), {"_class_name": "AutoencoderKL", **VAE_TINY}),
        "clip": (root / "clip" / "model.safetensors", clip.state_dict(), clip_config.to_dict()),
        "t5": (root / "t5" / "model.safetensors", t5.state_dict(), t5_config.to_dict()),
    }
    paths = {}
    for component, (path, state_dict, config) in files.items():
        path.parent.mkdir(parents=True)
        save_file({key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}, path)
        (path.parent / "config.json").write_text(json.dumps(config))
        paths[component] = path
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    return paths | {"tokenizer": root / "tokenizer", "tokenizer_2": root / "tokenizer_2"}
