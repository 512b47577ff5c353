"""The Qwen-Image pipeline against diffusers' QwenImagePipeline on a tiny random repo written like the hub one: the
σ schedule, and whole generations (true CFG with its norm rescale, batched prompts of different lengths) from the
same noise; loading from the folder and from component files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsf.files.hub import ModelSource
from dsf.models.qwen_image import pipeline as qwen_pipeline
from tiny_qwen_image import write_tiny_qwen_image_pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift  # noqa: E402

HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen") / "Qwen-Image"
    return root, write_tiny_qwen_image_pipeline(root)


@pytest.mark.parametrize("steps, tokens", [(50, 6889), (4, 256), (30, 1024), (2, 8192)])
def test_schedule_matches_diffusers(steps, tokens):
    config = qwen_pipeline.SCHEDULER_CONFIG
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = qwen_pipeline.pipeline_schedule(config).sigmas(steps, image_seq_len=tokens)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].float(), atol=1e-6, rtol=0)


def _reference_images(pipe, prompts, noise, cfg_scale, steps):
    b, c, h, w = noise.shape
    packed = QwenImagePipeline._pack_latents(noise, b, c, h, w)
    with torch.no_grad():
        return pipe(prompt=prompts, negative_prompt=[" "] * len(prompts) if cfg_scale != 1 else None,
                    true_cfg_scale=cfg_scale, height=HEIGHT, width=WIDTH, num_inference_steps=steps, latents=packed,
                    output_type="pt").images


def _our_images(pipe, prompts, noise, cfg_scale, steps):
    with torch.no_grad():
        latents = pipe.denoise(pipe.params, prompts, noise=noise, cfg_scale=cfg_scale, height=HEIGHT, width=WIDTH,
                               num_inference_steps=steps, progress=False)
        return pipe.decode(pipe.params, latents) / 2 + 0.5


@pytest.mark.parametrize("prompts, cfg_scale", [(["a red cat on the wall", "a dog"], 4.0), (["a blue sign"], 1.0)],
                         ids=["batched-cfg", "no-cfg"])
def test_whole_pipeline_matches_diffusers(repo, prompts, cfg_scale):
    root, reference = repo
    ours = qwen_pipeline.load_pipeline(root)
    noise = torch.randn(len(prompts), 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(5))
    expected = _reference_images(reference, prompts, noise, cfg_scale, steps=3)
    images = _our_images(ours, prompts, noise, cfg_scale, steps=3)
    assert images.shape == expected.shape == (len(prompts), 3, HEIGHT, WIDTH)
    assert float((expected == 0).float().mean() + (expected == 1).float().mean()) < 0.2  # not mostly clamped
    assert float((images - expected).abs().max()) <= 1e-4


def test_a_hub_id_loads_from_the_local_hub_folder(repo, tmp_path, monkeypatch):
    """``ModelSource(model_id="Qwen/Qwen-Image")`` reads ``{DSF_MODEL_BASE_PATH}/Qwen/Qwen-Image`` (no download)."""
    root, reference = repo
    (tmp_path / "Qwen").mkdir()
    (tmp_path / "Qwen" / "Qwen-Image").symlink_to(root, target_is_directory=True)
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    ours = qwen_pipeline.load_pipeline(ModelSource(model_id="Qwen/Qwen-Image"))
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(7))
    expected = _reference_images(reference, ["a cat"], noise, 1.0, steps=2)
    assert float((_our_images(ours, ["a cat"], noise, 1.0, steps=2) - expected).abs().max()) <= 1e-4


def test_the_comparison_sees_the_guidance_rescale(repo):
    """Plain CFG (no norm rescale) gives other images: the parity above checks the rescale."""
    root, reference = repo
    ours = qwen_pipeline.load_pipeline(root)
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(5))
    expected = _reference_images(reference, ["a cat"], noise, 4.0, steps=2)
    plain = dataclass_replace_guidance(ours)
    assert float((_our_images(plain, ["a cat"], noise, 4.0, steps=2) - expected).abs().max()) > 1e-3


def dataclass_replace_guidance(pipe):
    """The pipeline with guidance ``neg + s·(pos − neg)`` unrescaled."""
    class Plain(type(pipe)):
        def velocity(self, params, latents, sigma, positive, negative=None, cfg_scale=1.0):
            v = self.dit(params["dit"], latents, sigma.to(latents.dtype), **positive)
            n = self.dit(params["dit"], latents, sigma.to(latents.dtype), **negative)
            return n + cfg_scale * (v - n)

    return Plain(**{f: getattr(pipe, f) for f in pipe.__dataclass_fields__})


def test_load_from_component_files(repo, tmp_path):
    """ComfyUI-style single files for each component, the tokenizer from the folder."""
    from safetensors.torch import save_file

    root, reference = repo
    files = {}
    for name, module, prefix in [("dit", reference.transformer, "model.diffusion_model."), ("vae", reference.vae, ""),
                                 ("text_encoder", reference.text_encoder, "")]:
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()}, files[name])
    ours = qwen_pipeline.load_pipeline(
        dit=files["dit"], vae=files["vae"], text_encoder=files["text_encoder"], tokenizer=root / "tokenizer",
        dit_config={"axes_dims_rope": [4, 6, 6]}, vae_config=dict(reference.vae.config),
        text_encoder_config=reference.text_encoder.config)
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(6))
    expected = _reference_images(reference, ["a cat"], noise, 4.0, steps=2)
    assert float((_our_images(ours, ["a cat"], noise, 4.0, steps=2) - expected).abs().max()) <= 1e-4


def test_t2i_recipe_writes_the_pipelines_image_through_block_offload(repo, tmp_path):
    spec = importlib.util.spec_from_file_location("qwen_image_t2i", Path(__file__).resolve().parents[1] / "recipes" / "qwen_image_t2i.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    root, _ = repo
    out = tmp_path / "cat.png"
    recipe.main(["--model_path", str(root), "--prompt", "a cat", "--seed", "5", "--num_inference_steps", "2",
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--dtype", "float32", "--device", "cpu",
                 "--offload", "block", "--out", str(out)])
    pipe = qwen_pipeline.load_pipeline(root)
    expected = pipe.generate(pipe.params, "a cat", seed=5, height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
