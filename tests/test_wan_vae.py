"""Wan 2.1 / 2.2 VAE: parity with diffusers' AutoencoderKLWan in both layouts, full-size names and shapes,
a cache that does not grow with the video, tiling, sampling, errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.model_parts import wan_vae as vae_module
from dsf.model_parts.wan_vae import (
    WAN21_VAE_CONFIG,
    WAN22_VAE_CONFIG,
    WanVAE,
    WanVAEConfig,
    init_vae,
    vae_param_shapes,
    vae_params_meta,
)
from dsf.model_parts.wan_vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from dsf.model_parts.wan_vae_keys import VAE, load_vae, original_vae_to_ours, ours_to_original_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

PARITY_TOLERANCE = 1e-4
TINY21 = dict(  # four levels of distinct widths, the real temporal pattern, two residual blocks a level
    base_dim=8, z_dim=4, dim_mult=[1, 2, 3, 3], num_res_blocks=2, temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.1, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
)
TINY22 = dict(  # Wan 2.2's shape: residual levels, 2×2 patches, 48 latent channels, a wider decoder
    base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
)
WAN22_DIFFUSERS = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD), scale_factor_spatial=16,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a shared CPU, waiting threads would dominate every op (a 4× slower file with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), the output conv small enough that few pixels hit the clamp."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
        model.decoder.conv_out.weight.mul_(0.3)


def _reference(tiny: dict, seed: int = 0) -> AutoencoderKLWan:
    model = AutoencoderKLWan(**tiny).eval()
    _randomize(model, seed)
    return model


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def _video(batch: int, frames: int, size: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _parity_errors(model: AutoencoderKLWan, vae: WanVAE, vparams: dict, video: torch.Tensor) -> tuple[float, float]:
    """Relative errors of our normalized posterior mean and decoded video against diffusers'."""
    mean = torch.tensor(model.config.latents_mean)[:, None, None, None]
    std = torch.tensor(model.config.latents_std)[:, None, None, None]
    with torch.no_grad():
        expected_latents = (model.encode(video).latent_dist.mean - mean) / std
        latents = vae.encode(vparams, video)
        expected_video = model.decode(latents * std + mean).sample
        decoded = vae.decode(vparams, latents)
    assert latents.shape == expected_latents.shape and decoded.shape == video.shape
    assert float((expected_video.abs() == 1).float().mean()) < 0.1  # the comparison is not mostly clamped pixels
    return _relative_error(latents, expected_latents), _relative_error(decoded, expected_video)


@pytest.fixture(scope="module")
def reference21():
    return _reference(TINY21)


@pytest.fixture(scope="module")
def reference22():
    return _reference(TINY22, seed=1)


def _original_safetensors(model: AutoencoderKLWan, path, prefix: str = ""):
    original = ours_to_original_vae(model.state_dict())
    assert VAE.detect_layout(original) == "original"
    save_file({prefix + k: v.contiguous() for k, v in original.items()}, path)
    return path


@pytest.mark.parametrize("layout", ["diffusers", "original", "diffsynth"])
def test_wan21_matches_diffusers_over_three_latent_frames(reference21, tmp_path, layout):
    """T = 9 frames: the first alone, then two chunks of 4, so caches carry across chunks on both sides."""
    source = {
        "diffusers": lambda: reference21.state_dict(),
        "original": lambda: _original_safetensors(reference21, tmp_path / "Wan2.1_VAE.safetensors"),
        "diffsynth": lambda: _original_safetensors(reference21, tmp_path / "vae.safetensors", prefix="model."),
    }[layout]()
    vae, vparams = load_vae(source, config={k: TINY21[k] for k in ("latents_mean", "latents_std")})
    assert vae.config == WanVAEConfig(**TINY21)
    video = _video(batch=2, frames=9, size=16)
    latent_error, video_error = _parity_errors(reference21, vae, vparams, video)
    assert vae.encode(vparams, video).shape == (2, 4, 3, 2, 2)
    assert latent_error <= PARITY_TOLERANCE and video_error <= PARITY_TOLERANCE  # measured 9e-8 and 6e-7


