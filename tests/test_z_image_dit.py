"""Z-Image DiT: parity with diffusers' ZImageTransformer2DModel in every layout, batched captions of different lengths,
full-size shapes, config reading, input errors."""

from __future__ import annotations

import copy
import json

import chex
import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models import z_image
from dsf.models.z_image import keys

diffusers = pytest.importorskip("diffusers")
from diffusers import ZImageTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402
from tiny_flux import randomize  # noqa: E402

from comfy_fp8 import comfy_fp8  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12])
AXES = {"axes_dims": [8, 12, 12]}  # what the shapes cannot tell
TEXT_LEN = 40


@pytest.fixture(scope="module")
def reference():
    model = ZImageTransformer2DModel(**TINY).eval()
    randomize(model, seed=0)
    return model


def _inputs(height=6, width=8, lengths=(TEXT_LEN, 7)):
    """Two samples: captions of different padded lengths (64 and 32 tokens), zero-padded after the valid tokens."""
    gen = torch.Generator().manual_seed(7)
    text = torch.randn(len(lengths), TEXT_LEN, TINY["cap_feat_dim"], generator=gen)
    mask = torch.arange(TEXT_LEN) < torch.tensor(lengths)[:, None]
    return dict(
        latents=torch.randn(len(lengths), 16, height, width, generator=gen),
        timestep=torch.tensor([0.3, 0.9])[: len(lengths)],
        text_embeds=text * mask[..., None],
        text_mask=mask,
    )


