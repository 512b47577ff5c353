"""FLUX.1 DiT: parity with diffusers' FluxTransformer2DModel, checkpoint layouts, full-size shapes, input errors."""

from __future__ import annotations

import json

import chex
import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models import flux
from dsf.models.flux import keys

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

TINY = dict(
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
HIDDEN = 32
BATCH, HEIGHT, WIDTH, TEXT_LEN = 2, 8, 6, 5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so a swapped or misplaced tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and "linear" not in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def reference(request):
    model = FluxTransformer2DModel(**TINY, guidance_embeds=request.param).eval()
    _randomize(model, seed=int(request.param))
    return model


def _inputs(guidance_embeds: bool):
    gen = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(BATCH, 16, HEIGHT, WIDTH, generator=gen),
        timestep=torch.tensor([0.3, 0.9]),
        text_embeds=torch.randn(BATCH, TEXT_LEN, TINY["joint_attention_dim"], generator=gen),
        pooled_embeds=torch.randn(BATCH, TINY["pooled_projection_dim"], generator=gen),
        guidance=torch.tensor([3.5, 1.0]) if guidance_embeds else None,
    )


def _diffusers_velocity(model, latents, timestep, text_embeds, pooled_embeds, guidance):
    """diffusers' own packing, ids and unpacking around the reference transformer."""
    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(text_embeds.shape[1], 3)
    with torch.no_grad():
        out = model(
            hidden_states=packed,
            encoder_hidden_states=text_embeds,
            pooled_projections=pooled_embeds,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(dit, params, reference):
    inputs = _inputs(reference.config.guidance_embeds)
    ref = _diffusers_velocity(reference, **inputs)
    with torch.no_grad():
        ours = dit(params, **inputs)
    assert ours.shape == inputs["latents"].shape
    error = _relative_error(ours, ref)
    assert error <= 1e-4, error
    return error


def test_parity_from_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    dit, params = flux.load_dit(tmp_path / "pipe")
    assert dit.config.guidance_embeds == reference.config.guidance_embeds
    assert dit.config.axes_dims_rope == (4, 6, 6)  # only config.json knows it
    _assert_parity(dit, params, reference)


def test_parity_from_bfl_file(reference, tmp_path):
    bfl = keys.ours_to_bfl(reference.state_dict())
    save_file(bfl, tmp_path / "flux.safetensors")
    dit, params = flux.load_dit(tmp_path / "flux.safetensors", config={"axes_dims_rope": [4, 6, 6]})
    _assert_parity(dit, params, reference)


def test_parity_from_comfyui_prefix(reference):
    bfl = keys.ours_to_bfl(reference.state_dict())
    comfy = {keys.COMFY_PREFIX + k: v for k, v in bfl.items()} | {"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    dit, params = flux.load_dit(comfy, config={"axes_dims_rope": [4, 6, 6]})
    _assert_parity(dit, params, reference)


def test_parity_detects_a_wrong_weight(reference):
    """The parity check is sharp: one perturbed modulation row breaks it."""
    dit, params = flux.load_dit(dict(reference.state_dict()), config={"axes_dims_rope": [4, 6, 6]})
    params["norm_out"]["linear"]["bias"] = params["norm_out"]["linear"]["bias"] + 0.01
    with pytest.raises(AssertionError):
        _assert_parity(dit, params, reference)


def test_bfl_names_and_values_follow_the_original_layout(reference):
    """Independent of our converter: names and shapes from the BFL file, and where each diffusers tensor lands."""
    sd = reference.state_dict()
    bfl = keys.ours_to_bfl(sd)
    h, mlp = HIDDEN, 4 * HIDDEN
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * h, h)
    assert bfl["double_blocks.1.txt_attn.norm.key_norm.scale"].shape == (16,)
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * h + mlp, h)
    assert bfl["single_blocks.1.linear2.weight"].shape == (h, h + mlp)
    assert bfl["final_layer.adaLN_modulation.1.weight"].shape == (2 * h, h)
    assert ("guidance_in.in_layer.weight" in bfl) == reference.config.guidance_embeds
    assert torch.equal(bfl["double_blocks.0.txt_attn.qkv.weight"][h : 2 * h], sd["transformer_blocks.0.attn.add_k_proj.weight"])
    assert torch.equal(bfl["single_blocks.0.linear1.bias"][3 * h :], sd["single_transformer_blocks.0.proj_mlp.bias"])
    assert torch.equal(bfl["double_blocks.1.img_attn.norm.query_norm.scale"], sd["transformer_blocks.1.attn.norm_q.weight"])
    shift_bfl, scale_bfl = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    scale_diffusers, shift_diffusers = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(shift_bfl, shift_diffusers) and torch.equal(scale_bfl, scale_diffusers)


