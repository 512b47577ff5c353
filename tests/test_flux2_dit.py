"""FLUX.2 DiT: parity with diffusers' Flux2Transformer2DModel (dev-like and klein-like, with reference images),
checkpoint layouts against diffusers' own BFL converter, full-size parameter counts, config sources, input errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models import flux2
from dsf.models.flux2 import keys

diffusers = pytest.importorskip("diffusers")
from diffusers import Flux2Pipeline, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from tiny_flux import randomize  # noqa: E402

import comfy_fp8  # noqa: E402
from dsf.files.quantized import comfy_quant_tensor  # noqa: E402

TINY = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
AXES = {"axes_dims_rope": [4, 4, 4, 4]}
HIDDEN, MLP = 32, 96
BATCH, HEIGHT, WIDTH, TEXT_LEN = 2, 4, 3, 5
REFERENCE_SIZES = [(2, 3), (3, 2)]


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "klein"])
def reference(request):
    model = Flux2Transformer2DModel(**TINY, guidance_embeds=request.param).eval()
    randomize(model, seed=int(request.param))
    return model


def _inputs(guidance_embeds: bool, references: int = 0):
    gen = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(BATCH, 128, HEIGHT, WIDTH, generator=gen),
        timestep=torch.tensor([0.3, 0.9]),
        text_embeds=torch.randn(BATCH, TEXT_LEN, TINY["joint_attention_dim"], generator=gen),
        guidance=torch.tensor([4.0, 2.5]) if guidance_embeds else None,
        reference_latents=[torch.randn(BATCH, 128, h, w, generator=gen) for h, w in REFERENCE_SIZES[:references]],
    )


def _diffusers_velocity(model, latents, timestep, text_embeds, guidance, reference_latents):
    """diffusers' own packing, ids and unpacking around the reference transformer, as Flux2Pipeline runs it."""
    tokens, ids = Flux2Pipeline._pack_latents(latents), Flux2Pipeline._prepare_latent_ids(latents)
    if reference_latents:
        ref_ids = Flux2Pipeline._prepare_image_ids([r[:1] for r in reference_latents]).expand(len(latents), -1, -1)
        tokens = torch.cat([tokens, *(Flux2Pipeline._pack_latents(r) for r in reference_latents)], dim=1)
        ids = torch.cat([ids, ref_ids], dim=1)
    with torch.no_grad():
        out = model(hidden_states=tokens, encoder_hidden_states=text_embeds, timestep=timestep, guidance=guidance,
                    img_ids=ids, txt_ids=Flux2Pipeline._prepare_text_ids(text_embeds), return_dict=False)[0]
    image_tokens = latents.shape[2] * latents.shape[3]
    return Flux2Pipeline._unpack_latents_with_ids(out[:, :image_tokens], ids[:, :image_tokens])


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(dit, params, reference, references: int = 0):
    inputs = _inputs(reference.config.guidance_embeds, references)
    ref = _diffusers_velocity(reference, **inputs)
    with torch.no_grad():
        ours = dit(params, **inputs)
    assert ours.shape == inputs["latents"].shape
    error = _relative_error(ours, ref)
    assert error <= 1e-4, error
    return error


@pytest.mark.parametrize("references", [0, 1, 2])
def test_parity_from_diffusers_folder(reference, tmp_path, references):
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    dit, params = flux2.load_dit(tmp_path / "pipe")
    assert dit.config.guidance_embeds == reference.config.guidance_embeds
    assert dit.config.axes_dims_rope == (4, 4, 4, 4)  # only config.json knows it
    _assert_parity(dit, params, reference, references)


def test_parity_from_bfl_file(reference, tmp_path):
    save_file(keys.ours_to_bfl(reference.state_dict()), tmp_path / "flux2.safetensors")
    dit, params = flux2.load_dit(tmp_path / "flux2.safetensors", config=AXES)
    _assert_parity(dit, params, reference, references=1)


def test_parity_from_comfyui_prefix(reference, tmp_path):
    bfl = keys.ours_to_bfl(reference.state_dict())
    comfy = {keys.COMFY_PREFIX + k: v for k, v in bfl.items()} | {"vae.decoder.conv_in.weight": torch.zeros(1)}
    save_file(comfy, tmp_path / "comfy.safetensors")
    dit, params = flux2.load_dit(tmp_path / "comfy.safetensors", config=AXES)
    _assert_parity(dit, params, reference)


