"""FLUX.1 pipeline: same seed and tiny components give diffusers' FluxPipeline image; loading paths; errors; flux_t2i.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFluxPipeline
from PIL import Image

from dsf.files.hub import ModelSource
from dsf.model_parts import flux_vae_keys as vae_keys
from dsf.models.flux import keys
from dsf.models.flux.pipeline import load_pipeline
from tiny_flux import write_tiny_flux_pipeline

SIZE, STEPS, TOKENS = 64, 3, 16


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return write_tiny_flux_pipeline(root, guidance_embeds=request.param), root


def relative_error(ours, ref):
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def reference_run(reference, noise, **kwargs):
    packed = DiffusersFluxPipeline._pack_latents(noise, *noise.shape)
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, max_sequence_length=TOKENS, latents=packed)
    with torch.no_grad():
        latents = reference(**common, output_type="latent", **kwargs).images
        images = reference(**common, output_type="pt", **kwargs).images
    return DiffusersFluxPipeline._unpack_latents(latents, SIZE, SIZE, vae_scale_factor=8), images * 2 - 1


@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["plain", "true-cfg"])
def test_same_seed_same_image_as_diffusers(folders, cfg):
    reference, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    noise = pipe.noise(seed=3, batch=2, height=SIZE, width=SIZE, params=pipe.params)
    prompts = ["a red cat", "blue sky"]
    extra = dict(negative_prompt=["blurry", "dark"], true_cfg_scale=cfg) if cfg != 1.0 else {}
    ref_latents, ref_images = reference_run(reference, noise, prompt=prompts, guidance_scale=3.5, **extra)
    with torch.no_grad():
        latents = pipe.denoise(pipe.params, prompts, noise=noise, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                               embedded_guidance=3.5, cfg_scale=cfg, negative_prompt=extra.get("negative_prompt", ""),
                               progress=False)
        images = pipe.decode(pipe.params, latents).clamp(-1, 1)  # diffusers' postprocess clamps
    assert relative_error(latents, ref_latents) <= 1e-4
    assert relative_error(images, ref_images) <= 1e-4


def test_seeded_generation_is_deterministic_and_returns_pil(folders):
    _, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    a, b, c = (pipe("a cat", seed=s, **kwargs) for s in (1, 1, 2))
    assert isinstance(a, Image.Image) and a.size == (SIZE, SIZE)
    assert a.tobytes() == b.tobytes() != c.tobytes()


def test_image_to_image_starts_from_the_input(folders):
    _, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    source = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    kwargs = dict(seed=0, height=SIZE, width=SIZE, num_inference_steps=4, progress=False)
    with torch.no_grad():
        target = pipe.encode_image(pipe.params, source, SIZE, SIZE, 1)
        light = pipe.denoise(pipe.params, "a cat", input_image=source, denoising_strength=0.25, **kwargs)
        full = pipe.denoise(pipe.params, "a cat", **kwargs)
        full_with_image = pipe.denoise(pipe.params, "a cat", input_image=source, denoising_strength=1.0, **kwargs)
    assert (light - target).abs().mean() < (full - target).abs().mean()
    assert torch.equal(full, full_with_image)


def test_components_from_bfl_single_files_match_the_folder(folders, tmp_path):
    from safetensors.torch import save_file

    _, root = folders
    folder_pipe = load_pipeline(root, max_sequence_length=TOKENS)
    save_file(keys.ours_to_bfl(folder_pipe.dit_params), tmp_path / "flux1.safetensors")
    save_file(vae_keys.ours_to_ldm(folder_pipe.vae_params), tmp_path / "ae.safetensors")
    pipe = load_pipeline(dit=tmp_path / "flux1.safetensors", vae=tmp_path / "ae.safetensors", text_encoder=root,
                         text_encoder_2=root, max_sequence_length=TOKENS,
                         dit_config={"axes_dims_rope": [4, 6, 6]}, vae_config={"norm_num_groups": 4})
    kwargs = dict(seed=4, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    assert pipe("a dog", **kwargs).tobytes() == folder_pipe("a dog", **kwargs).tobytes()


def test_loads_from_a_hub_cache_folder_without_network(folders, tmp_path, monkeypatch):
    _, root = folders
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(root.parent))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    pipe = load_pipeline(ModelSource(model_id=root.name), max_sequence_length=TOKENS)
    assert pipe.dit.config.num_double_blocks == 1


def test_per_component_dtype(folders):
    _, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS, dtype={"dit": torch.bfloat16, "t5": torch.float32})
    assert pipe.dit_params["x_embedder"]["weight"].dtype == torch.bfloat16
    assert pipe.vae_params["encoder"]["conv_in"]["weight"].dtype == torch.float32
    image = pipe("a cat", seed=0, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    assert image.size == (SIZE, SIZE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=72), "height 72 is not a multiple of 16; use 64 or 80"),
    (dict(width=0), "width 0 is not a multiple of 16"),
    (dict(cfg_scale=2.0, negative_prompt=["x", "y"]), "1 prompts but 2 negative prompts"),
])
def test_bad_input_names_the_value_and_the_fix(folders, kwargs, message):
    _, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **{"height": SIZE, "width": SIZE, "num_inference_steps": 1, "progress": False, **kwargs})


def test_missing_component_is_named(tmp_path):
    with pytest.raises(ValueError, match="no source for the vae"):
        load_pipeline(dit=tmp_path / "flux1.safetensors")


def test_long_prompt_is_truncated_with_a_warning(folders):
    _, root = folders
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    with pytest.warns(UserWarning, match="the rest is dropped"):
        pipe("a " * 40, height=SIZE, width=SIZE, num_inference_steps=1, progress=False)


def test_t2i_recipe_writes_the_pipelines_image_through_block_offload(folders, tmp_path):
    spec = importlib.util.spec_from_file_location("flux_t2i", Path(__file__).resolve().parents[1] / "recipes" / "flux_t2i.py")
    flux_t2i = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flux_t2i)
    _, root = folders
    out = tmp_path / "cat.png"
    flux_t2i.main(["--model_path", str(root), "--prompt", "a cat", "--seed", "5", "--num_inference_steps", "2",
                   "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "--device", "cpu",
                   "--offload", "block", "--out", str(out)])
    pipe = load_pipeline(root)
    expected = pipe.generate(pipe.params, "a cat", seed=5, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
