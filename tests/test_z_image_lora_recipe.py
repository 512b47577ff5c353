"""recipes/z_image_lora.py end to end on a tiny Z-Image laid out like the hub repo and a folder of digit images;
its LoRA loads into diffusers' ZImagePipeline with the same output. The model files given as --model_paths or
--model_id_with_origin_paths are recognized by their keys; --task direct_distill trains through the few-step
sampler; under torchrun (2 gloo ranks here) --shard trains what one process accumulating 2 batches trains."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

import dsf
from dsf.model_parts.lora_files import detect_lora_layout
from dsf.models import z_image
from dsf.models.digits.training import digit_images
from dsf.models.z_image.pipeline import load_pipeline
from dsf.training import distributed
from dsf.training.data import write_image_folder
from dsf.transforms import load_lora
from dsf.transforms.offload import count_transfers
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


def hub_environment(hub) -> dict[str, str]:
    """The hub is the local folder ``hub``, never the network."""
    return {"DSF_MODEL_BASE_PATH": str(hub), "DSF_SKIP_DOWNLOAD": "1"}


def recipe_argv(metadata: Path, output: Path, *flags: str, model=("--model_id", REPO)) -> list[str]:
    argv = ["--dataset_base_path", str(metadata.parent), *model, "--height", str(SIZE), "--width", str(SIZE),
            "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2", "--lora_rank", "4", "--max_steps", "3",
            "--output_path", str(output), *flags]
    if "sft:train" not in flags:
        argv += ["--dataset_metadata_path", str(metadata)]
    return argv


def run(hub, metadata: Path, output: Path, *flags: str, monkeypatch, model=("--model_id", REPO)):
    for name, value in hub_environment(hub).items():
        monkeypatch.setenv(name, value)
    return z_image_lora.main(recipe_argv(metadata, output, *flags, model=model))


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


def test_block_offload_of_the_dit_and_qwen3_trains_the_same_lora(hub, digits, sft_run, tmp_path, monkeypatch):
    """--offload_models streams the DiT and Qwen3 from the CPU one block at a time: the same numbers, bit for bit."""
    with count_transfers() as moved:
        run(hub, digits, tmp_path, "--lora_layout", "diffusers", "--offload_models", "dit,text_encoder",
            monkeypatch=monkeypatch)
    assert moved.blocks, "nothing was streamed"
    offloaded, resident = (load_file(folder / "step-3.safetensors") for folder in (tmp_path, sft_run[0]))
    assert offloaded.keys() == resident.keys() and all(torch.equal(offloaded[k], resident[k]) for k in resident)


def test_split_training_gives_the_unsplit_losses(hub, digits, sft_run, tmp_path, monkeypatch):
    cache = run(hub, digits, tmp_path / "cache", "--task", "sft:data_process", monkeypatch=monkeypatch)
    run(hub, cache / "index.json", tmp_path / "train", "--task", "sft:train", "--lora_layout", "diffusers",
        monkeypatch=monkeypatch)
    unsplit, split = log_rows(sft_run[0]), log_rows(tmp_path / "train")
    assert [(r["loss"], r["grad_norm"]) for r in split] == [(r["loss"], r["grad_norm"]) for r in unsplit]


# ----------------------------------------------------------------------------- model files recognized by their keys


def test_model_paths_are_recognized_by_their_keys(hub, digits, sft_run, tmp_path, monkeypatch):
    """The tiny repo's component folders, in any order, as --model_paths (the tokenizer found beside the text
    encoder) or as --model_id_with_origin_paths (the tokenizer from the repo), train as --model_id does."""
    folders = [str(hub / REPO / name) for name in ("vae", "text_encoder", "transformer")]
    run(hub, digits, tmp_path / "paths", "--lora_layout", "diffusers", monkeypatch=monkeypatch,
        model=("--model_paths", json.dumps(folders)))
    origins = ",".join(f"{REPO}:{name}/" for name in ("text_encoder", "transformer", "vae"))
    run(hub, digits, tmp_path / "origins", "--lora_layout", "diffusers", monkeypatch=monkeypatch,
        model=("--model_id_with_origin_paths", origins))
    expected = load_file(sft_run[0] / "step-3.safetensors")
    for output in ("paths", "origins"):
        assert [r["loss"] for r in log_rows(tmp_path / output)] == [r["loss"] for r in log_rows(sft_run[0])]
        trained = load_file(tmp_path / output / "step-3.safetensors")
        assert sorted(trained) == sorted(expected) and all(torch.equal(trained[k], expected[k]) for k in expected)


@pytest.mark.parametrize("model, message", [
    (lambda hub: ("--model_paths", json.dumps([str(hub / REPO / "transformer"), str(hub / REPO / "vae")])),
     (r"no Qwen3 among --model_paths/--model_id_with_origin_paths: found DiT \(.*\), VAE \(.*\); add the Qwen3's file "
      r"\(Z-Image's qwen_3_4b.safetensors\)")),
    (lambda hub: ("--model_paths", json.dumps([str(hub / REPO / "vae")]), "--model_id", REPO),
     r"--model_paths/--model_id_with_origin_paths list every model file; drop --model_id"),
])
def test_model_file_errors_name_the_fix(hub, digits, tmp_path, monkeypatch, model, message):
    with pytest.raises(ValueError, match=message):
        run(hub, digits, tmp_path, monkeypatch=monkeypatch, model=model(hub))


def test_a_text_encoder_without_its_tokenizer_beside_it_needs_tokenizer(hub, digits, tmp_path, monkeypatch):
    qwen = shutil.copytree(hub / REPO / "text_encoder", tmp_path / "qwen")
    files = ("--model_paths", json.dumps([str(hub / REPO / "transformer"), str(hub / REPO / "vae"), str(qwen)]))
    with pytest.raises(ValueError, match=r"no Z-Image tokenizer: the text encoder qwen has no tokenizer/ folder beside "
                                         r"it; pass --tokenizer"):
        run(hub, digits, tmp_path / "refused", monkeypatch=monkeypatch, model=files)
    run(hub, digits, tmp_path / "out", "--max_steps", "1", monkeypatch=monkeypatch,
        model=(*files, "--tokenizer", str(hub / REPO / "tokenizer")))
    assert (tmp_path / "out" / "step-1.safetensors").is_file()


# ----------------------------------------------------------------------------- direct distillation

TEACHER_STEPS, STUDENT_STEPS = 8, 2


@pytest.fixture(scope="module")
def teacher_images(hub, tmp_path_factory) -> Path:
    """Two images of the tiny model's 8-step sampler, with the seed and step count the student samples with."""
    pipe = load_pipeline(hub / REPO, max_sequence_length=TOKENS)
    rows = [{"prompt": f"a digit {WORDS[i]}", "seed": 20 + i, "num_inference_steps": STUDENT_STEPS, "cfg_scale": 1}
            for i in range(2)]
    images = [np.asarray(pipe.generate(pipe.params, row["prompt"], seed=row["seed"], num_inference_steps=TEACHER_STEPS,
                                       height=SIZE, width=SIZE, progress=False)) for row in rows]
    return write_image_folder(tmp_path_factory.mktemp("teacher"), images, rows)


