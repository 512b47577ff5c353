"""Wan DiT: parity with diffusers' WanTransformer3DModel (T2V, I2V, TI2V), checkpoint layouts, two experts,
full-size shapes, input errors."""

from __future__ import annotations

import copy
import json

import chex
import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models import wan
from dsf.models.wan import keys

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

from comfy_fp8 import comfy_fp8  # noqa: E402

BASE = dict(num_attention_heads=2, attention_head_dim=16, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2)
VARIANTS = {
    "t2v": dict(in_channels=16, out_channels=16),
    "i2v": dict(in_channels=36, out_channels=16, image_dim=24, added_kv_proj_dim=32),
    "ti2v": dict(in_channels=48, out_channels=48),
}
BATCH, FRAMES, HEIGHT, WIDTH, TEXT_LEN, IMAGE_TOKENS, REFERENCE_TEXT_LEN = 2, 3, 4, 6, 7, 5, 512


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so a swapped or misplaced tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _reference_model(variant: str, seed: int = 0) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**BASE, **VARIANTS[variant]).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request):
    return _reference_model(request.param)


def _inputs(config) -> dict:
    gen = torch.Generator().manual_seed(7)
    out_channels, in_channels = config.out_channels, config.in_channels
    inputs = dict(
        latents=torch.randn(BATCH, out_channels, FRAMES, HEIGHT, WIDTH, generator=gen),
        timestep=torch.tensor([0.3, 0.9]),
        text_embeds=torch.randn(BATCH, TEXT_LEN, BASE["text_dim"], generator=gen),
    )
    if config.image_dim is not None:
        inputs["image_embeds"] = torch.randn(BATCH, IMAGE_TOKENS, config.image_dim, generator=gen)
    if in_channels > out_channels:
        inputs["image_latents"] = torch.randn(BATCH, in_channels - out_channels, FRAMES, HEIGHT, WIDTH, generator=gen)
    return inputs


