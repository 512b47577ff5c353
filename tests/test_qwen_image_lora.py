"""Qwen-Image LoRA files: exact round trips in every layout on the Qwen-Image DiT (the family record's names), and
files written here read by diffusers' QwenImage LoRA loader give the same velocity."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dsf
from dsf.model_parts.lora_files import LAYOUTS, detect_lora_layout
from dsf.models import qwen_image
from dsf.models.qwen_image.training import LORA_TARGETS
from dsf.transforms.lora import load_lora, lora, param_shapes, save_lora

CFG = qwen_image.QwenImageConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=2, context_dim=24)
RANK = 4


@pytest.fixture(scope="module")
def base():
    return qwen_image.init_dit(CFG, dsf.random.key(0))


def _trained(base, targets, alpha, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = lora(rank=RANK, alpha=alpha, targets=targets).init(base, dsf.random.key(1))
    return dsf.tree.map_with_path(lambda p, x: 0.05 * torch.randn(x.shape, generator=gen) if p.endswith("/up") else x, params)


def _adapters(params, name: str) -> dict:
    return {
        path: w.stages["adapt"].adapters[name]
        for path, w in dsf.tree.leaves_with_paths(params, is_leaf=lambda x: isinstance(x, dsf.Weight))
        if isinstance(w, dsf.Weight) and name in w.stages["adapt"].adapters
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_save_round_trip_is_exact(layout, base, tmp_path):
    trained = _trained(base, LORA_TARGETS, alpha=RANK)
    path = tmp_path / f"{layout}.safetensors"
    save_lora(trained, path, layout)
    keys = list(load_file(path))
    # DiffSynth-Studio's Qwen-Image LoRA files are PEFT's bare diffusers names: one form, read as ours
    assert detect_lora_layout(keys, param_shapes(base)) == ("diffusers" if layout == "diffsynth" else layout)
    if layout == "kohya":
        assert "lora_unet_transformer_blocks_1_img_mod_1.lora_down.weight" in keys  # musubi-tuner's names
    back, ours = _adapters(load_lora(base, path, name="back"), "back"), _adapters(trained, "lora")
    assert sorted(back) == sorted(ours) and len(ours) == 2 * 12
    for module in ours:
        assert torch.equal(back[module].down, ours[module].down) and torch.equal(back[module].up, ours[module].up)
        assert back[module].scale == pytest.approx(ours[module].scale)


# ----------------------------------------------------------------------------- parity with diffusers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    return dict(latents=torch.randn(2, 16, 8, 6, generator=gen), timestep=torch.tensor([0.3, 0.9]),
                text_embeds=torch.randn(2, 5, 24, generator=gen))


def _diffusers_velocity(model, latents, timestep, text_embeds):
    b, c, h, w = latents.shape
    with torch.no_grad():
        out = model(hidden_states=QwenImagePipeline._pack_latents(latents, b, c, h, w), encoder_hidden_states=text_embeds,
                    timestep=timestep, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)[:, :, 0]


def _diffusers_with_lora(base, path):
    model = QwenImageTransformer2DModel(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)).eval()
    model.load_state_dict(dsf.tree.flatten_dict(base))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pipe.load_lora_weights(str(path), adapter_name="x")
    return model


# diffusers 0.42.1's Qwen-Image loader reads .alpha keys only without its own "transformer." prefix (it prefixes
# again): a diffusers-form file loads there at scale 1 (alpha = rank, the training default), where no .alpha is written
@pytest.mark.parametrize("layout, alpha", [("diffusers", RANK), ("kohya", 8), ("comfyui", 8)])
def test_a_lora_written_here_gives_diffusers_the_same_velocity(layout, alpha, base, tmp_path):
    trained = _trained(base, LORA_TARGETS + ",img_in,txt_in,proj_out", alpha, seed=5)
    path = tmp_path / f"{layout}.safetensors"
    save_lora(trained, path, layout)
    inputs = _inputs()
    reference = _diffusers_velocity(_diffusers_with_lora(base, path), **inputs)
    dit = qwen_image.QwenImageDiT(CFG)
    with torch.no_grad():
        ours = dit(load_lora(base, path), **inputs)
        plain = dit(base, **inputs)
    error = float((ours - reference).abs().max() / reference.abs().max())
    assert error <= 1e-4, error
    assert float((plain - reference).abs().max() / reference.abs().max()) > 100 * max(error, 1e-7)