def test_round_trip_ours_bfl_ours_is_exact(reference):
    ours = dict(reference.state_dict())
    back, _ = keys.DIT.to_ours(keys.ours_to_bfl(ours))
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_unknown_keys_are_listed(reference, layout):
    state = dict(reference.state_dict())
    if layout == "bfl":
        state = keys.ours_to_bfl(state)
    state.pop(next(k for k in state if "proj_out.bias" in k or "linear2.bias" in k))
    state["mystery_adapter.weight"] = torch.zeros(3)
    expected = r"1 missing keys.*single_transformer_blocks\.\d\.proj_out\.bias.*1 unexpected keys.*mystery_adapter"
    with pytest.raises(ValueError, match=expected):
        flux.load_dit(state, config={"axes_dims_rope": [4, 6, 6]})


def test_config_precedence(tmp_path):
    """defaults < shapes < config.json < config=."""
    model = FluxTransformer2DModel(**TINY, guidance_embeds=False)
    model.save_pretrained(tmp_path)
    dit, _ = flux.load_dit(tmp_path, config={"axes_dims_rope": [2, 6, 8]})
    assert dit.config.axes_dims_rope == (2, 6, 8)  # config= over config.json
    assert (dit.config.num_double_blocks, dit.config.num_heads, dit.config.context_dim) == (2, 2, 32)  # shapes over defaults
    config = json.loads((tmp_path / "config.json").read_text()) | {"num_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys.*transformer_blocks\.2\."):
        flux.load_dit(tmp_path)  # config.json over shapes
    with pytest.raises(ValueError, match="unknown FLUX config keys"):
        flux.load_dit(tmp_path, config={"num_blocks": 2})


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_full_size_meta_params_match_diffusers(guidance_embeds):
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=guidance_embeds)
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    config = flux.FluxConfig(guidance_embeds=guidance_embeds)
    params = flux.dit_params_meta(config)
    assert dsf.tree.num_params(params) == sum(p.numel() for p in reference.parameters())
    chex.assert_trees_all_equal_shapes(dsf.tree.flatten_dict(params), dict(reference.state_dict()))
    if guidance_embeds:
        assert dsf.tree.num_params(params) == 11_901_408_320
    bfl = keys.ours_to_bfl(params)
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)  # diffusers' own BFL reader
    assert not bfl, f"BFL keys diffusers does not read: {sorted(bfl)[:5]}"
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes


def test_dit_call_matches_apply():
    config = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1, num_single_blocks=1,
                             context_dim=32, pooled_dim=16)
    params = flux.init_dit(config, dsf.random.key(0))
    inputs = _inputs(True)
    assert torch.equal(flux.FluxDiT(config)(params, **inputs), flux.apply(params, **inputs, config=config))


@pytest.fixture(scope="module")
def tiny_dev():
    config = flux.FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=1, num_single_blocks=1,
                             context_dim=32, pooled_dim=16)
    return flux.FluxDiT(config), flux.init_dit(config, dsf.random.key(0))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latents=torch.zeros(BATCH, 4, HEIGHT, WIDTH)), r"latents have shape \(2, 4, 8, 6\).*\(B, 16, H, W\)"),
        (dict(latents=torch.zeros(BATCH, 16, HEIGHT, 5)), r"height 8 and width 5 must both be even"),
        (dict(timestep=torch.zeros(3)), r"timestep has shape \(3,\).*shape \(2,\)"),
        (dict(text_embeds=torch.zeros(1, TEXT_LEN, 32)), r"text_embeds has shape \(1, 5, 32\).*\(2, L, 32\)"),
        (dict(pooled_embeds=torch.zeros(BATCH, 768)), r"pooled_embeds has shape \(2, 768\).*\(2, 16\)"),
        (dict(guidance=None), r"guidance-distilled \(dev\): pass guidance=torch.full\(\(2,\), 3.5\)"),
        (dict(guidance=torch.ones(1)), r"guidance has shape \(1,\)"),
    ],
)
def test_bad_inputs_name_the_problem(tiny_dev, change, message):
    dit, params = tiny_dev
    with pytest.raises(ValueError, match=message):
        dit(params, **(_inputs(True) | change))


def test_guidance_passed_to_schnell_is_an_error():
    config = flux.FluxConfig(num_heads=1, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=0, num_single_blocks=1,
                             context_dim=32, pooled_dim=16, guidance_embeds=False)
    with pytest.raises(ValueError, match="no guidance embedder.*pass guidance=None"):
        flux.apply(flux.init_dit(config, dsf.random.key(0)), **_inputs(True), config=config)


def test_blocks_run_through_run_blocks(tiny_dev, monkeypatch):
    dit, params = tiny_dev
    calls = []
    real = dsf.run_blocks

    def counting(block_fn, blocks, carry, *args, **kwargs):
        calls.append(len(blocks))
        return real(block_fn, blocks, carry, *args, **kwargs)

    monkeypatch.setattr(dsf, "run_blocks", counting)
    dit(params, **_inputs(True))
    assert calls == [1, 1]
