"""FLUX.2 pipelines end to end against diffusers' Flux2Pipeline (dev) and Flux2KleinPipeline (klein base with CFG,
distilled klein) on tiny random repos written like the hub ones, with the same noise, with and without reference
images; loading from BFL single files; the σ schedule against diffusers' numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dsf.diffusion.schedules import FLUX2
from dsf.models import flux2
from dsf.models.flux2.pipeline import load_pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps  # noqa: E402
from tiny_flux2 import SCHEDULER, write_tiny_flux2_bfl_files, write_tiny_flux2_pipeline  # noqa: E402

PROMPTS = ["a red cat", "blue"]
HEIGHT, WIDTH, STEPS, LENGTH = 32, 48, 3, 256


def _reference_images():
    gen = np.random.default_rng(0)
    return [Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 64), (80, 64)]]


@pytest.fixture(scope="module", params=["dev", "klein-base", "klein"])
def repo(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, write_tiny_flux2_pipeline(root, request.param)


def _run_both(repo, references):
    variant, root, reference = repo
    pipe = load_pipeline(root, max_sequence_length=LENGTH)
    assert pipe.variant == variant
    noise = pipe.noise(5, len(PROMPTS), HEIGHT, WIDTH, pipe.params)
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.0)
    images = _reference_images()[:references]
    with torch.no_grad():
        ours = pipe.denoise(pipe.params, PROMPTS, images=images, noise=noise, progress=False, **options)
        theirs = reference(image=images or None, prompt=PROMPTS, latents=noise,
                           max_sequence_length=LENGTH, output_type="latent", **options).images
    if theirs.ndim == 3:  # Flux2Pipeline's latent output: the packed tokens
        theirs = Flux2Pipeline._unpack_latents_with_ids(theirs, Flux2Pipeline._prepare_latent_ids(noise))
    else:  # Flux2KleinPipeline's: the VAE's raw latents, unpatchified and the batch norm undone
        theirs = (Flux2Pipeline._patchify_latents(theirs) - _bn_mean(reference)) / _bn_std(reference)
    return pipe, ours, theirs


def _bn_mean(reference):
    return reference.vae.bn.running_mean.view(1, -1, 1, 1)


def _bn_std(reference):
    return torch.sqrt(reference.vae.bn.running_var.view(1, -1, 1, 1) + reference.vae.config.batch_norm_eps)


def _relative_error(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("references", [0, 2])
def test_latents_match_diffusers_with_the_same_noise(repo, references):
    _, ours, theirs = _run_both(repo, references)
    assert ours.shape == theirs.shape
    assert _relative_error(ours, theirs) <= 1e-4


def test_images_match_diffusers(repo):
    variant, root, reference = repo
    pipe, ours, theirs = _run_both(repo, references=1)
    with torch.no_grad():
        ours_images = (pipe.decode(pipe.params, ours) / 2 + 0.5).clamp(0, 1)
        raw = Flux2Pipeline._unpatchify_latents(theirs * _bn_std(reference) + _bn_mean(reference))
        theirs_images = reference.image_processor.postprocess(reference.vae.decode(raw, return_dict=False)[0], output_type="pt")
    assert _relative_error(ours_images, theirs_images) <= 1e-4


def test_a_hub_id_loads_from_the_local_hub_folder(repo, tmp_path, monkeypatch):
    """``ModelSource(model_id=...)`` reads ``{DSF_MODEL_BASE_PATH}/{model_id}`` (no download): the same latents."""
    from dsf.files.hub import ModelSource

    variant, root, _ = repo
    (tmp_path / "black-forest-labs").mkdir()
    (tmp_path / "black-forest-labs" / "FLUX.2-tiny").symlink_to(root, target_is_directory=True)
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    from_hub = load_pipeline(ModelSource(model_id="black-forest-labs/FLUX.2-tiny"), max_sequence_length=LENGTH)
    from_folder = load_pipeline(root, max_sequence_length=LENGTH)
    assert from_hub.variant == variant
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False)
    with torch.no_grad():
        hub_latents, folder_latents = (pipe.denoise(pipe.params, "a cat", **options) for pipe in (from_hub, from_folder))
    assert torch.equal(hub_latents, folder_latents)


def test_reference_images_change_the_result(repo):
    _, without, _ = _run_both(repo, references=0)
    _, with_two, _ = _run_both(repo, references=2)
    assert _relative_error(with_two, without) > 1e-3


def test_bfl_single_files_give_the_same_pipeline(tmp_path):
    paths = write_tiny_flux2_bfl_files(tmp_path, "dev")
    pipe = load_pipeline(dit=paths["dit"], vae=paths["vae"], text_encoder=paths["text"], tokenizer=paths["tokenizer"],
                         max_sequence_length=LENGTH)
    assert pipe.variant == "dev" and pipe.dit.config.axes_dims_rope == (4, 4, 4, 4)
    image = pipe("a cat", height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False)
    assert image.size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("steps,tokens", [(50, 4096), (4, 4096), (28, 1024), (50, 6000)])
def test_sigmas_match_diffusers_scheduler(steps, tokens):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    grid = np.linspace(1.0, 1 / steps, steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=grid, mu=compute_empirical_mu(tokens, steps))
    theirs = scheduler.sigmas[:-1]
    ours = FLUX2.sigmas(steps, image_seq_len=tokens)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_default_steps_and_guidance_follow_the_variant():
    assert flux2.pipeline.DEFAULT_STEPS == {"dev": 50, "klein-base": 50, "klein": 4}
    pipe = flux2.tiny.tiny_pipeline(variant="klein")
    with torch.no_grad():
        a = pipe.denoise(pipe.params, "a", height=32, width=32, guidance_scale=1.0, progress=False)
        b = pipe.denoise(pipe.params, "a", height=32, width=32, guidance_scale=7.0, progress=False)
    assert torch.equal(a, b)  # distilled klein: no CFG, the scale is unused


def test_t2i_recipe_writes_the_pipelines_image_through_block_offload(repo, tmp_path):
    import importlib.util
    from pathlib import Path

    variant, root, _ = repo
    spec = importlib.util.spec_from_file_location("flux2_t2i", Path(__file__).resolve().parents[1] / "recipes" / "flux2_t2i.py")
    flux2_t2i = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flux2_t2i)
    reference = tmp_path / "reference.png"
    _reference_images()[0].save(reference)
    out = tmp_path / "cat.png"
    flux2_t2i.main(["--model_path", str(root), "--prompt", "a cat", "--seed", "5", "--num_inference_steps", "2",
                    "--image", str(reference), "--dtype", "float32", "--device", "cpu", "--offload", "block",
                    "--max_sequence_length", str(LENGTH), "--out", str(out)])
    pipe = load_pipeline(root, max_sequence_length=LENGTH)
    expected = pipe.generate(pipe.params, "a cat", images=[Image.open(reference)], seed=5, num_inference_steps=2,
                             progress=False)
    assert Image.open(out).size == expected.size == (64, 64)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    if variant == "dev":  # the text encoder and the DiT stored in fp8, streamed a block at a time
        flux2_t2i.main(["--model_path", str(root), "--prompt", "a cat", "--seed", "5", "--num_inference_steps", "2",
                        "--dtype", "float32", "--device", "cpu", "--offload", "block", "--fp8", "dit,text",
                        "--max_sequence_length", str(LENGTH), "--height", "32", "--width", "32", "--out", str(out)])
        assert Image.open(out).size == (32, 32)
