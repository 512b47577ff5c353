"""FLUX.2 LoRA files: exact round trips in every layout, BFL-named fused targets (double blocks' qkv) split and joined
exactly through the family's own weight conversion, DiffSynth-Studio's names (diffusers'), and files of every layout
loaded by diffusers' Flux2Pipeline.load_lora_weights giving our output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dsf
from dsf.model_parts.lora_files import LAYOUTS, detect_lora_layout
from dsf.models import flux2
from dsf.models.flux2.keys import ours_to_bfl
from dsf.transforms.lora import load_lora, lora, merge_lora, param_shapes, save_lora

CFG = flux2.Flux2Config(num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=1, num_single_blocks=1,
                        context_dim=24)
RANK = 4


@pytest.fixture(scope="module")
def base():
    return flux2.init_dit(CFG, dsf.random.key(0))


def _random_up(params, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return dsf.tree.map_with_path(lambda p, x: scale * torch.randn(x.shape, generator=gen) if p.endswith("/up") else x, params)


def _adapters(params, name: str) -> dict:
    return {
        path: w.stages["adapt"].adapters[name]
        for path, w in dsf.tree.leaves_with_paths(params, is_leaf=lambda x: isinstance(x, dsf.Weight))
        if isinstance(w, dsf.Weight) and name in w.stages["adapt"].adapters
    }


def _merged(params) -> dict:
    return dsf.tree.flatten_dict(dsf.weight.dense_tree(merge_lora(params)))


@pytest.fixture(scope="module")
def trained(base):
    return _random_up(lora(rank=RANK, alpha=8, targets=flux2.FAMILY.lora_targets).init(base, dsf.random.key(1)), seed=0)


def test_the_default_targets_cover_every_projection_of_every_block(trained):
    adapted = sorted(_adapters(trained, "lora"))
    assert "transformer_blocks/0/attn/to_q/weight" in adapted and "transformer_blocks/0/ff_context/linear_out/weight" in adapted
    assert "single_transformer_blocks/0/attn/to_qkv_mlp_proj/weight" in adapted
    assert len(adapted) == 12 + 2  # a double block's 12 projections, a single block's 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip_is_exact(layout, base, trained, tmp_path):
    path = tmp_path / f"{layout}.safetensors"
    save_lora(trained, path, layout)
    # DiffSynth-Studio's FLUX.2 files are PEFT's (diffusers names, lora_A/B, no prefix): they read as diffusers'
    assert detect_lora_layout(load_file(path), param_shapes(base)) == ("diffusers" if layout == "diffsynth" else layout)
    back = load_lora(base, path, name="back")
    merged_back, merged = _merged(back), _merged(trained)
    assert all(torch.allclose(merged_back[k], merged[k], rtol=1e-6, atol=1e-7) for k in merged)
    if layout != "diffsynth":  # DiffSynth-Studio reads no alpha: the scale is folded into the factors
        for path_, adapter in _adapters(back, "back").items():
            original = _adapters(trained, "lora")[path_]
            assert torch.equal(adapter.down, original.down) and torch.equal(adapter.up, original.up), path_


def test_file_keys_name_the_modules_each_tool_reads(trained, tmp_path):
    names = {}
    for layout in ("kohya", "comfyui", "diffsynth", "diffusers"):
        save_lora(trained, tmp_path / f"{layout}.safetensors", layout)
        names[layout] = set(load_file(tmp_path / f"{layout}.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names["kohya"]
    assert "diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight" in names["comfyui"]
    assert "diffusion_model.single_blocks.0.linear1.lora_down.weight" in names["comfyui"]
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in names["diffsynth"]  # DiffSynth reads diffusers names
    assert "single_transformer_blocks.0.attn.to_out.lora_B.weight" in names["diffsynth"]
    assert "transformer.transformer_blocks.0.ff.linear_in.lora_A.weight" in names["diffusers"]


def test_a_bfl_named_fused_qkv_lora_splits_and_joins_exactly(base, tmp_path):
    """A LoRA on BFL's img_attn.qkv is three LoRAs sharing down with up cut in row thirds, and writes back as it was."""
    gen = torch.Generator().manual_seed(2)
    file = {}
    for key, weight in ours_to_bfl(base).items():
        if key.endswith(("attn.qkv.weight", "linear1.weight", "img_mlp.0.weight")):
            module = key.removesuffix(".weight")
            file[f"{module}.lora_A.weight"] = torch.randn(RANK, weight.shape[1], generator=gen)
            file[f"{module}.lora_B.weight"] = torch.randn(weight.shape[0], RANK, generator=gen)
            file[f"{module}.alpha"] = torch.tensor(3.0)
    loaded = load_lora(base, file, name="f")
    attn = loaded["transformer_blocks"][0]["attn"]
    parts = [attn[m]["weight"].stages["adapt"].adapters["f"] for m in ("add_q_proj", "add_k_proj", "add_v_proj")]
    assert all(torch.equal(p.down, file["double_blocks.0.txt_attn.qkv.lora_A.weight"]) for p in parts)
    assert torch.equal(torch.cat([p.up for p in parts]), file["double_blocks.0.txt_attn.qkv.lora_B.weight"])
    merged_bfl = ours_to_bfl(dsf.materialize_tree(merge_lora(loaded)))
    for key, weight in ours_to_bfl(base).items():
        module = key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in file:
            expected = weight + 3.0 / RANK * file[f"{module}.lora_B.weight"] @ file[f"{module}.lora_A.weight"]
            assert torch.allclose(merged_bfl[key], expected, rtol=1e-5, atol=1e-5), key
    save_lora(loaded, tmp_path / "fused.safetensors", "comfyui")
    written = load_file(tmp_path / "fused.safetensors")
    expected = {"diffusion_model." + k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
                for k, v in file.items()}
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- parity with diffusers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import Flux2Pipeline, Flux2Transformer2DModel  # noqa: E402
from test_flux2_dit import _diffusers_velocity, _inputs, _relative_error  # noqa: E402


def _diffusers_with_lora(base, path):
    model = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4)).eval()
    model.load_state_dict(dsf.tree.flatten_dict(base))
    pipe = Flux2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pipe.load_lora_weights(str(path))
    return pipe.transformer


# (not "comfyui": diffusers 0.42 takes any lora_down file for kohya's and skips diffusion_model.-prefixed kohya keys)
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_trained_lora_loads_in_diffusers_with_the_same_output(layout, base, tmp_path):
    trained = _random_up(lora(rank=RANK, alpha=RANK, targets=flux2.FAMILY.lora_targets).init(base, dsf.random.key(4)),
                         seed=5, scale=0.05)
    path = tmp_path / f"{layout}.safetensors"
    save_lora(trained, path, layout)
    inputs = _inputs(guidance_embeds=True, references=1)
    inputs["text_embeds"] = inputs["text_embeds"][..., :24]
    reference = _diffusers_velocity(_diffusers_with_lora(base, path), **inputs)
    dit = flux2.Flux2DiT(CFG)
    with torch.no_grad():
        ours = dit(load_lora(base, path), **inputs)
        plain = dit(base, **inputs)
    error = _relative_error(ours, reference)
    assert error <= 1e-4, error
    assert _relative_error(plain, reference) > 100 * max(error, 1e-7)  # the LoRA changes the output
