"""Wan pipeline: same noise and tiny components give diffusers' Wan pipelines' latents; expert switching;
TI2V's first frame; loading; mp4 round trip; errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dsf
from dsf.files.hub import ModelSource
from dsf.models.wan.model import WanDiT
from dsf.models.wan.pipeline import WanPipeline, load_pipeline
from dsf.models.wan.tiny import tiny_pipeline
from dsf.diffusion.schedules import WAN
from dsf.files.video import read_video, write_mp4

pytest.importorskip("diffusers")
from tiny_wan import BOUNDARY, write_tiny_wan_pipeline  # noqa: E402

FRAMES, SIZE, STEPS, TOKENS, REFERENCE_TOKENS = 5, 32, 4, 16, 512
PROMPTS, NEGATIVES = ["a red cat", "blue sky"], ["blurry", "dark"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a shared CPU, waiting threads would dominate every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One diffusers folder per variant, written when first asked for."""
    written = {}

    def folder(variant: str):
        if variant not in written:
            root = tmp_path_factory.mktemp(variant)
            written[variant] = (write_tiny_wan_pipeline(root, variant), root)
        return written[variant]

    return folder


def relative_error(ours, ref) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def picture(size: int = SIZE) -> Image.Image:
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("variant", ["t2v", "t2v-a14b", "i2v", "ti2v"])
def test_same_noise_same_latents_as_diffusers(folders, variant, monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan_i2v

    # Without ftfy, our prompt cleaning and diffusers' T2V pipeline skip it; its I2V pipeline calls it regardless.
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)
    reference, root = folders(variant)
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    size = 2 * SIZE if variant == "ti2v" else SIZE
    noise = pipe.noise(seed=3, batch=2, num_frames=FRAMES, height=size, width=size, params=pipe.params)
    image = picture(size) if variant in ("i2v", "ti2v") else None
    common = dict(height=size, width=size, num_frames=FRAMES, num_inference_steps=STEPS)
    extra = {} if image is None else {"image": image}
    with torch.no_grad():
        expected = reference(prompt=PROMPTS, negative_prompt=NEGATIVES, guidance_scale=5.0, latents=noise.clone(),
                             max_sequence_length=REFERENCE_TOKENS, output_type="latent", **common, **extra).frames
        latents = pipe.denoise(pipe.params, PROMPTS, negative_prompt=NEGATIVES, noise=noise, cfg_scale=5.0, progress=False,
                               **common, **extra)
    assert latents.shape == expected.shape
    assert relative_error(latents, expected) <= 1e-4


def record_dit_calls(monkeypatch) -> list:
    calls = []
    call = WanDiT.__call__

    def recording(self, params, latents, timestep, *args, **kwargs):
        calls.append((id(params), timestep.clone()))
        return call(self, params, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "__call__", recording)
    return calls


def test_two_experts_are_called_on_their_steps(monkeypatch):
    pipe = tiny_pipeline("t2v-a14b")
    calls = record_dit_calls(monkeypatch)
    with torch.no_grad():
        pipe.denoise(pipe.params, "a cat", num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     cfg_scale=2.0, progress=False)
    sigmas = WAN.sigmas(STEPS).tolist()  # [1, 0.9375, 0.833, 0.625]
    experts = {id(pipe.dit_params["high_noise"]): "high_noise", id(pipe.dit_params["low_noise"]): "low_noise"}
    called = [(experts[params], round(float(timestep[0]), 4)) for params, timestep in calls]
    expected = [("high_noise" if s >= BOUNDARY else "low_noise", round(s, 4)) for s in sigmas for _ in range(2)]
    assert called == expected
    assert [expert for expert, _ in called].count("high_noise") == 4


def test_ti2v_keeps_the_encoded_image_as_a_clean_first_frame(monkeypatch):
    pipe = tiny_pipeline("ti2v")
    image = picture(40)
    calls = record_dit_calls(monkeypatch)
    with torch.no_grad():
        latents = pipe.denoise(pipe.params, "a cat", image=image, num_frames=9, height=SIZE, width=SIZE,
                               num_inference_steps=2, cfg_scale=1.0, progress=False)
        first = pipe.image_conditioning(pipe.params, image, 9, SIZE, SIZE, 1)["first_frame"]
    assert torch.equal(latents[:, :, :1], first)
    assert [timestep.tolist() for _, timestep in calls] == [[[0.0, s, s]] for s in WAN.sigmas(2).tolist()]