def _diffusers_velocity(model, latents, timestep, text_embeds, text_mask):
    """diffusers' pipeline around the reference: per-sample lists, padding removed, fed 1 − σ, output negated."""
    captions = [embeds[valid] for embeds, valid in zip(text_embeds, text_mask)]
    with torch.no_grad():
        out = model(list(latents.unsqueeze(2).unbind(0)), 1 - timestep, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(dit, params, reference, **shape):
    inputs = _inputs(**shape)
    ref = _diffusers_velocity(reference, **inputs)
    with torch.no_grad():
        ours = dit(params, **inputs)
    assert ours.shape == inputs["latents"].shape
    error = _relative_error(ours, ref)
    assert error <= 1e-4, error
    return error


def test_parity_from_diffusers_folder_with_extra_config_keys(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    config = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert "siglip_feat_dim" in config and config["siglip_feat_dim"] is None  # current diffusers writes it
    dit, params = z_image.load_dit(tmp_path / "pipe")
    assert dit.config.axes_dims == (8, 12, 12)  # only config.json knows it
    _assert_parity(dit, params, reference)


@pytest.mark.parametrize("height, width, lengths", [(6, 8, (TEXT_LEN, 7)), (16, 16, (32, 32)), (4, 4, (5, 33))],
                         ids=["padded-image", "no-padding", "short-and-long"])
def test_parity_batched_captions(reference, height, width, lengths):
    dit, params = z_image.load_dit(dict(reference.state_dict()), config=AXES)
    _assert_parity(dit, params, reference, height=height, width=width, lengths=lengths)


@pytest.mark.parametrize("prefix", ["", keys.COMFY_PREFIX], ids=["original", "comfyui"])
def test_parity_from_lumina2_single_file(reference, tmp_path, prefix):
    lumina = keys.ours_to_lumina2(reference.state_dict())
    save_file({prefix + k: v.contiguous() for k, v in lumina.items()}, tmp_path / "z_image.safetensors")
    dit, params = z_image.load_dit(tmp_path / "z_image.safetensors", config=AXES)
    assert keys.DIT.detect_layout(lumina) == "lumina2"
    _assert_parity(dit, params, reference)


def test_parity_from_a_comfyui_fp8_scaled_lumina2_file(reference, tmp_path):
    """A Lumina2-layout file with the layers' matrices in fp8 at their own scales (the fused attention.qkv's scale
    given to each of q, k and v)."""
    lumina = {keys.COMFY_PREFIX + k: v.contiguous() for k, v in keys.ours_to_lumina2(reference.state_dict()).items()}
    tensors, metadata, dequantized = comfy_fp8(lumina, lambda key, t: t.ndim == 2 and ".layers." in key, "header")
    save_file(tensors, tmp_path / "z_image_fp8_scaled.safetensors", metadata=metadata)
    dit, params = z_image.load_dit(tmp_path / "z_image_fp8_scaled.safetensors", config=AXES, dtype=torch.float32)
    attention = params["layers"][1]["attention"]
    assert {attention[p]["weight"].data.dtype for p in ("to_q", "to_k", "to_v")} == {torch.float8_e4m3fn}
    expected = copy.deepcopy(reference)
    expected.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(dict(dequantized)))
    _assert_parity(dit, params, expected)


@pytest.mark.parametrize("prefix", ["", keys.COMFY_PREFIX], ids=["plain", "comfyui"])
def test_parity_from_diffusers_single_file(reference, tmp_path, prefix):
    save_file({prefix + k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "z.safetensors")
    dit, params = z_image.load_dit(tmp_path / "z.safetensors", config=AXES)
    _assert_parity(dit, params, reference)


def test_diffusers_converter_reads_our_lumina2_layout(reference):
    """diffusers' own single-file converter turns our Lumina2 output back into its state dict, tensor for tensor."""
    ours = dict(reference.state_dict())
    lumina = {keys.COMFY_PREFIX + k: v for k, v in keys.ours_to_lumina2(ours).items()}
    lumina["model.diffusion_model.final_layer.norm_final.weight"] = torch.ones(TINY["dim"])  # an unused scale some files hold
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(lumina))
    converted.pop("all_final_layer.2-1.norm_final.weight", None)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    back, layout = keys.DIT.to_ours(lumina)
    assert layout == f"lumina2 (prefix {keys.COMFY_PREFIX!r})"
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_layout_detection_is_by_prefix(reference):
    """``all_final_layer.2-1.`` contains ``final_layer.``: a substring test would call diffusers' names Lumina2."""
    assert keys.DIT.detect_layout(reference.state_dict()) == "diffusers"
    assert keys.DIT.detect_layout(["all_final_layer.2-1.linear.weight"]) == "diffusers"
    assert keys.DIT.detect_layout(["final_layer.linear.weight"]) == "lumina2"
    assert keys.DIT.detect_layout(["layers.3.attention.qkv.weight"]) == "lumina2"


def test_parity_detects_a_wrong_pad_token(reference):
    """The pad tokens are attended to: changing the caption pad token changes the output (zero padding is another model)."""
    dit, params = z_image.load_dit(dict(reference.state_dict()), config=AXES)
    params["cap_pad_token"] = params["cap_pad_token"] + 0.05
    with pytest.raises(AssertionError):
        _assert_parity(dit, params, reference)


def test_padding_beyond_the_mask_does_not_matter(reference):
    dit, params = z_image.load_dit(dict(reference.state_dict()), config=AXES)
    inputs = _inputs()
    garbage = inputs | {"text_embeds": torch.where(inputs["text_mask"][..., None], inputs["text_embeds"], 5.0)}
    with torch.no_grad():
        assert torch.allclose(dit(params, **inputs), dit(params, **garbage), atol=1e-6)
        single = dit(params, **{k: v[1:] for k, v in inputs.items()})
        assert torch.allclose(dit(params, **inputs)[1:], single, atol=1e-5)  # a sample alone = in a batch


def test_unknown_keys_are_listed(reference):
    state = keys.ours_to_lumina2(reference.state_dict())
    state.pop("layers.1.attention.out.weight")
    state["mystery_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 missing keys.*layers\.1\.attention\.to_out\.0\.weight.*1 unexpected keys.*mystery"):
        z_image.load_dit(state, config=AXES)


def test_config_precedence(tmp_path):
    """defaults < shapes < config.json < config=; extra keys current diffusers writes load, network-changing ones fail."""
    ZImageTransformer2DModel(**TINY).save_pretrained(tmp_path)
    dit, _ = z_image.load_dit(tmp_path, config={"axes_dims": [12, 8, 12]})
    assert dit.config.axes_dims == (12, 8, 12)  # config= over config.json
    assert (dit.config.num_layers, dit.config.num_heads, dit.config.hidden_size) == (2, 2, 64)
    config = json.loads((tmp_path / "config.json").read_text()) | {"n_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys.*layers\.2\."):
        z_image.load_dit(tmp_path)  # config.json over shapes
    with pytest.raises(ValueError, match="unknown Z-Image config keys"):
        z_image.load_dit(tmp_path, config={"num_blocks": 2})
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_layers": 2, "siglip_feat_dim": 1152}))
    with pytest.raises(ValueError, match="siglip_feat_dim=1152 is not supported"):
        z_image.load_dit(tmp_path)


def test_full_size_meta_params_match_diffusers():
    with torch.device("meta"):
        reference = ZImageTransformer2DModel()
    params = z_image.dit_params_meta(z_image.ZImageConfig())
    assert dsf.tree.num_params(params) == sum(p.numel() for p in reference.parameters())
    chex.assert_trees_all_equal_shapes(dsf.tree.flatten_dict(params), dict(reference.state_dict()))
    assert dsf.tree.num_params(params) == 6_154_908_736
    lumina = keys.ours_to_lumina2(params)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(lumina)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    config = z_image.ZImageConfig(hidden_size=64, num_heads=2, num_layers=1, num_refiner_layers=1, cap_feat_dim=32,
                                  axes_dims=(8, 12, 12))
    return z_image.ZImageDiT(config), z_image.init_dit(config, dsf.random.key(0))


def test_dit_call_matches_apply(tiny):
    dit, params = tiny
    assert torch.equal(dit(params, **_inputs()), z_image.apply(params, **_inputs(), config=dit.config))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latents=torch.zeros(2, 4, 6, 8)), r"latents have shape \(2, 4, 6, 8\).*\(B, 16, H, W\)"),
        (dict(latents=torch.zeros(2, 16, 6, 5)), r"height 6 and width 5 must both be even"),
        (dict(latents=torch.zeros(1, 16, 2, 2050)), r"patch grid, beyond the RoPE table"),
        (dict(timestep=torch.zeros(3)), r"timestep has shape \(3,\).*shape \(2,\)"),
        (dict(text_embeds=torch.zeros(2, TEXT_LEN, 8)), r"text_embeds has shape \(2, 40, 8\).*\(2, L, 32\)"),
        (dict(text_mask=torch.ones(2, 3, dtype=torch.bool)), r"text_mask has shape \(2, 3\).*\(2, 40\)"),
        (dict(text_mask=torch.arange(TEXT_LEN).expand(2, -1) % 2 == 0), r"valid tokens must come first"),
        (dict(text_mask=torch.zeros(2, TEXT_LEN, dtype=torch.bool)), r"no valid token"),
        (dict(text_embeds=torch.zeros(2, 1000, 32), text_mask=None), r"beyond axes_lens\[0\] 1024"),
    ],
)
def test_bad_inputs_name_the_problem(tiny, change, message):
    dit, params = tiny
    inputs = _inputs() | change
    if inputs["latents"].shape[0] == 1:
        inputs = {k: v[:1] if v is not None else v for k, v in inputs.items()} | {"latents": change["latents"]}
    with pytest.raises(ValueError, match=message):
        dit(params, **inputs)


def test_blocks_run_through_run_blocks(tiny, monkeypatch):
    dit, params = tiny
    calls = []
    real = dsf.run_blocks

    def counting(block_fn, blocks, carry, *args, **kwargs):
        calls.append(len(blocks))
        return real(block_fn, blocks, carry, *args, **kwargs)

    monkeypatch.setattr(dsf, "run_blocks", counting)
    dit(params, **_inputs())
    assert calls == [1, 1, 1]
