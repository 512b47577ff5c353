"""Qwen-Image DiT: parity with diffusers' QwenImageTransformer2DModel (T2I, batched prompts with masks, Edit
reference images, Edit-2511's zero_cond_t), checkpoint layouts and sources, full-size shapes, input errors."""

from __future__ import annotations

import json

import chex
import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models import qwen_image

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402
from comfy_fp8 import comfy_fp8  # noqa: E402
from tiny_flux import randomize  # noqa: E402

TINY = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
BATCH, HEIGHT, WIDTH, TEXT_LEN = 2, 8, 6, 5
MASK = torch.tensor([[True, True, True, False, False], [True] * 5])


def _reference(zero_cond_t: bool) -> QwenImageTransformer2DModel:
    model = QwenImageTransformer2DModel(**TINY, zero_cond_t=zero_cond_t).eval()
    randomize(model, seed=int(zero_cond_t))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["qwen-image", "zero_cond_t"])
def reference(request):
    return _reference(request.param)


def _inputs(masked: bool = True, references: int = 0):
    gen = torch.Generator().manual_seed(7)
    text = torch.randn(BATCH, TEXT_LEN, TINY["joint_attention_dim"], generator=gen)
    sizes = [(4, 4), (6, 10)][:references]
    return dict(
        latents=torch.randn(BATCH, 16, HEIGHT, WIDTH, generator=gen),
        timestep=torch.tensor([0.3, 0.9]),
        text_embeds=text * MASK[..., None] if masked else text,  # zero-padded, as the pipelines give them
        text_mask=MASK if masked else None,
        reference_latents=[torch.randn(BATCH, 16, h, w, generator=gen) for h, w in sizes],
    )


