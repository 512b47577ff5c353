"""recipes/z_image_lora.py end to end on a tiny Z-Image laid out like the hub repo and a folder of digit images;
its LoRA loads into diffusers' ZImagePipeline with the same output."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsf.model_parts.lora_files import detect_lora_layout
from dsf.models import z_image
from dsf.models.digits.training import digit_images
from dsf.training.data import write_image_folder
from dsf.transforms import load_lora
from tiny_z_image import write_tiny_z_image_pipeline

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny/Z-Image-tiny"  # the hub repo id the tiny pipeline is stored under
SIZE, TOKENS, ROWS = 32, 32, 4
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_recipe():
    spec = importlib.util.spec_from_file_location("z_image_lora", ROOT / "recipes" / "z_image_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


z_image_lora = load_recipe()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up would dominate every op on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    write_tiny_z_image_pipeline(root / REPO)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    images, labels = digit_images(SIZE)
    rgb = [np.stack([image] * 3, axis=-1) for image in images[:ROWS]]
    return write_image_folder(tmp_path_factory.mktemp("digits"), rgb,
                              [{"prompt": f"a digit {WORDS[labels[i]]}"} for i in range(ROWS)])


def run(hub, metadata: Path, output: Path, *flags: str, monkeypatch):
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(hub))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    argv = ["--dataset_base_path", str(metadata.parent), "--model_id", REPO, "--height", str(SIZE), "--width", str(SIZE),
            "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2", "--lora_rank", "4", "--max_steps", "3",
            "--output_path", str(output), *flags]
    if "sft:train" not in flags:
        argv += ["--dataset_metadata_path", str(metadata)]
    return z_image_lora.main(argv)


def log_rows(output: Path) -> list[dict]:
    with open(output / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


def velocity_inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    mask = torch.arange(40) < torch.tensor([[40], [9]])
    return dict(latents=torch.randn(2, 16, 4, 4, generator=gen), timestep=torch.tensor([0.3, 0.9]),
                text_embeds=torch.randn(2, 40, 16, generator=gen) * mask[..., None], text_mask=mask)


def diffusers_velocity(repo: Path, lora_path: Path, inputs: dict) -> torch.Tensor:
    """The reference transformer of the tiny repo with the LoRA loaded by ZImagePipeline.load_lora_weights."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(repo)
    pipe.load_lora_weights(str(lora_path), adapter_name="trained")
    captions = [embeds[valid] for embeds, valid in zip(inputs["text_embeds"], inputs["text_mask"])]
    with torch.no_grad():
        out = pipe.transformer(list(inputs["latents"].unsqueeze(2).unbind(0)), 1 - inputs["timestep"], captions,
                               return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sft_run(hub, digits, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return output, run(hub, digits, output, "--lora_layout", "diffusers", monkeypatch=monkeypatch)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_sft_lora_loads_into_dsf_and_diffusers_with_the_same_output(hub, sft_run):
    output, trained = sft_run
    rows = log_rows(output)
    assert len(rows) == 3 and all(math.isfinite(float(row["loss"])) for row in rows)
    path = output / "step-3.safetensors"
    assert detect_lora_layout(load_file(path)) == "diffusers"
    dit, base = z_image.load_dit(hub / REPO)
    inputs = velocity_inputs()
    with torch.no_grad():
        ours = dit(load_lora(base, path), **inputs)
        in_training = dit(trained["dit"], **inputs)
        plain = dit(base, **inputs)
    reference = diffusers_velocity(hub / REPO, path, inputs)
    assert relative_error(ours, in_training) <= 1e-6
    assert relative_error(ours, reference) <= 1e-4
    assert relative_error(plain, reference) > 1e-3  # the LoRA changed the model


@pytest.mark.parametrize("layout, key", [
    ("comfyui", "diffusion_model.layers.0.attention.qkv.lora_down.weight"),
    ("kohya", "lora_unet_layers_0_attention_qkv.lora_down.weight"),
    ("diffsynth", "layers.0.attention.to_q.lora_A.weight"),  # DiffSynth-Studio's ZImageDiT names are diffusers'
])
def test_lora_files_round_trip_in_the_other_layouts(hub, digits, sft_run, tmp_path, monkeypatch, layout, key):
    """The same training written in another layout reads back to the same model (ComfyUI's and kohya's fuse q, k
    and v into Lumina2's attention.qkv)."""
    run(hub, digits, tmp_path, "--lora_layout", layout, monkeypatch=monkeypatch)
    assert key in load_file(tmp_path / "step-3.safetensors")
    assert [r["loss"] for r in log_rows(tmp_path)] == [r["loss"] for r in log_rows(sft_run[0])]
    dit, base = z_image.load_dit(hub / REPO)
    inputs = velocity_inputs()
    with torch.no_grad():
        ours = dit(load_lora(base, tmp_path / "step-3.safetensors"), **inputs)
        expected = dit(load_lora(base, sft_run[0] / "step-3.safetensors"), **inputs)
    assert relative_error(ours, expected) <= 1e-6


def test_split_training_gives_the_unsplit_losses(hub, digits, sft_run, tmp_path, monkeypatch):
    cache = run(hub, digits, tmp_path / "cache", "--task", "sft:data_process", monkeypatch=monkeypatch)
    run(hub, cache / "index.json", tmp_path / "train", "--task", "sft:train", "--lora_layout", "diffusers",
        monkeypatch=monkeypatch)
    unsplit, split = log_rows(sft_run[0]), log_rows(tmp_path / "train")
    assert [(r["loss"], r["grad_norm"]) for r in split] == [(r["loss"], r["grad_norm"]) for r in unsplit]
