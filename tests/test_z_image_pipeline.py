"""The Z-Image pipeline against diffusers' ZImagePipeline on a tiny random repo: σ schedule, latents and images with
the same noise, Turbo-style (no guidance) and base-style (CFG with normalization and truncation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsf.models import z_image
from dsf.models.z_image.pipeline import TURBO_SCHEDULER_CONFIG, guided, pipeline_schedule

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas  # noqa: E402
from tiny_z_image import TEXT_TINY, write_tiny_z_image_pipeline  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image")
    return root, write_tiny_z_image_pipeline(root)


@pytest.mark.parametrize("steps", [8, 9, 50])
def test_sigmas_match_the_diffusers_pipeline(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER_CONFIG)
    mu = calculate_shift(4096)
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    ours = pipeline_schedule(TURBO_SCHEDULER_CONFIG).sigmas(steps, image_seq_len=4096)
    assert torch.allclose(ours, scheduler.sigmas[:-1].float(), atol=1e-6)
    assert scheduler.sigmas[-1] == 0


def test_turbo_grid_is_the_documented_one():
    """DiffSynth-Studio's golden numbers for Z-Image, 8 steps, shift 3."""
    sigmas = pipeline_schedule(TURBO_SCHEDULER_CONFIG).sigmas(8)
    assert torch.allclose(sigmas[:3], torch.tensor([1.0, 0.954545, 0.9]), atol=1e-6)
    assert torch.allclose(sigmas[-2:], torch.tensor([0.5, 0.3]), atol=1e-6)


def _noise(batch: int) -> torch.Tensor:
    return torch.randn(batch, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))


def _copied(options: dict) -> dict:
    return {key: list(value) if isinstance(value, list) else value for key, value in options.items()}


@pytest.mark.parametrize(
    "prompts, ours_options, diffusers_options",
    [
        (["a cat"], {}, {"guidance_scale": 0.0}),
        (["a cat", "a dog on a mat under a tree"], {"cfg_scale": 3.0, "negative_prompt": "blur"},
         {"guidance_scale": 2.0, "negative_prompt": ["blur", "blur"]}),
        (["a cat", "a dog"], {"cfg_scale": 4.0, "cfg_normalization": 1.0, "cfg_truncation": 0.5},
         {"guidance_scale": 3.0, "cfg_normalization": True, "cfg_truncation": 0.5}),
    ],
    ids=["turbo", "cfg", "cfg-normalized-truncated"],
)
def test_pipeline_matches_diffusers(repo, prompts, ours_options, diffusers_options):
    root, reference = repo  # (diffusers' encode_prompt rewrites the prompt list it is given: pass copies)
    pipe = z_image.load_pipeline(root, max_sequence_length=64)
    noise = _noise(len(prompts))
    steps = 4
    with torch.no_grad():
        expected_latents = reference(list(prompts), height=SIZE, width=SIZE, num_inference_steps=steps, latents=noise.clone(),
                                     output_type="latent", max_sequence_length=64, **_copied(diffusers_options)).images
        expected_images = reference(list(prompts), height=SIZE, width=SIZE, num_inference_steps=steps, latents=noise.clone(),
                                    output_type="pt", max_sequence_length=64, **_copied(diffusers_options)).images
        latents = pipe.denoise(pipe.params, prompts, num_inference_steps=steps, height=SIZE, width=SIZE, noise=noise,
                               progress=False, **ours_options)
        images = (pipe.decode(pipe.params, latents) / 2 + 0.5).clamp(0, 1)
    assert float((latents - expected_latents).abs().max() / expected_latents.abs().max()) <= 1e-4
    assert float((images - expected_images).abs().max()) <= 1e-4


def test_generate_gives_pil_images(repo):
    root, _ = repo
    pipe = z_image.load_pipeline(root, max_sequence_length=64)
    image = pipe("a cat", height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    assert image.size == (SIZE, SIZE)


def test_guided_normalization_caps_the_norm_per_sample():
    positive, negative = torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.zeros(2, 2)
    capped = guided(positive, negative, 2.0, 1.5)
    assert torch.allclose(torch.linalg.vector_norm(capped, dim=1), torch.tensor([7.5, 0.75]))
    assert torch.equal(guided(positive, negative, 2.0, 0.0), 2 * positive)


def test_t2i_recipe_writes_the_pipelines_image_through_block_offload(repo, tmp_path):
    spec = importlib.util.spec_from_file_location("z_image_t2i", Path(__file__).resolve().parents[1] / "recipes" / "z_image_t2i.py")
    z_image_t2i = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(z_image_t2i)
    root, _ = repo
    out = tmp_path / "cat.png"
    z_image_t2i.main(["--model_path", str(root), "--prompt", "a cat", "--seed", "5", "--num_inference_steps", "2",
                      "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "--device", "cpu",
                      "--offload", "block", "--cfg_scale", "2", "--out", str(out)])
    pipe = z_image.load_pipeline(root)
    expected = pipe.generate(pipe.params, "a cat", seed=5, height=SIZE, width=SIZE, num_inference_steps=2, cfg_scale=2.0,
                             progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_pipeline_from_comfyui_single_files_matches_the_folder(repo, tmp_path):
    """Comfy-Org's files: the DiT in Lumina2 names under model.diffusion_model., the VAE as BFL's ae.safetensors, Qwen3
    as a causal LM's state dict (qwen_3_4b.safetensors), with the tokenizer folder given apart."""
    from safetensors.torch import save_file

    from dsf.model_parts.flux_vae_keys import ours_to_ldm
    from dsf.models.z_image.keys import COMFY_PREFIX, ours_to_lumina2

    root, reference = repo
    folder = z_image.load_pipeline(root, max_sequence_length=64)
    files = {
        "z_image_turbo_bf16.safetensors": {COMFY_PREFIX + k: v for k, v in ours_to_lumina2(reference.transformer.state_dict()).items()},
        "ae.safetensors": ours_to_ldm(folder.vae_params),
        "qwen_3_4b.safetensors": {"model." + k: v for k, v in reference.text_encoder.state_dict().items()},
    }
    for name, flat in files.items():
        save_file({k: v.clone().contiguous() for k, v in flat.items()}, tmp_path / name)
    single = z_image.load_pipeline(dit=tmp_path / "z_image_turbo_bf16.safetensors", vae=tmp_path / "ae.safetensors",
                                   text_encoder=tmp_path / "qwen_3_4b.safetensors", tokenizer=root / "tokenizer",
                                   dit_config={"axes_dims": [4, 6, 6]}, vae_config={"norm_num_groups": 4},
                                   text_encoder_config=TEXT_TINY, max_sequence_length=64)
    options = dict(num_inference_steps=2, height=SIZE, width=SIZE, noise=_noise(1), progress=False)
    with torch.no_grad():
        assert torch.equal(single.denoise(single.params, "a cat", **options), folder.denoise(folder.params, "a cat", **options))