@pytest.mark.parametrize("layout", ["diffusers folder", "original"])
def test_wan22_matches_diffusers(reference22, tmp_path, layout):
    if layout == "original":
        vae, vparams = load_vae(_original_safetensors(reference22, tmp_path / "Wan2.2_VAE.safetensors"),
                                config={k: TINY22[k] for k in ("decoder_base_dim", "latents_mean", "latents_std")})
    else:
        reference22.save_pretrained(tmp_path / "vae")
        vae, vparams = load_vae(tmp_path)
    assert vae.config == WanVAEConfig(**TINY22)
    video = _video(batch=1, frames=9, size=32)
    latent_error, video_error = _parity_errors(reference22, vae, vparams, video)
    assert vae.encode(vparams, video).shape == (1, 48, 3, 2, 2)
    assert latent_error <= PARITY_TOLERANCE and video_error <= PARITY_TOLERANCE  # measured 3e-7 and 7e-7


def test_config_json_is_read_and_config_wins(reference21, tmp_path):
    reference21.save_pretrained(tmp_path)
    vae, _ = load_vae(tmp_path)
    assert vae.config == WanVAEConfig(**TINY21)
    assert load_vae(tmp_path, config={"latents_std": [1.0] * 4})[0].config.latents_std == (1.0,) * 4


def test_full_size_shapes_match_diffusers_and_its_original_converter():
    for ours, theirs in ((WAN21_VAE_CONFIG, {}), (WAN22_VAE_CONFIG, WAN22_DIFFUSERS)):
        with torch.device("meta"):
            model = AutoencoderKLWan(**theirs)
        assert vae_param_shapes(ours) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    original = ours_to_original_vae(vae_params_meta(WAN21_VAE_CONFIG))
    converted = convert_wan_vae_to_diffusers(original)
    assert {k: tuple(v.shape) for k, v in converted.items()} == vae_param_shapes(WAN21_VAE_CONFIG)
    assert original_vae_to_ours(original).keys() == converted.keys()


def test_full_size_wan22_original_names():
    original = ours_to_original_vae(vae_params_meta(WAN22_VAE_CONFIG))
    known = {  # Wan2.2_VAE.pth names, as read by diffusers' convert_vae_22
        "encoder.conv1.weight": (160, 12, 3, 3, 3),
        "encoder.downsamples.0.downsamples.2.resample.1.weight": (160, 160, 3, 3),
        "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1),
        "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1920, 640, 1, 1),
        "encoder.head.2.weight": (96, 640, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1),
        "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
        "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),
        "decoder.head.2.weight": (12, 256, 3, 3, 3),
    }
    assert {k: tuple(original[k].shape) for k in known} == known
    assert not any("upsamples.3.upsamples.3" in k or "downsamples.3.downsamples.2" in k for k in original)


def _recording_caches(monkeypatch, name: str, run, *args):
    """``(run(*args), log)``, with ``vae_module.<name>`` (encoder_step / decoder_step) patched to log, after each step, the
    bytes held by the cache it returns and its largest frame count. Bytes are the storages' sizes, so a small view
    of a big tensor would show."""
    log, original = [], getattr(vae_module, name)

    def recording(params, x, cache):
        out, new_cache = original(params, x, cache)
        tensors = dsf.tree.tensors(new_cache)
        log.append((sum(t.untyped_storage().nbytes() for t in tensors), max(t.shape[2] for t in tensors)))
        return out, new_cache

    monkeypatch.setattr(vae_module, name, recording)
    result = run(*args)
    monkeypatch.undo()
    return result, log


def test_cache_holds_a_bounded_number_of_frames(monkeypatch):
    cfg = WanVAEConfig(**{**TINY21, "num_res_blocks": 1})
    vae, vparams = WanVAE(cfg), init_vae(cfg, dsf.random.key(0))
    logs = {}
    for frames in (5, 17):
        video = _video(1, frames, 16)
        latents, encode_log = _recording_caches(monkeypatch, "encoder_step", vae.encode, vparams, video)
        decoded, decode_log = _recording_caches(monkeypatch, "decoder_step", vae.decode, vparams, latents)
        assert decoded.shape == video.shape and len(encode_log) == len(decode_log) == 1 + (frames - 1) // 4
        assert all(most_frames <= 2 for _, most_frames in encode_log + decode_log)
        logs[frames] = [nbytes for nbytes, _ in encode_log], [nbytes for nbytes, _ in decode_log]
    (short_encode, short_decode), (long_encode, long_decode) = logs[5], logs[17]
    assert set(long_encode) == set(short_encode) and len(set(long_encode)) == 1  # measured 63,104 bytes after every step
    assert set(long_decode) == set(short_decode) and len(set(long_decode)) == 1  # measured 133,504 bytes