def test_seeded_generation_is_deterministic_and_returns_frames():
    pipe = tiny_pipeline("t2v")
    kwargs = dict(num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    a, b, c = (pipe("a cat", seed=s, **kwargs) for s in (1, 1, 2))
    assert len(a) == FRAMES and all(isinstance(f, Image.Image) and f.size == (SIZE, SIZE) for f in a)
    assert [f.tobytes() for f in a] == [f.tobytes() for f in b] != [f.tobytes() for f in c]
    videos = pipe(["a cat", "a dog"], seed=1, **kwargs)  # video i of a batch: the noise of fold_in(key, i)
    batched = torch.stack([torch.from_numpy(np.array(f)).int() for f in videos[0]])
    alone = torch.stack([torch.from_numpy(np.array(f)).int() for f in a])
    assert len(videos) == 2 and int((batched - alone).abs().max()) <= 1


def test_denoise_is_differentiable_in_the_dit_params():
    pipe = tiny_pipeline("t2v")
    kwargs = dict(num_frames=1, height=SIZE, width=SIZE, num_inference_steps=1, cfg_scale=1.0, progress=False)

    def loss(params):
        return pipe.denoise(params, "a cat", **kwargs).square().mean()

    grads = dsf.grad(loss, where=r"^dit/")(pipe.params)
    assert float(grads["dit"]["proj_out"]["weight"].abs().sum()) > 0


def test_generated_frames_round_trip_through_mp4(tmp_path):
    frames = tiny_pipeline("t2v")("a cat", num_frames=9, height=SIZE, width=2 * SIZE, num_inference_steps=1, progress=False)
    write_mp4(frames, tmp_path / "cat.mp4", fps=16)
    back = read_video(tmp_path / "cat.mp4")
    assert len(back) == 9 and back[0].size == (2 * SIZE, SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["cat.mp4"]


def test_loading_one_expert_and_the_boundary(folders):
    reference, root = folders("t2v-a14b")
    pipe = load_pipeline(root, max_sequence_length=TOKENS)
    assert pipe.dit.boundary == BOUNDARY
    low = load_pipeline(root, max_sequence_length=TOKENS, expert="low_noise")
    expected = reference.transformer_2.state_dict()["proj_out.weight"]
    assert isinstance(low.dit, WanDiT) and torch.equal(low.dit_params["proj_out"]["weight"], expected)


def test_per_component_dtype_and_hub_cache_folder(folders, monkeypatch):
    _, root = folders("t2v")
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(root.parent))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    pipe = load_pipeline(ModelSource(model_id=root.name), max_sequence_length=TOKENS, dtype={"dit": torch.bfloat16})
    assert pipe.dit_params["patch_embedding"]["weight"].dtype == torch.bfloat16
    assert pipe.vae_params["encoder"]["conv_in"]["weight"].dtype == torch.float32
    with torch.no_grad():
        latents = pipe.denoise(pipe.params, "a cat", num_frames=1, height=SIZE, width=SIZE, num_inference_steps=2,
                               progress=False)
    assert latents.dtype == torch.float32 and bool(latents.isfinite().all())


@pytest.mark.parametrize("variant, kwargs, message", [
    ("t2v", dict(num_frames=80), "num_frames 80 is not 1 \\+ 4k .*; use 77 or 81"),
    ("t2v", dict(height=40), "height 40 is not a multiple of 16; use 32 or 48"),
    ("ti2v", dict(width=48), "width 48 is not a multiple of 32; use 32 or 64"),
    ("i2v", dict(), "image-to-video .*: pass image="),
    ("t2v", dict(image=Image.new("RGB", (32, 32))), "text-to-video .*: drop image="),
    ("t2v", dict(negative_prompt=["x", "y"]), "1 prompts but 2 negative prompts"),
    ("t2v", dict(noise=torch.zeros(1, 16, 1, 4, 4)), r"noise has shape \(1, 16, 1, 4, 4\); .* need \(1, 16, 2, 4, 4\)"),
])
def test_bad_input_names_the_value_and_the_fix(variant, kwargs, message):
    pipe = tiny_pipeline(variant)
    request = dict(num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=1, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **request)


def test_mismatched_components_are_refused():
    t2v, ti2v = tiny_pipeline("t2v"), tiny_pipeline("ti2v")
    with pytest.raises(ValueError, match="the VAE has 48 latent channels but the DiT denoises 16"):
        WanPipeline(t2v.dit, t2v.dit_params, ti2v.vae, ti2v.vae_params, t2v.t5)
    i2v = tiny_pipeline("i2v")
    with pytest.raises(ValueError, match="pass the CLIP vision encoder"):
        WanPipeline(i2v.dit, i2v.dit_params, i2v.vae, i2v.vae_params, i2v.t5)


def test_missing_component_is_named(tmp_path):
    with pytest.raises(ValueError, match="no source for the vae"):
        load_pipeline(dit=tmp_path)