def test_parity_from_a_state_dict_with_a_config_object(reference):
    config = flux2.Flux2Config(num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4, 4), num_double_blocks=2,
                               num_single_blocks=2, context_dim=24, guidance_embeds=reference.config.guidance_embeds)
    dit, params = flux2.load_dit(dict(reference.state_dict()), config=config)
    assert dit.config is config
    _assert_parity(dit, params, reference, references=2)


def test_parity_detects_a_wrong_weight(reference):
    """The parity check is sharp: one perturbed modulation row breaks it."""
    dit, params = flux2.load_dit(dict(reference.state_dict()), config=AXES)
    weight = params["single_stream_modulation"]["linear"]["weight"]
    params["single_stream_modulation"]["linear"]["weight"] = weight + 0.01 * torch.eye(*weight.shape)
    with pytest.raises(AssertionError):
        _assert_parity(dit, params, reference)


def test_reference_images_change_the_velocity_and_the_order_matters(reference):
    dit, params = flux2.load_dit(dict(reference.state_dict()), config=AXES)
    inputs = _inputs(reference.config.guidance_embeds, references=2)
    with torch.no_grad():
        with_refs = dit(params, **inputs)
        swapped = dit(params, **(inputs | {"reference_latents": inputs["reference_latents"][::-1]}))
        without = dit(params, **(inputs | {"reference_latents": []}))
    assert _relative_error(with_refs, without) > 1e-3
    assert _relative_error(with_refs, swapped) > 1e-3  # reference k's time coordinate is 10 + 10k


def test_batched_samples_equal_one_at_a_time(reference):
    dit, params = flux2.load_dit(dict(reference.state_dict()), config=AXES)
    inputs = _inputs(reference.config.guidance_embeds, references=1)
    with torch.no_grad():
        batched = dit(params, **inputs)
        for i in range(BATCH):
            one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            one["reference_latents"] = [r[i : i + 1] for r in inputs["reference_latents"]]
            assert _relative_error(dit(params, **one)[0], batched[i]) <= 1e-5


def test_bfl_layout_is_what_diffusers_reads(reference):
    """Our BFL file through diffusers' own converter gives back diffusers' state dict exactly."""
    sd = dict(reference.state_dict())
    bfl = keys.ours_to_bfl(sd)
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert converted.keys() == sd.keys()
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    comfy = {keys.COMFY_PREFIX + k: v for k, v in bfl.items()}
    ours, layout = keys.DIT.to_ours(comfy)
    assert layout == "bfl (prefix 'model.diffusion_model.')"
    assert all(torch.equal(ours[k], sd[k]) for k in sd) and ours.keys() == sd.keys()


def test_bfl_names_and_values_follow_the_original_layout(reference):
    """Independent of our converter: names and shapes of the BFL file, and where each diffusers tensor lands."""
    sd = reference.state_dict()
    bfl = keys.ours_to_bfl(sd)
    h = HIDDEN
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * h, h)
    assert bfl["double_blocks.1.txt_attn.norm.key_norm.scale"].shape == (16,)
    assert bfl["double_blocks.1.img_mlp.0.weight"].shape == (2 * MLP, h)
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * h + 2 * MLP, h)
    assert bfl["single_blocks.1.linear2.weight"].shape == (h, h + MLP)
    assert bfl["double_stream_modulation_txt.lin.weight"].shape == (6 * h, h)
    assert bfl["single_stream_modulation.lin.weight"].shape == (3 * h, h)
    assert ("guidance_in.in_layer.weight" in bfl) == reference.config.guidance_embeds
    assert not any(k.endswith(".bias") for k in bfl)
    assert torch.equal(bfl["double_blocks.0.txt_attn.qkv.weight"][h : 2 * h], sd["transformer_blocks.0.attn.add_k_proj.weight"])
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
def test_unknown_and_missing_keys_are_listed(reference, layout):
    state = dict(reference.state_dict())
    if layout == "bfl":
        state = keys.ours_to_bfl(state)
    state.pop(next(k for k in state if k.endswith(("attn.to_out.weight", "linear2.weight"))))
    state["mystery_adapter.weight"] = torch.zeros(3)
    expected = r"1 missing keys.*single_transformer_blocks\.\d\.attn\.to_out\.weight.*1 unexpected keys.*mystery_adapter"
    with pytest.raises(ValueError, match=expected):
        flux2.load_dit(state, config=AXES)