def _smooth_video(frames: int, size: int) -> torch.Tensor:
    t = torch.linspace(0, 1, frames)[:, None, None]
    y, x = torch.linspace(0, 1, size)[None, :, None], torch.linspace(0, 1, size)[None, None, :]
    channels = [torch.sin(math.pi * (x + 0.5 * y + t)), torch.cos(math.pi * (x * y + y - t)), (x - y) * (1 - t)]
    return 0.5 * torch.stack(channels)[None]


def _record_tile_sizes(monkeypatch, name: str) -> list:
    """Patch ``vae_module.<name>`` (run_encoder / run_decoder) to log the (H, W) of each input it is called on."""
    sizes, original = [], getattr(vae_module, name)

    def recording(params, x, **kwargs):
        sizes.append(tuple(x.shape[-2:]))
        return original(params, x, **kwargs)

    monkeypatch.setattr(vae_module, name, recording)
    return sizes


def _relative_rms(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def tiling_vae():
    """A ×2 VAE with the attention output projections zero, as Wan initializes them: every output then depends on
    the inputs within 17 pixels only, so where a single tile covers a position far from the tile's edges the tiled
    result must equal the whole one exactly. (A trained VAE's per-frame attention makes tiling approximate everywhere.)"""
    cfg = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 1), num_res_blocks=1, temperal_downsample=(True,),
                       latents_mean=(0,) * 4, latents_std=(1,) * 4)
    flat = dsf.tree.flatten_dict(init_vae(cfg, dsf.random.key(2)))
    flat = {k: torch.zeros_like(v) if k.endswith("attentions.0.proj.weight") else v for k, v in flat.items()}
    return WanVAE(cfg), dsf.tree.unflatten_dict(flat)


def test_tiled_encode_is_close_to_untiled(monkeypatch, tiling_vae):
    vae, vparams = tiling_vae
    video = _smooth_video(5, 64)
    whole = vae.encode(vparams, video)
    seams = vae.encode(vparams, video, tiled=True, tile_size=32, tile_overlap=0)
    calls = _record_tile_sizes(monkeypatch, "run_encoder")
    tiled = vae.encode(vparams, video, tiled=True, tile_size=48, tile_overlap=32)
    assert calls == [(48, 48)] * 4 and tiled.shape == whole.shape == (1, 4, 3, 32, 32)
    assert torch.allclose(tiled[..., :8, :8], whole[..., :8, :8], atol=1e-5)  # only the first tile reaches there
    assert _relative_rms(tiled, whole) < 0.1  # measured 0.070 (largest error 0.19 of the largest latent)
    assert _relative_rms(tiled, whole) < 0.25 * _relative_rms(seams, whole)  # measured 0.51 without overlap


def test_tiled_decode_is_close_to_untiled(monkeypatch, tiling_vae):
    vae, vparams = tiling_vae
    latents = vae.encode(vparams, _smooth_video(5, 64))
    whole = vae.decode(vparams, latents)
    seams = vae.decode(vparams, latents, tiled=True, tile_size=16, tile_overlap=0)
    calls = _record_tile_sizes(monkeypatch, "run_decoder")
    tiled = vae.decode(vparams, latents, tiled=True, tile_size=24, tile_overlap=16)
    assert calls == [(24, 24)] * 4 and tiled.shape == whole.shape == (1, 3, 5, 64, 64)
    assert torch.allclose(tiled[..., :16, :16], whole[..., :16, :16], atol=1e-5)
    assert _relative_rms(tiled, whole) < 0.08  # measured 0.055 (largest error 0.47 of the largest pixel)
    assert _relative_rms(tiled, whole) < 0.25 * _relative_rms(seams, whole)  # measured 0.42 without overlap