def _diffusers_velocity(model, latents, timestep, text_embeds, image_embeds=None, image_latents=None):
    """The reference call as diffusers' Wan pipelines make it: 512 text tokens (zeros past the prompt), t = σ·1000."""
    padded_text = torch.nn.functional.pad(text_embeds, (0, 0, 0, REFERENCE_TEXT_LEN - text_embeds.shape[1]))
    hidden = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
    if timestep.ndim == 2:  # one σ per latent frame -> one per token, as diffusers' TI2V pipeline passes it
        tokens_per_frame = (HEIGHT // 2) * (WIDTH // 2)
        timestep = timestep.repeat_interleave(tokens_per_frame, dim=1)
    with torch.no_grad():
        return model(
            hidden_states=hidden,
            timestep=timestep * 1000,
            encoder_hidden_states=padded_text,
            encoder_hidden_states_image=image_embeds,
            return_dict=False,
        )[0]


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(dit, params, reference, **change):
    inputs = _inputs(dit.config) | change
    ref = _diffusers_velocity(reference, **inputs)
    with torch.no_grad():
        ours = dit(params, **inputs)
    assert ours.shape == inputs["latents"].shape
    error = _relative_error(ours, ref)
    assert error <= 1e-4, error
    return error


def _expected_config(reference) -> wan.WanConfig:
    c = reference.config
    return wan.WanConfig(num_heads=c.num_attention_heads, head_dim=c.attention_head_dim, in_channels=c.in_channels,
                         out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim,
                         num_layers=c.num_layers, image_dim=c.image_dim)


def test_parity_from_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    dit, params = wan.load_dit(tmp_path / "pipe")
    assert dit.config == _expected_config(reference)  # the head size comes from config.json only
    _assert_parity(dit, params, reference)


def _write_sharded(state: dict, folder) -> None:
    """Two shards and their index, as Wan-AI publishes the 14B models."""
    folder.mkdir(parents=True)
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, folder / file)
    weight_map = {k: file for file, shard_keys in shards.items() for k in shard_keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_parity_from_sharded_original_layout(reference, tmp_path):
    _write_sharded(keys.ours_to_original(reference.state_dict()), tmp_path / "Wan-original")
    dit, params = wan.load_dit(tmp_path / "Wan-original", config={"attention_head_dim": 16})
    assert dit.config == _expected_config(reference)
    _assert_parity(dit, params, reference)


def test_parity_from_comfyui_prefix(reference):
    original = keys.ours_to_original(reference.state_dict())
    comfy = {keys.COMFY_PREFIX + k: v for k, v in original.items()} | {"vae.decoder.conv1.weight": torch.zeros(1)}
    dit, params = wan.load_dit(comfy, config={"attention_head_dim": 16})
    _assert_parity(dit, params, reference)


def test_parity_from_a_comfyui_fp8_scaled_file(reference, tmp_path):
    """ComfyUI's wan2.1_t2v_14B_fp8_scaled-like files: original layout, the blocks' matrices in fp8 with a
    scale_weight each and the scaled_fp8 marker; they load as fp8 storage."""
    original = keys.ours_to_original(reference.state_dict())
    tensors, _, dequantized = comfy_fp8(original, lambda key, t: t.ndim == 2 and key.startswith("blocks."), "scaled_fp8")
    save_file(tensors, tmp_path / "wan_fp8_scaled.safetensors")
    dit, params = wan.load_dit(tmp_path / "wan_fp8_scaled.safetensors", config={"attention_head_dim": 16},
                               dtype=torch.float32)
    assert params["blocks"][0]["attn1"]["to_q"]["weight"].data.dtype == torch.float8_e4m3fn
    expected = copy.deepcopy(reference)
    expected.load_state_dict(dict(keys.DIT.to_ours(dequantized)[0]))
    _assert_parity(dit, params, expected)


def test_parity_with_one_sigma_per_latent_frame():
    """Wan2.2 TI2V: the clean first frame gets σ 0, the others the step's σ (diffusers' per-token timestep)."""
    reference = _reference_model("ti2v", seed=3)
    dit, params = wan.load_dit(dict(reference.state_dict()), config={"attention_head_dim": 16})
    per_frame = torch.tensor([[0.0, 0.7, 0.7], [0.0, 0.2, 0.2]])
    _assert_parity(dit, params, reference, timestep=per_frame)


def test_parity_detects_a_wrong_weight():
    """The parity check is sharp: one perturbed image-key bias breaks it."""
    reference = _reference_model("i2v")
    dit, params = wan.load_dit(dict(reference.state_dict()), config={"attention_head_dim": 16})
    params["blocks"][1]["attn2"]["add_k_proj"]["bias"] = params["blocks"][1]["attn2"]["add_k_proj"]["bias"] + 0.05
    with pytest.raises(AssertionError):
        _assert_parity(dit, params, reference)


def test_image_inputs_change_the_output():
    """The I2V conditioning is really used: other image embeds or latents give another velocity."""
    reference = _reference_model("i2v")
    dit, params = wan.load_dit(dict(reference.state_dict()), config={"attention_head_dim": 16})
    inputs = _inputs(dit.config)
    base = dit(params, **inputs)
    for name in ("image_embeds", "image_latents"):
        changed = dit(params, **(inputs | {name: inputs[name].roll(1, dims=-1)}))
        assert _relative_error(changed, base) > 1e-3


def test_original_layout_is_what_diffusers_converts():
    """Independent of our converter: diffusers' own original->diffusers conversion gives back its state dict."""
    state = dict(_reference_model("i2v").state_dict())
    original = keys.ours_to_original(state)
    assert {"blocks.1.modulation", "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight",
            "blocks.0.norm3.bias", "blocks.0.ffn.2.weight", "head.modulation", "head.head.weight",
            "time_projection.1.weight", "img_emb.proj.4.bias", "text_embedding.2.weight"} <= set(original)
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_round_trip_ours_original_ours_is_exact():
    ours = dict(_reference_model("i2v").state_dict())
    back, _ = keys.DIT.to_ours(keys.ours_to_original(ours))
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_unknown_keys_are_listed(layout):
    state = dict(_reference_model("t2v").state_dict())
    if layout == "original":
        state = keys.ours_to_original(state)
    state.pop(next(k for k in state if k.endswith(("blocks.1.ffn.net.2.bias", "blocks.1.ffn.2.bias"))))
    state["vace_blocks.0.after_proj.weight"] = torch.zeros(3)
    expected = r"1 missing keys.*blocks\.1\.ffn\.net\.2\.bias.*1 unexpected keys.*vace_blocks"
    with pytest.raises(ValueError, match=expected):
        wan.load_dit(state, config={"attention_head_dim": 16})


def test_config_precedence(tmp_path):
    """defaults < shapes < config.json < config=."""
    model = WanTransformer3DModel(**BASE, **VARIANTS["t2v"])
    model.save_pretrained(tmp_path)
    dit, _ = wan.load_dit(tmp_path, config={"attention_head_dim": 8, "num_attention_heads": 4})
    assert (dit.config.head_dim, dit.config.num_heads) == (8, 4)  # config= over config.json
    assert (dit.config.num_layers, dit.config.ffn_dim, dit.config.text_dim) == (2, 48, 16)  # shapes over defaults
    dit, _ = wan.load_dit(dict(model.state_dict()), config={"attention_head_dim": 8})
    assert dit.config.num_heads == 4  # without config.json, heads = hidden size / head size
    config = json.loads((tmp_path / "config.json").read_text()) | {"num_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.2\."):
        wan.load_dit(tmp_path)  # config.json over shapes
    with pytest.raises(ValueError, match="unknown Wan config keys"):
        wan.load_dit(tmp_path, config={"num_blocks": 2})
    with pytest.raises(ValueError, match="pos_embed_seq_len=514 is not supported.*FLF2V"):
        wan.load_dit(dict(model.state_dict()), config={"pos_embed_seq_len": 514})
    with pytest.raises(ValueError, match="added_kv_proj_dim 32 does not fit image_dim None"):
        wan.load_dit(dict(model.state_dict()), config={"attention_head_dim": 16, "added_kv_proj_dim": 32})


@pytest.mark.parametrize(
    "config, diffusers_kwargs, billions",
    [
        (wan.WAN21_T2V_1_3B, dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), 1.42),
        (wan.WAN21_T2V_14B, dict(), 14.29),
        (wan.WAN21_I2V_14B, dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120), 16.39),
        (wan.WAN22_TI2V_5B, dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
                                 num_layers=30), 5.00),
    ],
    ids=["1.3B", "14B", "I2V-14B", "TI2V-5B"],
)
def test_full_size_meta_params_match_diffusers(config, diffusers_kwargs, billions):
    with torch.device("meta"):
        reference = WanTransformer3DModel(**diffusers_kwargs)
    params = wan.dit_params_meta(config)
    chex.assert_trees_all_equal_shapes(dsf.tree.flatten_dict(params), dict(reference.state_dict()))
    assert dsf.tree.num_params(params) == sum(p.numel() for p in reference.parameters())
    assert round(dsf.tree.num_params(params) / 1e9, 2) == billions
    assert config.rope_axes_dims == (44, 42, 42)


