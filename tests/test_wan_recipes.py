"""recipes/wan_t2v.py and recipes/wan_lora.py end to end on tiny Wan pipelines saved as diffusers folders."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dsf
from dsf.training.cache import CachedDataset
from dsf.models.wan.model import WanDiT
from dsf.models.wan.pipeline import load_pipeline
from dsf.transforms import load_lora
from dsf.transforms.lora import linear_weight_shapes
from dsf.transforms.offload import count_transfers
from dsf.model_parts.lora_files import read_lora
from dsf.files.video import read_video, write_mp4

pytest.importorskip("diffusers")
from tiny_wan import BOUNDARY, write_tiny_wan_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES, TOKENS = 32, 5, 16


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wan_t2v, wan_lora = load_recipe("wan_t2v"), load_recipe("wan_lora")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a shared CPU, waiting threads would dominate every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    written = {}

    def folder(variant: str) -> Path:
        if variant not in written:
            written[variant] = tmp_path_factory.mktemp(variant)
            write_tiny_wan_pipeline(written[variant], variant)
        return written[variant]

    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A video of 9 frames (48×40, a moving bar) and an image, with prompts."""
    folder = tmp_path_factory.mktemp("clips")
    frames = []
    for t in range(9):
        pixels = torch.full((40, 48, 3), 30, dtype=torch.uint8)
        pixels[:, 4 * t : 4 * t + 8] = 220
        frames.append(Image.fromarray(pixels.numpy()))
    write_mp4(frames, folder / "bar.mp4", fps=16)
    Image.new("RGB", (40, 40), (200, 40, 40)).save(folder / "red.png")
    (folder / "metadata.csv").write_text("video,image,prompt\nbar.mp4,,a bar moves\n,red.png,a red square\n")
    return folder / "metadata.csv"


def lora_run(model: Path, metadata: Path, output: Path, *flags: str):
    return wan_lora.main([
        "--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata), "--model_path", str(model),
        "--height", str(SIZE), "--width", str(SIZE), "--num_frames", str(FRAMES), "--max_sequence_length", str(TOKENS),
        "--learning_rate", "1e-2", "--lora_rank", "4", "--output_path", str(output), *flags,
    ])


def log_rows(output: Path) -> list[dict]:
    with open(output / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def trained_lora(folders, dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("lora")
    lora_run(folders("t2v"), dataset, output, "--max_steps", "2", "--lora_layout", "diffusers")
    return output


def test_lora_trains_two_steps_and_writes_a_diffusers_lora_that_loads_back(folders, trained_lora):
    assert [row["step"] for row in log_rows(trained_lora)] == ["1", "2"]
    with safe_open(str(trained_lora / "step-2.safetensors"), framework="pt") as file:
        assert "transformer.blocks.0.attn1.to_q.lora_B.weight" in set(file.keys())
    pipe = load_pipeline(folders("t2v"), max_sequence_length=TOKENS)
    adapted = load_lora(pipe.dit_params, trained_lora / "step-2.safetensors")
    adapter = next(iter(adapted["blocks"][0]["attn1"]["to_q"]["weight"].stages["adapt"].adapters.values()))
    assert float(adapter.up.abs().sum()) > 0  # trained away from LoRA's zero init
    inputs = (torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, 16))
    assert not torch.allclose(pipe.dit(adapted, *inputs), pipe.dit(pipe.dit_params, *inputs))


def test_resumed_lora_training_equals_an_uninterrupted_run(folders, dataset, trained_lora, tmp_path):
    lora_run(folders("t2v"), dataset, tmp_path, "--max_steps", "1", "--lora_layout", "dsf")
    lora_run(folders("t2v"), dataset, tmp_path, "--max_steps", "2", "--lora_layout", "dsf", "--resume")
    assert [row["step"] for row in log_rows(tmp_path)] == ["1", "2"]
    shapes = linear_weight_shapes(load_pipeline(folders("t2v"), max_sequence_length=TOKENS).dit_params)
    resumed, uninterrupted = (read_lora(path, shapes) for path in (tmp_path / "step-2.safetensors",
                                                                    trained_lora / "step-2.safetensors"))
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[k].up, uninterrupted[k].up) for k in resumed)


def test_block_offload_of_the_dit_and_umt5_trains_the_same_lora(folders, dataset, trained_lora, tmp_path):
    """--offload_models streams the DiT and umT5 from the CPU one block at a time: the same numbers, bit for bit."""
    with count_transfers() as moved:
        lora_run(folders("t2v"), dataset, tmp_path, "--max_steps", "2", "--lora_layout", "diffusers",
                 "--offload_models", "dit,t5")
    assert moved.blocks, "nothing was streamed"
    offloaded, resident = (load_file(folder / "step-2.safetensors") for folder in (tmp_path, trained_lora))
    assert offloaded.keys() == resident.keys() and all(torch.equal(offloaded[k], resident[k]) for k in resident)