def test_sampled_encoding_is_mean_plus_std_times_keyed_noise(reference21):
    vae, vparams = load_vae(reference21.state_dict(), config=TINY21)
    video, key = _video(1, 5, 16), dsf.random.key(5)
    sample = vae.encode(vparams, video, key)
    assert torch.equal(sample, vae.encode(vparams, video, key))
    assert not torch.allclose(sample, vae.encode(vparams, video, dsf.random.key(6)))
    mean, logvar = vae_module.run_encoder(vparams, video, config=vae.config).chunk(2, dim=1)
    expected = mean + torch.exp(0.5 * logvar) * dsf.random.normal(key, mean.shape)
    stats = [torch.tensor(TINY21[k])[:, None, None, None] for k in ("latents_mean", "latents_std")]
    assert torch.allclose(sample, (expected - stats[0]) / stats[1], atol=1e-6)
    assert not torch.allclose(sample, vae.encode(vparams, video), atol=1e-3)


@pytest.fixture(scope="module")
def tiny_vae():
    cfg = WanVAEConfig(**TINY21)
    return WanVAE(cfg), init_vae(cfg, dsf.random.key(0))


@pytest.mark.parametrize(
    "video, message",
    [
        (torch.zeros(1, 3, 10, 16, 16), r"10 frames; this VAE encodes 1 \+ 4k frames.*trim to 9 or pad to 13 frames"),
        (torch.zeros(1, 3, 9, 20, 16), r"height 20 and width 16.*multiples of 8.*e\.g\. 16×16"),
        (torch.zeros(1, 4, 9, 16, 16), r"shape \(1, 4, 9, 16, 16\).*\(B, 3, T, H, W\)"),
        (torch.zeros(1, 3, 16, 16), r"shape \(1, 3, 16, 16\).*give an image as one frame \(image\[:, :, None\]\)"),
    ],
)
def test_bad_videos_are_named(tiny_vae, video, message):
    vae, vparams = tiny_vae
    with pytest.raises(ValueError, match=message):
        vae.encode(vparams, video)


def test_wan22_needs_multiples_of_16():
    vae = WanVAE(WanVAEConfig(**TINY22))
    with pytest.raises(ValueError, match=r"height 24 and width 32.*multiples of 16.*e\.g\. 16×32"):
        vae.encode({}, torch.zeros(1, 3, 1, 24, 32))


def test_bad_latents_and_tiles_are_named(tiny_vae):
    vae, vparams = tiny_vae
    with pytest.raises(ValueError, match=r"shape \(1, 16, 3, 2, 2\).*\(B, 4, T, H, W\).*Wan 2\.1: 16 channels, Wan 2\.2: 48"):
        vae.decode(vparams, torch.zeros(1, 16, 3, 2, 2))
    with pytest.raises(ValueError, match=r"tile_size 36 pixels is not a multiple of 8.*e\.g\. 32 or 40"):
        vae.encode(vparams, torch.zeros(1, 3, 1, 64, 64), tiled=True, tile_size=36, tile_overlap=8)
    with pytest.raises(ValueError, match=r"tile_overlap 4 must be in \[0, tile_size\) = \[0, 4\) latent pixels"):
        vae.decode(vparams, torch.zeros(1, 4, 1, 8, 8), tiled=True, tile_size=4, tile_overlap=4)


def test_unknown_layout_lists_missing_and_unexpected_keys():
    listed = r"unknown layout.*missing keys, e\.g\. \['encoder\.conv_in\.weight'.*1 unexpected keys, e\.g\. \['foo\.weight'\]"
    with pytest.raises(ValueError, match=listed):
        load_vae({"foo.weight": torch.zeros(1)})


def test_wrong_config_is_named(reference21):
    state = reference21.state_dict()
    with pytest.raises(ValueError, match=r"latents_mean has 16 values but z_dim is 4.*config=\{'latents_mean'"):
        load_vae(state)
    with pytest.raises(ValueError, match=r"shape mismatches.*decoder\.conv_in\.weight: \(24, 4, 3, 3, 3\) != \(24, 8, 3, 3, 3\)"):
        load_vae(state, config={**TINY21, "z_dim": 8, "latents_mean": [0] * 8, "latents_std": [1] * 8})
    with pytest.raises(ValueError, match=r"unknown AutoencoderKLWan config keys \['num_groups'\]"):
        load_vae(state, config={"num_groups": 8})
    with pytest.raises(ValueError, match=r"attn_scales=\[0\.5\] is not supported.*must be \[\]"):
        load_vae(state, config={**TINY21, "attn_scales": [0.5]})
    with pytest.raises(ValueError, match=r"temperal_downsample \(True,\) needs one flag per downsampling level.*3"):
        WanVAEConfig(temperal_downsample=(True,))