def test_direct_distill_lowers_the_students_loss(hub, teacher_images, tmp_path, monkeypatch):
    """The student's 2-step samples move towards the teacher's 8-step images: the loss, the MSE of the latents,
    first equals the one computed by sampling directly, and falls as the LoRA trains through the sampler."""
    run(hub, teacher_images, tmp_path / "out", "--task", "direct_distill", "--batch_size", "2", "--max_steps", "6",
        monkeypatch=monkeypatch)
    losses = [float(row["loss"]) for row in log_rows(tmp_path / "out")]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]

    pipe = load_pipeline(hub / REPO, max_sequence_length=TOKENS)
    dataset = z_image_lora.image_folder(z_image_lora.parser().parse_args(
        recipe_argv(teacher_images, tmp_path, model=())))(1)
    errors = []
    with torch.no_grad():
        for item in (dataset[0], dataset[1]):
            target = pipe.vae.encode(pipe.params["vae"], item["image"][None])
            student = pipe.denoise(pipe.params, item["prompt"], seed=int(item["seed"]), height=SIZE, width=SIZE,
                                   num_inference_steps=STUDENT_STEPS, progress=False)
            errors.append((student - target).square().mean())
    assert losses[0] == pytest.approx(float(sum(errors) / 2), rel=1e-5)
    with pytest.raises(ValueError, match=r"teacher images' own size.*\(32x32\) would become 48x48"):
        run(hub, teacher_images, tmp_path / "resized", "--task", "direct_distill", "--height", "48", "--width", "48",
            monkeypatch=monkeypatch)


