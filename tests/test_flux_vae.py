"""FLUX.1 VAE: parity with diffusers' AutoencoderKL, checkpoint layouts, full-size shapes, tiling, sampling, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dsf
from dsf.model_parts import flux_vae as vae_module
from dsf.model_parts.flux_vae import FluxVAEConfig, init_vae, tiled_apply, vae_param_shapes, vae_params_meta
from dsf.model_parts.flux_vae_keys import VAE, ldm_to_ours, load_vae, ours_to_ldm

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SCALE, SHIFT = 0.3611, 0.1159
TINY = dict(  # three levels of distinct widths, so a reversed or misplaced level shows as a shape or value error
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
)
OUR_TINY = {k: v for k, v in TINY.items() if not k.endswith("block_types")}
FLUX_CONFIG = dict(
    TINY, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
PARITY_TOLERANCE = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), so a swapped or misplaced tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _reference(seed: int = 0, **overrides) -> AutoencoderKL:
    model = AutoencoderKL(**{**TINY, **overrides}).eval()
    _randomize(model, seed)
    return model


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _assert_matches_diffusers(model: AutoencoderKL, vae, vparams) -> None:
    images = _images()
    shift = model.config.shift_factor or 0.0
    with torch.no_grad():
        expected_latents = (model.encode(images).latent_dist.mean - shift) * model.config.scaling_factor
        latents = vae.encode(vparams, images)
        expected_images = model.decode(latents / model.config.scaling_factor + shift).sample
        decoded = vae.decode(vparams, latents)
    assert latents.shape == (2, 16, 4, 4)
    assert _relative_error(latents, expected_latents) <= PARITY_TOLERANCE
    assert _relative_error(decoded, expected_images) <= PARITY_TOLERANCE


@pytest.fixture(scope="module")
def reference():
    return _reference()


def test_diffusers_layout_matches_diffusers(reference):
    vae, vparams = load_vae(reference.state_dict(), config={"norm_num_groups": 8})
    assert vae.config == FluxVAEConfig(**OUR_TINY)
    _assert_matches_diffusers(reference, vae, vparams)


def test_ldm_file_matches_diffusers(reference, tmp_path):
    ldm = ours_to_ldm(reference.state_dict())
    assert VAE.detect_layout(ldm) == "ldm"
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "ae.safetensors")
    vae, vparams = load_vae(tmp_path / "ae.safetensors", config={"norm_num_groups": 8})
    _assert_matches_diffusers(reference, vae, vparams)


def test_prefixed_ldm_keys_load_and_others_are_dropped(reference):
    ldm = {f"first_stage_model.{k}": v for k, v in ours_to_ldm(reference.state_dict()).items()}
    vae, vparams = load_vae({**ldm, "model.diffusion_model.x.weight": torch.zeros(1)}, config={"norm_num_groups": 8})
    _assert_matches_diffusers(reference, vae, vparams)


def test_pipeline_folder_reads_vae_config_json_and_config_wins(tmp_path):
    """An SD-style VAE (quant convs, no mid attention, shift null) saved by diffusers: config.json supplies the groups."""
    model = _reference(seed=1, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
                       shift_factor=None, scaling_factor=0.5)
    model.save_pretrained(tmp_path / "vae")
    vae, vparams = load_vae(tmp_path)
    assert (vae.config.norm_num_groups, vae.config.shift_factor, vae.config.use_quant_conv) == (8, 0.0, True)
    assert not vae.config.mid_block_add_attention
    _assert_matches_diffusers(model, vae, vparams)
    assert load_vae(tmp_path, config={"scaling_factor": 0.25})[0].config.scaling_factor == 0.25


def test_ldm_writer_agrees_with_diffusers_converter(reference):
    ours = reference.state_dict()
    converted = convert_ldm_vae_checkpoint(ours_to_ldm(ours), TINY)
    assert sorted(converted) == sorted(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    assert sorted(ldm_to_ours(ours_to_ldm(ours))) == sorted(ours)


def test_full_size_ldm_names_are_bfl_ae_names():
    ldm = ours_to_ldm(vae_params_meta(FluxVAEConfig()))
    known = {  # keys and shapes of BFL's ae.safetensors
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.mid.block_2.norm2.bias": (512,),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    }
    assert {k: tuple(ldm[k].shape) for k in known} == known
    assert not any("up.0.upsample" in k or "down.3.downsample" in k for k in ldm)


def test_full_size_params_on_meta_match_diffusers():
    with torch.device("meta"):
        model = AutoencoderKL(**FLUX_CONFIG)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert vae_param_shapes(FluxVAEConfig()) == expected
    assert dsf.tree.num_params(vae_params_meta(FluxVAEConfig())) == sum(p.numel() for p in model.parameters())


def test_tiled_apply_places_rescaled_tiles_exactly():
    x = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    pool, upsample = (lambda t: F.avg_pool2d(t, 4)), (lambda t: F.interpolate(t, scale_factor=4.0))
    assert torch.allclose(tiled_apply(pool, x, tile_size=16, tile_overlap=8), pool(x), atol=1e-6)
    assert torch.allclose(tiled_apply(upsample, x, tile_size=12, tile_overlap=4), upsample(x), atol=1e-6)


def _smooth_image(size: int) -> torch.Tensor:
    y, x = torch.linspace(0, 1, size)[:, None], torch.linspace(0, 1, size)[None, :]
    return 0.5 * torch.stack([torch.sin(math.pi * (x + 0.5 * y)), torch.cos(math.pi * (x * y + y)), x - y])[None]


def _trained_like_vae():
    """A tiny VAE with N(0, 1) biases: as in a trained VAE, GroupNorm statistics then come mostly from per-channel
    offsets, not from the content of one tile (with zero biases every tile renormalizes to its own content)."""
    cfg = FluxVAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    gen = torch.Generator().manual_seed(0)
    flat = dsf.tree.flatten_dict(init_vae(cfg, dsf.random.key(0)))
    flat = {k: v + torch.randn(v.shape, generator=gen) if k.endswith("bias") else v for k, v in flat.items()}
    return vae_module.FluxVAE(cfg), dsf.tree.unflatten_dict(flat)


def _record_tile_sizes(monkeypatch, name: str) -> list:
    """Patch ``vae_module.<name>`` (run_encoder / run_decoder) to log the (H, W) of each input it is called on."""
    sizes, original = [], getattr(vae_module, name)

    def recording(params, x, **kwargs):
        sizes.append(tuple(x.shape[-2:]))
        return original(params, x, **kwargs)

    monkeypatch.setattr(vae_module, name, recording)
    return sizes


def test_tiled_encode_is_close_to_untiled(monkeypatch):
    vae, vparams = _trained_like_vae()
    image = _smooth_image(64)
    whole = vae.encode(vparams, image)
    seams = vae.encode(vparams, image, tiled=True, tile_size=32, tile_overlap=0)
    calls = _record_tile_sizes(monkeypatch, "run_encoder")
    tiled = vae.encode(vparams, image, tiled=True, tile_size=32, tile_overlap=16)
    assert calls == [(32, 32)] * 9
    assert _relative_error(tiled, whole) < 0.15  # measured 0.105 (RMS 0.041)
    assert _relative_error(tiled, whole) < 0.5 * _relative_error(seams, whole)  # measured 0.61 without overlap


def test_tiled_decode_is_close_to_untiled(monkeypatch):
    vae, vparams = _trained_like_vae()
    latents = vae.encode(vparams, _smooth_image(64))
    whole = vae.decode(vparams, latents)
    seams = vae.decode(vparams, latents, tiled=True, tile_size=16, tile_overlap=0)
    calls = _record_tile_sizes(monkeypatch, "run_decoder")
    tiled = vae.decode(vparams, latents, tiled=True, tile_size=16, tile_overlap=8)
    assert calls == [(16, 16)] * 9
    assert _relative_error(tiled, whole) < 0.08  # measured 0.046 (RMS 0.014)
    assert _relative_error(tiled, whole) < 0.5 * _relative_error(seams, whole)  # measured 0.60 without overlap


def test_sampled_encoding_is_mean_plus_std_times_keyed_noise(reference):
    vae, vparams = load_vae(reference.state_dict(), config={"norm_num_groups": 8})
    images, key = _images(), dsf.random.key(5)
    sample = vae.encode(vparams, images, key)
    assert torch.equal(sample, vae.encode(vparams, images, key))
    assert not torch.allclose(sample, vae.encode(vparams, images, dsf.random.key(6)))
    mean, logvar = vae_module.run_encoder(vparams, images, config=vae.config).chunk(2, dim=1)
    expected = mean + torch.exp(0.5 * logvar) * dsf.random.normal(key, mean.shape)
    assert torch.allclose(sample, (expected - SHIFT) * SCALE, atol=1e-6)
    assert not torch.allclose(sample, vae.encode(vparams, images), atol=1e-3)


@pytest.fixture(scope="module")
def tiny_vae():
    cfg = FluxVAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    return vae_module.FluxVAE(cfg), init_vae(cfg, dsf.random.key(0))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(1, 4, 16, 16), r"shape \(1, 4, 16, 16\).*\(B, 3, H, W\).*images\[:, :3\]"),
        (torch.zeros(3, 16, 16), r"shape \(3, 16, 16\).*add a batch axis"),
        (torch.zeros(1, 3, 20, 16), r"height 20 and width 16.*multiples of 8.*e\.g\. 16×16"),
    ],
)
def test_bad_images_are_named(tiny_vae, images, message):
    vae, vparams = tiny_vae
    with pytest.raises(ValueError, match=message):
        vae.encode(vparams, images)


def test_bad_latents_and_tiles_are_named(tiny_vae):
    vae, vparams = tiny_vae
    with pytest.raises(ValueError, match=r"shape \(1, 64, 2, 2\).*\(B, 16, H, W\)"):
        vae.decode(vparams, torch.zeros(1, 64, 2, 2))
    with pytest.raises(ValueError, match=r"tile_size 36 pixels is not a multiple of 8.*e\.g\. 32 or 40"):
        vae.encode(vparams, torch.zeros(1, 3, 64, 64), tiled=True, tile_size=36, tile_overlap=8)
    with pytest.raises(ValueError, match=r"tile_overlap 8 must be in \[0, tile_size\) = \[0, 8\) latent pixels"):
        vae.decode(vparams, torch.zeros(1, 16, 8, 8), tiled=True, tile_size=8, tile_overlap=8)


def test_unknown_layout_lists_missing_and_unexpected_keys():
    listed = r"unknown layout.*missing keys, e\.g\. \['encoder\.conv_in\.weight'.*1 unexpected keys, e\.g\. \['foo\.weight'\]"
    with pytest.raises(ValueError, match=listed):
        load_vae({"foo.weight": torch.zeros(1)})


def test_wrong_shapes_and_config_keys_are_named(reference):
    state = reference.state_dict()
    with pytest.raises(ValueError, match=r"block_out_channels \(16, 32, 32\).*norm_num_groups 32.*config=\{'norm_num_groups'"):
        load_vae(state)
    with pytest.raises(ValueError, match=r"shape mismatches.*encoder\.conv_out\.weight: \(32, 32, 3, 3\) != \(16, 32, 3, 3\)"):
        load_vae(state, config={"norm_num_groups": 8, "latent_channels": 8})
    with pytest.raises(ValueError, match=r"unknown AutoencoderKL config keys \['num_groups'\]"):
        load_vae(state, config={"num_groups": 8})
    with pytest.raises(ValueError, match=r"act_fn='gelu' is not supported.*'silu'"):
        load_vae(state, config={"norm_num_groups": 8, "act_fn": "gelu"})