def _tiny_expert(seed: int, variant: str = "t2v"):
    reference = _reference_model(variant, seed)
    return wan.load_dit(dict(reference.state_dict()), config={"attention_head_dim": 16})


def test_two_experts_route_each_call_by_sigma():
    (high, high_params), (low, low_params) = _tiny_expert(1), _tiny_expert(2)
    experts = wan.TwoExpertDiT(high, low, boundary=0.875)
    params = {"high_noise": high_params, "low_noise": low_params}
    inputs = _inputs(high.config)
    for sigma, expected_dit, expected_params in [(0.875, high, high_params), (0.95, high, high_params),
                                                 (0.874, low, low_params), (0.1, low, low_params)]:
        call = inputs | {"timestep": torch.full((BATCH,), sigma)}
        assert torch.equal(experts(params, **call), expected_dit(expected_params, **call)), sigma
    with pytest.raises(ValueError, match=r"both sides of the expert boundary 0.875"):
        experts(params, **(inputs | {"timestep": torch.tensor([0.9, 0.5])}))


def test_load_two_experts_from_a_diffusers_folder(tmp_path):
    for seed, folder in enumerate(["transformer", "transformer_2"]):
        _reference_model("i2v", seed).save_pretrained(tmp_path / folder)
    dit, params = wan.load_two_expert_dit(tmp_path)
    assert dit.boundary == 0.9  # image-to-video default
    (tmp_path / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.85}))
    assert wan.load_two_expert_dit(tmp_path)[0].boundary == 0.85
    assert wan.load_two_expert_dit(tmp_path, boundary=0.8)[0].boundary == 0.8
    high_reference = _reference_model("i2v", 0)
    _assert_parity(dit.high_noise, params["high_noise"], high_reference)
    with pytest.raises(ValueError, match=r"two experts of a Wan2.2 A14B model.*load_two_expert_dit"):
        wan.load_dit(tmp_path)