# ----------------------------------------------------------------------------- two processes (torchrun)

WORLD_SIZE = 2


def _rank_main(rank: int, port: int, folder: str, argv: list[str], env: dict) -> None:
    """One gloo rank of the job, set up as torchrun sets it; what it saw goes to ``folder/rank{r}.pt``."""
    from flux_lora_worker import run_recipe

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(backend="gloo")
    try:
        seen = run_recipe(load_recipe(), argv, env, Path(env["DSF_MODEL_BASE_PATH"]))
        torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_sharded_ranks_train_as_one_process_accumulating_two(hub, digits, tmp_path, monkeypatch):
    """2 ranks with --shard, each on its half of every step's 2 batches, write the LoRA of one process with
    --gradient_accumulation_steps 2; the DiT alone is sharded, rank 0 alone saves and prints, and both ranks get
    the trained params back whole."""
    from flux_lora_worker import _free_port

    flags = ("--batch_size", "1", "--max_steps", "2", "--lora_layout", "diffusers", "--device", "cpu")  # 4 rows: 2 steps
    two = recipe_argv(digits, tmp_path / "two", *flags, "--shard")
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path), two, hub_environment(hub)), nprocs=WORLD_SIZE)
    seen = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    reference = run(hub, digits, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2", monkeypatch=monkeypatch)

    files = load_file(tmp_path / "two" / "step-2.safetensors"), load_file(tmp_path / "one" / "step-2.safetensors")
    assert sorted(files[0]) == sorted(files[1]) and len(files[1]) > 0
    assert all(torch.equal(files[0][key], files[1][key]) for key in files[1])
    for row, expected in zip(log_rows(tmp_path / "two"), log_rows(tmp_path / "one"), strict=True):
        assert float(row["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5)
    assert [s["sharded components"] for s in seen] == [[["dit"]], [["dit"]]]
    assert [s["saved"] for s in seen] == [["step-2.safetensors"], []]
    assert "trained 2 steps" in seen[0]["printed"] and seen[1]["printed"] == ""
    whole = [s["returned"] for s in seen]
    assert not any(params["sharded"] for params in whole)
    expected = dsf.tree.select(reference, None)
    assert sorted(whole[0]["params"]) == sorted(expected)
    assert all(torch.equal(whole[0]["params"][p], whole[1]["params"][p]) for p in expected)


# ----------------------------------------------------------------------------- previews


def test_validation_previews_sample_through_the_training_chain(hub, digits, sft_run, tmp_path, monkeypatch):
    run(hub, digits, tmp_path, "--lora_layout", "diffusers", "--validation_prompts", "a digit one", "a digit two",
        "--validation_steps", "2", "--validation_num_inference_steps", "2", monkeypatch=monkeypatch)
    folder = tmp_path / "validation"
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png")) == [
        "step-2/0.png", "step-2/1.png", "step-3/0.png", "step-3/1.png"]  # every 2 steps, and at the last
    assert Image.open(folder / "step-2" / "0.png").size == (SIZE, SIZE)
    assert [row["loss"] for row in log_rows(tmp_path)] == [row["loss"] for row in log_rows(sft_run[0])]
    with pytest.raises(ValueError, match="samples with the VAE and Qwen3, which --task sft:train does not run"):
        run(hub, digits, tmp_path / "refused", "--task", "sft:train", "--validation_prompts", "a digit one",
            monkeypatch=monkeypatch)