def test_one_expert_trains_only_on_its_sigma_range(folders, dataset, tmp_path, monkeypatch):
    sigmas = []
    call = WanDiT.__call__

    def recording(self, params, latents, timestep, *args, **kwargs):
        sigmas.extend(timestep.tolist())
        return call(self, params, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "__call__", recording)
    model = folders("t2v-a14b")
    lora_run(model, dataset, tmp_path, "--expert", "high_noise", "--max_steps", "1", "--gradient_accumulation_steps", "8")
    assert len(sigmas) == 8 and min(sigmas) >= BOUNDARY
    high = load_pipeline(model, max_sequence_length=TOKENS, expert="high_noise")
    assert load_lora(high.dit_params, tmp_path / "step-1.safetensors")["blocks"][1]["ffn"]["net"]["2"]["weight"].stages


def test_split_training_gives_the_unsplit_losses_without_reading_the_encoders(folders, dataset, trained_lora, tmp_path):
    cache = lora_run(folders("t2v"), dataset, tmp_path / "cache", "--task", "sft:data_process")
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "shard-00000.safetensors"]
    trained = wan_lora.main([
        "--task", "sft:train", "--dataset_base_path", str(cache), "--model_path", str(folders("t2v")),
        "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2", "--lora_rank", "4", "--max_steps", "2",
        "--lora_layout", "diffusers", "--output_path", str(tmp_path / "train"),
    ])
    split, unsplit = log_rows(tmp_path / "train"), log_rows(trained_lora)
    assert [(r["loss"], r["grad_norm"]) for r in split] == [(r["loss"], r["grad_norm"]) for r in unsplit]
    assert (tmp_path / "train" / "step-2.safetensors").read_bytes() == (trained_lora / "step-2.safetensors").read_bytes()
    assert {t.device.type for t in dsf.tree.tensors(trained["vae"]) + dsf.tree.tensors(trained["t5"])} == {"meta"}


def test_ti2v_cache_holds_the_first_frame(folders, dataset, tmp_path):
    cache = lora_run(folders("ti2v"), dataset, tmp_path / "cache", "--task", "sft:data_process")
    samples = [CachedDataset(cache)[i] for i in range(2)]
    assert sorted("first_frame" in sample for sample in samples) == [False, True]  # the image row has one frame


@pytest.mark.parametrize("flags, first_frame_clean", [((), True), (("--without_first_frame",), False)])
def test_ti2v_trains_videos_on_a_clean_first_frame_unless_told_not_to(folders, dataset, tmp_path, monkeypatch, flags,
                                                                      first_frame_clean):
    timesteps = []
    call = WanDiT.__call__

    def recording(self, params, latents, timestep, *args, **kwargs):
        timesteps.append(timestep.tolist())
        return call(self, params, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "__call__", recording)
    lora_run(folders("ti2v"), dataset, tmp_path, "--max_steps", "1", "--gradient_accumulation_steps", "2", *flags)
    video_steps = [t[0] for t in timesteps if isinstance(t[0], list)]  # per-frame σ: a video seen with its first frame
    assert len(timesteps) == 2 and (tmp_path / "step-1.safetensors").is_file()
    assert len(video_steps) == first_frame_clean
    assert all(steps[0] == 0.0 and min(steps[1:]) > 0 for steps in video_steps)


def test_t2v_with_the_trained_lora_writes_an_mp4(folders, trained_lora, tmp_path):
    out = tmp_path / "cat.mp4"
    wan_t2v.main(["--model_path", str(folders("t2v")), "--prompt", "a cat", "--negative_prompt", "blurry",
                  "--num_frames", "9", "--height", str(SIZE), "--width", str(2 * SIZE), "--num_inference_steps", "2",
                  "--max_sequence_length", str(TOKENS), "--dtype", "float32", "--device", "cpu", "--fp8", "dit",
                  "--lora", str(trained_lora / "step-2.safetensors"), "--out", str(out)])
    frames = read_video(out)
    assert len(frames) == 9 and frames[0].size == (2 * SIZE, SIZE)


def test_i2v_from_an_image_writes_an_mp4(folders, tmp_path):
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(tmp_path / "first.png")
    out = tmp_path / "green.mp4"
    wan_t2v.main(["--model_path", str(folders("i2v")), "--prompt", "a leaf", "--negative_prompt", "blurry",
                  "--image", str(tmp_path / "first.png"), "--num_frames", str(FRAMES), "--height", str(SIZE),
                  "--width", str(SIZE), "--num_inference_steps", "1", "--max_sequence_length", str(TOKENS),
                  "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert len(read_video(out)) == FRAMES


@pytest.mark.parametrize("variant, flags, message", [
    ("t2v-a14b", [], "two experts: train one at a time with --expert high_noise"),
    ("t2v", ["--expert", "low_noise"], "is not a Wan2.2 A14B folder"),
    ("t2v", ["--fp8_models", "vae"], r"--fp8_models takes components of \('dit', 't5', 'clip'\), got \['vae'\]"),
])
def test_bad_flags_name_the_problem(folders, dataset, tmp_path, variant, flags, message):
    with pytest.raises(ValueError, match=message):
        lora_run(folders(variant), dataset, tmp_path, "--max_steps", "1", *flags)


def test_a_row_without_video_or_image_is_named(folders, tmp_path):
    (tmp_path / "metadata.csv").write_text("clip,prompt\nx.mp4,a cat\n")
    with pytest.raises(ValueError, match="row 0 has the columns .*needs a 'prompt' and one of 'video'"):
        lora_run(folders("t2v"), tmp_path / "metadata.csv", tmp_path / "out", "--max_steps", "1")
