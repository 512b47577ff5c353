"""FLUX.2 VAE: parity of the normalized patchified latents and of decoding with diffusers' AutoencoderKLFlux2 as
Flux2Pipeline runs it, both checkpoint layouts, the batch-norm statistics loading with the weights, config sources."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.models.flux2 import vae as flux2_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2, Flux2Pipeline  # noqa: E402
from tiny_flux import randomize  # noqa: E402

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
PATCH_CHANNELS = 16


@pytest.fixture(scope="module")
def reference():
    model = AutoencoderKLFlux2(**TINY).eval()
    randomize(model, seed=3)
    gen = torch.Generator().manual_seed(4)
    model.bn.running_mean.copy_(torch.randn(PATCH_CHANNELS, generator=gen))
    model.bn.running_var.copy_(0.5 + torch.rand(PATCH_CHANNELS, generator=gen))
    model.bn.num_batches_tracked.fill_(7)
    return model


def _images():
    return torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _diffusers_latents(model, images):
    pipe = SimpleNamespace(vae=model, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        return Flux2Pipeline._encode_vae_image(pipe, images, generator=None)


def _diffusers_images(model, latents):
    """Flux2Pipeline's decoding: undo the batch norm, unpatchify, decode."""
    mean = model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    with torch.no_grad():
        return model.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


def _relative_error(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _assert_parity(vae, vparams, reference):
    images = _images()
    with torch.no_grad():
        latents = vae.encode(vparams, images)
    ref_latents = _diffusers_latents(reference, images)
    assert latents.shape == ref_latents.shape
    assert _relative_error(latents, ref_latents) <= 1e-4
    with torch.no_grad():
        decoded = vae.decode(vparams, ref_latents)
    assert _relative_error(decoded, _diffusers_images(reference, ref_latents)) <= 1e-4


def test_parity_from_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "pipe" / "vae")
    vae, vparams = flux2_vae.load_vae(tmp_path / "pipe")
    assert vae.config.norm_num_groups == 4 and vae.config.batch_norm_eps == 1e-4  # from config.json
    assert torch.equal(vparams["bn"]["running_var"], reference.bn.running_var)
    _assert_parity(vae, vparams, reference)


def test_parity_from_bfl_file(reference, tmp_path):
    save_file(flux2_vae.ours_to_bfl(reference.state_dict()), tmp_path / "ae.safetensors")
    vae, vparams = flux2_vae.load_vae(tmp_path / "ae.safetensors", config={"norm_num_groups": 4})
    _assert_parity(vae, vparams, reference)


def test_parity_detects_wrong_statistics(reference):
    vae, vparams = flux2_vae.load_vae(dict(reference.state_dict()), config={"norm_num_groups": 4})
    vparams["bn"]["running_mean"] = vparams["bn"]["running_mean"] + 0.01
    with pytest.raises(AssertionError):
        _assert_parity(vae, vparams, reference)


def test_bfl_names_follow_the_original_layout(reference):
    bfl = flux2_vae.ours_to_bfl(reference.state_dict())
    sd = reference.state_dict()
    assert torch.equal(bfl["encoder.quant_conv.weight"], sd["quant_conv.weight"])
    assert torch.equal(bfl["decoder.post_quant_conv.bias"], sd["post_quant_conv.bias"])
    assert torch.equal(bfl["bn.running_mean"], sd["bn.running_mean"])
    assert torch.equal(bfl["decoder.up.0.block.0.conv1.weight"], sd["decoder.up_blocks.1.resnets.0.conv1.weight"])
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    back, layout = flux2_vae.VAE.to_ours(bfl)
    assert layout == "bfl"
    assert back.keys() == sd.keys() - {"bn.num_batches_tracked"}
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in back)


def test_patch_channels_are_4c_plus_2dy_plus_dx():
    z = torch.randn(1, 3, 4, 6)
    patched = flux2_vae.patchify(z)
    c, dy, dx, row, col = 2, 1, 0, 1, 2
    assert patched[0, 4 * c + 2 * dy + dx, row, col] == z[0, c, 2 * row + dy, 2 * col + dx]
    assert torch.equal(patched, Flux2Pipeline._patchify_latents(z))


def test_config_from_json_with_extra_keys_and_unsupported_values(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {"batch_norm_momentum", "patch_size", "sample_size"} <= written.keys()
    vae, _ = flux2_vae.load_vae(tmp_path, config={"batch_norm_eps": 1e-5})
    assert vae.config.batch_norm_eps == 1e-5 and vae.config.latent_channels == 4
    (tmp_path / "config.json").write_text(json.dumps(written | {"patch_size": [1, 1]}))
    with pytest.raises(ValueError, match=r"patch_size=\[1, 1\] is not supported by the FLUX.2 VAE"):
        flux2_vae.load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match=r"unknown AutoencoderKLFlux2 config keys \['batchnorm_eps'\]"):
        flux2_vae.load_vae(tmp_path, config={"batchnorm_eps": 1e-5})


def test_full_size_meta_params_match_diffusers():
    with torch.device("meta"):
        reference = AutoencoderKLFlux2()
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "bn.num_batches_tracked"}
    params = flux2_vae.vae_params_meta(flux2_vae.Flux2VAEConfig())
    assert {k: tuple(v.shape) for k, v in dsf.tree.flatten_dict(params).items()} == ref_shapes


def test_input_errors_name_the_fix(reference):
    vae, vparams = flux2_vae.load_vae(dict(reference.state_dict()), config={"norm_num_groups": 4})
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(vparams, torch.zeros(1, 3, 8, 6))
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 2, 2\).*\(B, 16, H/16, W/16\)"):
        vae.decode(vparams, torch.zeros(1, 4, 2, 2))