def test_config_precedence_and_extra_keys(tmp_path):
    """defaults < shapes < config.json (with keys current diffusers writes) < config=."""
    model = Flux2Transformer2DModel(**TINY, guidance_embeds=False)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {"_class_name", "_diffusers_version", "patch_size", "eps", "rope_theta"} <= written.keys()
    config = written | {"some_future_key": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    dit, _ = flux2.load_dit(tmp_path, config={"axes_dims_rope": [2, 6, 4, 4]})
    assert dit.config.axes_dims_rope == (2, 6, 4, 4)  # config= over config.json
    assert (dit.config.num_double_blocks, dit.config.num_heads, dit.config.context_dim) == (2, 2, 24)  # shapes
    assert dit.config.rope_theta == 2000 and not dit.config.guidance_embeds
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys.*transformer_blocks\.2\."):
        flux2.load_dit(tmp_path)  # config.json over shapes
    with pytest.raises(ValueError, match="unknown Flux2Transformer2DModel config keys"):
        flux2.load_dit(tmp_path, config={"num_blocks": 2})
    (tmp_path / "config.json").write_text(json.dumps(config | {"patch_size": 2}))
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        flux2.load_dit(tmp_path)  # a network-changing setting we do not implement is an error, not ignored


FULL = {"dev": flux2.Flux2Config(), "klein-4b": flux2.KLEIN_4B, "klein-9b": flux2.KLEIN_9B}
DIFFUSERS_FULL = {  # the configs of the hub repos (black-forest-labs/FLUX.2-dev, FLUX.2-klein-4B, FLUX.2-klein-9B)
    "dev": {},
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False),
    "klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False),
}
COUNTS = {"dev": 32_223_281_152, "klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248}  # DiffSynth: 32.22 B, 3.88 B, 9.08 B


@pytest.mark.parametrize("name", FULL)
def test_full_size_meta_params_match_diffusers(name):
    with torch.device("meta"):
        reference = Flux2Transformer2DModel(**DIFFUSERS_FULL[name])
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    params = flux2.dit_params_meta(FULL[name])
    assert dsf.tree.num_params(params) == sum(p.numel() for p in reference.parameters()) == COUNTS[name]
    assert {k: tuple(v.shape) for k, v in dsf.tree.flatten_dict(params).items()} == ref_shapes
    bfl = keys.ours_to_bfl(params)
    converted = convert_flux2_transformer_checkpoint_to_diffusers(bfl)  # diffusers' own BFL reader
    assert not bfl, f"BFL keys diffusers does not read: {sorted(bfl)[:5]}"
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes


def test_fp8_file_loads_as_fp8_storage(reference, tmp_path):
    """A plain fp8 file: every tensor float8, kept so whatever dtype is asked for (the compute dtype), at scale 1."""
    bfl = {k: v.to(torch.float8_e4m3fn) for k, v in keys.ours_to_bfl(reference.state_dict()).items()}
    save_file(bfl, tmp_path / "flux2_fp8.safetensors")
    dit, params = flux2.load_dit(tmp_path / "flux2_fp8.safetensors", config=AXES, dtype=torch.float32)
    records = [r for _, r in dsf.tree.leaves_with_paths(params, is_leaf=lambda x: isinstance(x, dsf.Weight))]
    assert {r.data.dtype for r in records} == {torch.float8_e4m3fn}
    assert all(r.stages["decode"].scale.item() == 1.0 and r.stages["decode"].dtype == torch.float32 for r in records)
    upcast = Flux2Transformer2DModel(**TINY, guidance_embeds=reference.config.guidance_embeds).eval()
    upcast.load_state_dict({k: v.to(torch.float32) for k, v in reference.state_dict().items()} |
                           {k: v.to(torch.float8_e4m3fn).to(torch.float32) for k, v in reference.state_dict().items()})
    _assert_parity(dit, params, upcast)


def test_input_errors_name_the_fix(reference):
    dit, params = flux2.load_dit(dict(reference.state_dict()), config=AXES)
    inputs = _inputs(reference.config.guidance_embeds)
    with pytest.raises(ValueError, match=r"latents have shape \(2, 32, 8, 6\).*\(B, 128, H/16, W/16\)"):
        dit(params, **(inputs | {"latents": torch.zeros(2, 32, 8, 6)}))
    with pytest.raises(ValueError, match=r"reference_latents\[0\] has shape \(1, 128, 2, 2\)"):
        dit(params, **(inputs | {"reference_latents": [torch.zeros(1, 128, 2, 2)]}))
    with pytest.raises(ValueError, match=r"text_embeds has shape \(2, 5, 7\)"):
        dit(params, **(inputs | {"text_embeds": torch.zeros(2, 5, 7)}))
    wrong_guidance = None if reference.config.guidance_embeds else torch.ones(BATCH)
    with pytest.raises(ValueError, match="pass guidance="):
        dit(params, **(inputs | {"guidance": wrong_guidance}))


def _in_blocks(key: str, tensor: torch.Tensor) -> bool:
    """The weights ComfyUI's fp8mixed files quantize: the blocks' matrices (embedders, modulation, final layer kept)."""
    return tensor.ndim == 2 and "blocks." in key


@pytest.mark.parametrize("style", comfy_fp8.STYLES)
def test_parity_from_a_comfyui_scaled_fp8_file(reference, tmp_path, style):
    """ComfyUI's flux2_dev_fp8mixed-like files: block matrices in fp8 at their own scales, the rest as it was; the
    model loads with fp8 storage and computes what diffusers computes on the dequantized weights."""
    bfl = {keys.COMFY_PREFIX + k: v for k, v in keys.ours_to_bfl(reference.state_dict()).items()}
    tensors, metadata, dequantized = comfy_fp8.comfy_fp8(bfl, _in_blocks, style)
    save_file(tensors, tmp_path / "flux2_fp8mixed.safetensors", metadata=metadata)
    dit, params = flux2.load_dit(tmp_path / "flux2_fp8mixed.safetensors", config=AXES, dtype=torch.float32)

    qkv = params["transformer_blocks"][1]["attn"]
    layer = keys.COMFY_PREFIX + "double_blocks.1.img_attn.qkv"
    scale = tensors.get(f"{layer}.weight_scale", tensors.get(f"{layer}.scale_weight")).reshape(())
    assert all(qkv[name]["weight"].data.dtype == torch.float8_e4m3fn for name in ("to_q", "to_k", "to_v"))
    assert all(torch.equal(qkv[name]["weight"].stages["decode"].scale, scale) for name in ("to_q", "to_k", "to_v"))
    assert params["x_embedder"]["weight"].dtype == torch.float32  # not quantized in the file: a plain tensor
    stored = {t.dtype for t in dsf.tree.tensors(params["single_transformer_blocks"]) if t.ndim == 2}
    assert stored == {torch.float8_e4m3fn}

    expected = Flux2Transformer2DModel(**TINY, guidance_embeds=reference.config.guidance_embeds).eval()
    plain = {k.removeprefix(keys.COMFY_PREFIX): v for k, v in dequantized.items()}
    expected.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(plain))
    _assert_parity(dit, params, expected, references=1)
    stored_in_fp8 = dsf.transforms.fp8(where="blocks/", compute_dtype=torch.float32).init(params)  # keeps the file's
    assert stored_in_fp8["transformer_blocks"][1]["attn"]["to_q"]["weight"].data is qkv["to_q"]["weight"].data
    _assert_parity(dit, stored_in_fp8, expected, references=1)


def test_a_comfyui_file_in_a_format_dsf_does_not_read_is_named(reference, tmp_path):
    bfl = keys.ours_to_bfl(reference.state_dict())
    tensors, _, _ = comfy_fp8.comfy_fp8(bfl, _in_blocks, "layer")
    tensors["double_blocks.0.img_mlp.0.comfy_quant"] = comfy_quant_tensor({"format": "nvfp4"})
    with pytest.raises(ValueError, match=r"layer 'double_blocks.0.img_mlp.0' is quantized as 'nvfp4', which dsf does "
                                         r"not read .*load the model's bf16 or fp8 checkpoint instead"):
        flux2.load_dit(tensors, config=AXES)