def _pack(latents):
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def _diffusers_velocity(model, latents, timestep, text_embeds, text_mask, reference_latents):
    """diffusers' own packing, image shapes and unpacking around the reference transformer (as its Edit pipelines)."""
    b, _, h, w = latents.shape
    images = [latents, *reference_latents]
    img_shapes = [[(1, x.shape[-2] // 2, x.shape[-1] // 2) for x in images]] * b
    with torch.no_grad():
        out = model(hidden_states=torch.cat([_pack(x) for x in images], dim=1), encoder_hidden_states=text_embeds,
                    encoder_hidden_states_mask=text_mask, timestep=timestep, img_shapes=img_shapes, return_dict=False)[0]
    out = out[:, : (h // 2) * (w // 2)]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)[:, :, 0]


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(dit, params, reference, **input_options):
    inputs = _inputs(**input_options)
    ref = _diffusers_velocity(reference, **inputs)
    with torch.no_grad():
        ours = dit(params, **inputs)
    assert ours.shape == inputs["latents"].shape
    error = _relative_error(ours, ref)
    assert error <= 1e-4, error
    return error


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("references", [0, 1, 2], ids=["t2i", "edit", "edit-2images"])
def test_parity_with_diffusers(reference, masked, references):
    dit, params = qwen_image.load_dit(dict(reference.state_dict()), config=dict(reference.config))
    _assert_parity(dit, params, reference, masked=masked, references=references)


def test_parity_from_diffusers_folder_with_extra_config_keys(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    written = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert {"zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"} <= set(written)
    dit, params = qwen_image.load_dit(tmp_path / "pipe")
    assert dit.config.zero_cond_t == reference.config.zero_cond_t  # only config.json knows it
    assert dit.config.axes_dims_rope == (4, 6, 6)
    _assert_parity(dit, params, reference, references=1)


@pytest.mark.parametrize("prefix", ["", qwen_image.COMFY_PREFIX], ids=["plain", "comfyui"])
def test_parity_from_single_file(reference, tmp_path, prefix):
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "qwen_image_bf16.safetensors")
    config = {"axes_dims_rope": [4, 6, 6], "zero_cond_t": reference.config.zero_cond_t}
    dit, params = qwen_image.load_dit(tmp_path / "qwen_image_bf16.safetensors", config=config)
    _assert_parity(dit, params, reference, references=1)


def test_parity_from_a_comfyui_fp8mixed_file(reference, tmp_path):
    """ComfyUI's qwen_image fp8mixed files: per-layer .comfy_quant, weight_scale and input_scale beside fp8 matrices."""
    state = {qwen_image.COMFY_PREFIX + k: v for k, v in reference.state_dict().items()}
    tensors, _, dequantized = comfy_fp8(state, lambda key, t: t.ndim == 2 and "transformer_blocks." in key, "layer")
    save_file(tensors, tmp_path / "qwen_image_fp8mixed.safetensors")
    config = {"axes_dims_rope": [4, 6, 6], "zero_cond_t": reference.config.zero_cond_t}
    dit, params = qwen_image.load_dit(tmp_path / "qwen_image_fp8mixed.safetensors", config=config, dtype=torch.float32)
    assert params["transformer_blocks"][0]["attn"]["to_q"]["weight"].data.dtype == torch.float8_e4m3fn
    expected = QwenImageTransformer2DModel(**TINY, zero_cond_t=reference.config.zero_cond_t).eval()
    expected.load_state_dict({k.removeprefix(qwen_image.COMFY_PREFIX): v for k, v in dequantized.items()})
    _assert_parity(dit, params, expected, references=1)


def test_comfyui_edit_2511_files_mark_zero_cond_t_with_an_empty_tensor(tmp_path):
    """ComfyUI's qwen_image_edit_2511 files carry ``__index_timestep_zero__`` (an empty tensor) instead of a config."""
    reference = _reference(zero_cond_t=True)
    state = {qwen_image.COMFY_PREFIX + k: v for k, v in reference.state_dict().items()}
    save_file(state | {qwen_image.COMFY_PREFIX + "__index_timestep_zero__": torch.empty(0)}, tmp_path / "2511.safetensors")
    dit, params = qwen_image.load_dit(tmp_path / "2511.safetensors", config={"axes_dims_rope": [4, 6, 6]})
    assert dit.config.zero_cond_t and "__index_timestep_zero__" not in params
    _assert_parity(dit, params, reference, references=1)
    dit, _ = qwen_image.load_dit(state, config={"axes_dims_rope": [4, 6, 6]})
    assert not dit.config.zero_cond_t


def test_parity_detects_a_wrong_weight(reference):
    """The parity check is sharp: one perturbed modulation bias breaks it."""
    dit, params = qwen_image.load_dit(dict(reference.state_dict()), config=dict(reference.config))
    params["norm_out"]["linear"]["bias"] = params["norm_out"]["linear"]["bias"] + 0.01
    with pytest.raises(AssertionError):
        _assert_parity(dit, params, reference)


def test_zero_cond_t_changes_only_what_reference_tokens_see():
    """zero_cond_t is a real switch: with reference images the output changes, without them it does not."""
    model = _reference(zero_cond_t=False)
    params = dsf.tree.unflatten_dict(dict(model.state_dict()))
    plain = qwen_image.QwenImageConfig(**{"num_layers": 2, "num_heads": 2, "head_dim": 16, "context_dim": 24,
                                          "axes_dims_rope": (4, 6, 6)})
    zero = qwen_image.QwenImageConfig(**{**plain.__dict__, "zero_cond_t": True})
    with torch.no_grad():
        for references, same in [(0, True), (1, False)]:
            inputs = _inputs(references=references)
            a, b = qwen_image.apply(params, **inputs, config=plain), qwen_image.apply(params, **inputs, config=zero)
            assert torch.equal(a, b) == same


def test_batched_prompts_of_different_lengths_equal_each_alone():
    """A prompt padded and masked in a batch gives what it gives alone, unpadded (text RoPE over the padded length
    is the same for its valid tokens, padded keys are masked)."""
    model = _reference(zero_cond_t=False)
    dit, params = qwen_image.load_dit(dict(model.state_dict()), config=dict(model.config))
    inputs = _inputs()
    with torch.no_grad():
        batched = dit(params, **inputs)
        alone = dit(params, inputs["latents"][:1], inputs["timestep"][:1], inputs["text_embeds"][:1, :3])
    assert _relative_error(batched[:1], alone) <= 1e-5


@pytest.mark.parametrize("key, value", [("use_layer3d_rope", True), ("use_additional_t_cond", True),
                                         ("guidance_embeds", True), ("patch_size", 1)])
def test_unimplemented_config_values_are_named(tmp_path, key, value):
    model = QwenImageTransformer2DModel(**TINY)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | {key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config {key}={value!r} is not supported"):
        qwen_image.load_dit(tmp_path)


def test_unknown_keys_are_listed():
    state = dict(_reference(False).state_dict())
    state.pop("transformer_blocks.1.img_mlp.net.2.bias")
    state["mystery_adapter.weight"] = torch.zeros(3)
    expected = r"1 missing keys.*transformer_blocks\.1\.img_mlp\.net\.2\.bias.*1 unexpected keys.*mystery_adapter"
    with pytest.raises(ValueError, match=expected):
        qwen_image.load_dit(state, config={"axes_dims_rope": [4, 6, 6]})


def test_config_precedence(tmp_path):
    """defaults < shapes < config.json < config=."""
    QwenImageTransformer2DModel(**TINY).save_pretrained(tmp_path)
    dit, _ = qwen_image.load_dit(tmp_path, config={"axes_dims_rope": [2, 6, 8], "_class_name": "QwenImageTransformer2DModel"})
    assert dit.config.axes_dims_rope == (2, 6, 8)  # config= over config.json
    assert (dit.config.num_layers, dit.config.num_heads, dit.config.context_dim) == (2, 2, 24)  # shapes over defaults
    config = json.loads((tmp_path / "config.json").read_text()) | {"num_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys.*transformer_blocks\.2\."):
        qwen_image.load_dit(tmp_path)  # config.json over shapes
    with pytest.raises(ValueError, match="unknown Qwen-Image config keys"):
        qwen_image.load_dit(tmp_path, config={"num_blocks": 2})


def test_full_size_meta_params_match_diffusers():
    with torch.device("meta"):
        reference = QwenImageTransformer2DModel()
    params = qwen_image.dit_params_meta(qwen_image.QwenImageConfig())
    assert dsf.tree.num_params(params) == sum(p.numel() for p in reference.parameters()) == 20_430_401_088
    chex.assert_trees_all_equal_shapes(dsf.tree.flatten_dict(params), dict(reference.state_dict()))


@pytest.fixture(scope="module")
def tiny():
    config = qwen_image.QwenImageConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=2, context_dim=24)
    return qwen_image.QwenImageDiT(config), qwen_image.init_dit(config, dsf.random.key(0))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latents=torch.zeros(BATCH, 4, HEIGHT, WIDTH)), r"latents have shape \(2, 4, 8, 6\).*\(B, 16, H, W\)"),
        (dict(latents=torch.zeros(BATCH, 16, HEIGHT, 5)), r"height 8 and width 5 must both be even"),
        (dict(reference_latents=[torch.zeros(1, 16, 4, 4)]), r"reference_latents\[0\] have shape \(1, 16, 4, 4\)"),
        (dict(timestep=torch.zeros(3)), r"timestep has shape \(3,\).*shape \(2,\)"),
        (dict(text_embeds=torch.zeros(BATCH, TEXT_LEN, 32)), r"text_embeds has shape \(2, 5, 32\).*\(2, L, 24\)"),
        (dict(text_mask=torch.ones(BATCH, 4, dtype=torch.bool)), r"text_mask has shape \(2, 4\).*\(2, 5\)"),
    ],
)
def test_bad_inputs_name_the_problem(tiny, change, message):
    dit, params = tiny
    with pytest.raises(ValueError, match=message):
        dit(params, **(_inputs() | change))


def test_blocks_run_through_run_blocks(tiny, monkeypatch):
    dit, params = tiny
    calls = []
    real = dsf.run_blocks

    def counting(block_fn, blocks, carry, *args, **kwargs):
        calls.append(len(blocks))
        return real(block_fn, blocks, carry, *args, **kwargs)

    monkeypatch.setattr(dsf, "run_blocks", counting)
    dit(params, **_inputs())
    assert calls == [2]