def test_expert_timestep_ranges_select_each_experts_sigmas():
    from dsf.diffusion.losses import timestep_indices, timestep_range
    from dsf.diffusion.schedules import WAN

    grid = WAN.training_sigmas()
    for boundary in (0.875, 0.9):
        ranges = wan.expert_timestep_ranges(boundary)
        high_start, high_end = timestep_range(len(grid), **ranges["high_noise"])
        low_start, low_end = timestep_range(len(grid), **ranges["low_noise"])
        assert (high_start, high_end, low_end) == (0, low_start, len(grid))  # the two ranges tile the grid
        assert bool((grid[:high_end] >= boundary).all()) and bool((grid[low_start:] < boundary).all())
        drawn = timestep_indices(dsf.random.key(0), 256, len(grid), **ranges["high_noise"])
        assert bool((grid[drawn] >= boundary).all())


def test_blocks_run_through_run_blocks(monkeypatch):
    dit, params = _tiny_expert(0)
    calls = []
    real = dsf.run_blocks

    def counting(block_fn, blocks, carry, *args, **kwargs):
        calls.append(len(blocks))
        return real(block_fn, blocks, carry, *args, **kwargs)

    monkeypatch.setattr(dsf, "run_blocks", counting)
    dit(params, **_inputs(dit.config))
    assert calls == [2]


@pytest.fixture(scope="module")
def tiny_i2v():
    return _tiny_expert(0, "i2v")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latents=torch.zeros(BATCH, 36, FRAMES, HEIGHT, WIDTH)), r"latents have shape \(2, 36, 3, 4, 6\).*\(B, 16, T, H, W\).*20 conditioning channels separately"),
        (dict(latents=torch.zeros(BATCH, 16, HEIGHT, WIDTH)), r"latents have shape \(2, 16, 4, 6\)"),
        (dict(latents=torch.zeros(BATCH, 16, FRAMES, HEIGHT, 5)), r"frames 3, height 4 and width 5 must be multiples of the patch size \(1, 2, 2\)"),
        (dict(timestep=torch.zeros(3)), r"timestep has shape \(3,\).*shape \(2,\).*or \(2, 3\)"),
        (dict(text_embeds=torch.zeros(1, TEXT_LEN, 16)), r"text_embeds has shape \(1, 7, 16\).*\(2, L, 16\)"),
        (dict(text_embeds=torch.zeros(BATCH, 513, 16)), r"513 tokens.*at most text_len 512"),
        (dict(image_embeds=None), r"image-to-video with a CLIP image embedder \(image_dim 24\): pass image_embeds of shape \(2, 257, 24\)"),
        (dict(image_embeds=torch.zeros(BATCH, 257, 1280)), r"image_embeds has shape \(2, 257, 1280\).*\(2, L, 24\)"),
        (dict(image_latents=None), r"in_channels 36 = 16 noisy latent channels \+ 20 conditioning channels\): pass image_latents of shape \(2, 20, 3, 4, 6\)"),
        (dict(image_latents=torch.zeros(BATCH, 20, 1, HEIGHT, WIDTH)), r"image_latents has shape \(2, 20, 1, 4, 6\).*\(2, 20, 3, 4, 6\)"),
    ],
)
def test_bad_inputs_name_the_problem(tiny_i2v, change, message):
    dit, params = tiny_i2v
    with pytest.raises(ValueError, match=message):
        dit(params, **(_inputs(dit.config) | change))


def test_image_inputs_given_to_a_text_to_video_model_are_errors():
    dit, params = _tiny_expert(0)
    inputs = _inputs(dit.config)
    with pytest.raises(ValueError, match="no image embedder.*pass image_embeds=None"):
        dit(params, **inputs, image_embeds=torch.zeros(BATCH, 257, 1280))
    with pytest.raises(ValueError, match=r"takes no image_latents.*latents\[:, :, :1\]"):
        dit(params, **inputs, image_latents=torch.zeros(BATCH, 20, FRAMES, HEIGHT, WIDTH))
