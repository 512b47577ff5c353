"""recipes/qwen_image_lora.py end to end on a tiny Qwen-Image saved like the hub repo: LoRA training, the LoRA in
diffusers' QwenImagePipeline giving our pipeline's image, resumed and split runs bit-equal to the plain one, full
fine-tuning, fp8 base with block offload, model files recognized by their keys (--model_paths), and 2 gloo ranks
with --shard training as one process does."""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dsf
import dsf.training.paradigm

from dsf.model_parts.lora_files import read_lora
from dsf.models.qwen_image.pipeline import load_pipeline
from dsf.transforms import load_lora
from dsf.training import distributed
from dsf.transforms.lora import linear_weight_shapes

pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline  # noqa: E402
from tiny_qwen_image import write_tiny_qwen_image_pipeline  # noqa: E402
from updates import assert_same_updates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, TOKENS = 32, 16


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qwen_image_lora = load_recipe("qwen_image_lora")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub") / "Qwen-Image"
    write_tiny_qwen_image_pipeline(root)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dogs")
    Image.new("RGB", (40, 40), (200, 40, 40)).save(folder / "red.png")
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (40, 1, 3))).save(folder / "ramp.png")
    (folder / "metadata.csv").write_text("image,prompt\nred.png,a red dog\nramp.png,a blue sign that says hello\n")
    return folder / "metadata.csv"


def lora_run(model: Path, metadata: Path, output: Path, *flags: str):
    return qwen_image_lora.main([
        "--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata), "--model_path", str(model),
        "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2",
        "--lora_rank", "4", "--device", "cpu", "--output_path", str(output), *flags,
    ])


def log_rows(output: Path) -> list[dict]:
    with open(output / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


def lora_factors(repo: Path, path: Path) -> dict:
    return read_lora(path, linear_weight_shapes(load_pipeline(repo, max_sequence_length=TOKENS).dit_params))


def assert_same_lora(repo, a: Path, b: Path) -> None:
    first, second = lora_factors(repo, a), lora_factors(repo, b)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k].up, second[k].up) and torch.equal(first[k].down, second[k].down) for k in first)


@pytest.fixture(scope="module")
def trained(repo, dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("lora")
    lora_run(repo, dataset, output, "--max_steps", "2", "--lora_layout", "diffusers")
    return output


def test_a_trained_lora_in_diffusers_gives_our_image(repo, trained):
    assert [row["step"] for row in log_rows(trained)] == ["1", "2"]
    path = trained / "step-2.safetensors"
    with safe_open(str(path), framework="pt") as file:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_B.weight" in set(file.keys())
    ours = load_pipeline(repo, max_sequence_length=TOKENS)
    params = {**ours.params, "dit": load_lora(ours.dit_params, path)}
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = ours.decode(params, ours.denoise(params, "a red dog", noise=noise, height=SIZE, width=SIZE,
                                                 num_inference_steps=2, progress=False)) / 2 + 0.5
        plain = ours.decode(ours.params, ours.denoise(ours.params, "a red dog", noise=noise, height=SIZE, width=SIZE,
                                                      num_inference_steps=2, progress=False)) / 2 + 0.5
    reference = QwenImagePipeline.from_pretrained(repo)
    reference.load_lora_weights(str(path))
    with torch.no_grad():
        expected = reference(prompt="a red dog", negative_prompt=" ", true_cfg_scale=4.0, height=SIZE, width=SIZE,
                             num_inference_steps=2, max_sequence_length=TOKENS, output_type="pt",
                             latents=QwenImagePipeline._pack_latents(noise, 1, 16, SIZE // 8, SIZE // 8)).images
    assert float((image - expected).abs().max()) <= 1e-4
    assert float((plain - expected).abs().max()) > 1e-3  # the LoRA changed the image


def test_resumed_training_equals_the_uninterrupted_run(repo, dataset, trained, tmp_path):
    lora_run(repo, dataset, tmp_path, "--max_steps", "1", "--lora_layout", "diffusers")
    lora_run(repo, dataset, tmp_path, "--max_steps", "2", "--lora_layout", "diffusers", "--resume")
    assert [row["step"] for row in log_rows(tmp_path)] == ["1", "2"]
    assert_same_lora(repo, tmp_path / "step-2.safetensors", trained / "step-2.safetensors")


def test_split_training_equals_the_plain_run(repo, dataset, trained, tmp_path):
    lora_run(repo, dataset, tmp_path / "cache", "--task", "sft:data_process")
    qwen_image_lora.main([
        "--dataset_base_path", str(tmp_path / "cache"), "--model_path", str(repo), "--max_sequence_length", str(TOKENS),
        "--learning_rate", "1e-2", "--lora_rank", "4", "--device", "cpu", "--task", "sft:train", "--max_steps", "2",
        "--output_path", str(tmp_path / "train"),
    ])
    assert_same_lora(repo, tmp_path / "train" / "step-2.safetensors", trained / "step-2.safetensors")


def test_fp8_base_with_block_offload_trains(repo, dataset, tmp_path):
    lora_run(repo, dataset, tmp_path, "--max_steps", "1", "--fp8_models", "dit,text_encoder", "--offload_models", "dit,text_encoder",
             "--use_gradient_checkpointing", "--lora_layout", "kohya")
    factors = lora_factors(repo, tmp_path / "step-1.safetensors")
    untrained = [path for path, f in factors.items() if not f.up.any()]
    assert len(factors) == 2 * 12
    # the last block's text output is never read: its text query, text output projection and text MLP get no gradient
    assert untrained == [f"transformer_blocks/1/{m}/weight" for m in ("attn/add_q_proj", "attn/to_add_out", "txt_mlp/net/2")]


@pytest.mark.parametrize("flags, error", [
    (("--trainable_models", "dit", "--offload_models", "dit"), "--trainable_models dit trains the whole DiT, which --offload_models dit"),
    (("--offload_models", "vae"), r"--offload_models takes components of \('dit', 'text_encoder'\), got \['vae'\]"),
])
def test_offload_flags_that_cannot_work_are_refused(repo, dataset, tmp_path, flags, error):
    with pytest.raises(ValueError, match=error):
        lora_run(repo, dataset, tmp_path, *flags)


def test_full_fine_tuning_writes_a_dit_that_loads(repo, dataset, tmp_path):
    lora_run(repo, dataset, tmp_path, "--max_steps", "1", "--trainable_models", "dit")
    pipe = load_pipeline(repo, dit=tmp_path / "step-1.safetensors", dit_config={"axes_dims_rope": [4, 6, 6]},
                         max_sequence_length=TOKENS)
    base = load_pipeline(repo, max_sequence_length=TOKENS)
    changed = pipe.dit_params["transformer_blocks"][0]["attn"]["to_q"]["weight"]
    assert not torch.equal(changed, base.dit_params["transformer_blocks"][0]["attn"]["to_q"]["weight"])


def test_differential_lora_trains_over_the_preset_merged_into_the_base(repo, dataset, trained, tmp_path):
    lora_run(repo, dataset, tmp_path / "plain", "--max_steps", "1")
    lora_run(repo, dataset, tmp_path / "diff", "--max_steps", "1", "--preset_lora_path", str(trained / "step-2.safetensors"))
    plain, differential = log_rows(tmp_path / "plain"), log_rows(tmp_path / "diff")
    assert float(plain[0]["loss"]) != float(differential[0]["loss"])  # the same step sees another base
    preset = lora_factors(repo, trained / "step-2.safetensors")
    new = lora_factors(repo, tmp_path / "diff" / "step-1.safetensors")
    assert sorted(new) == sorted(preset)  # the file holds the new adapter only, not the preset merged into the base
    assert not any(torch.equal(new[k].up, preset[k].up) for k in new if preset[k].up.any())


def test_direct_distillation_matches_the_teachers_latents_through_the_sampler(repo, tmp_path):
    """The first step's loss is the MSE between the base student's sampled latents and the teacher image's latents."""
    from dsf.training.data import image_to_tensor

    pipe = load_pipeline(repo, max_sequence_length=TOKENS)
    teacher = pipe.generate(pipe.params, "a red dog", seed=1, num_inference_steps=3, cfg_scale=4.0, height=SIZE,
                            width=SIZE, progress=False)
    folder = tmp_path / "teacher"
    folder.mkdir()
    teacher.save(folder / "dog.png")
    (folder / "metadata.csv").write_text("image,prompt,seed,num_inference_steps,cfg_scale\ndog.png,a red dog,1,2,4\n")
    lora_run(repo, folder / "metadata.csv", tmp_path / "out", "--task", "direct_distill", "--max_steps", "1")
    with torch.no_grad():
        target = pipe.vae.encode(pipe.vae_params, image_to_tensor(Image.open(folder / "dog.png"))[None])
        student = pipe.denoise(pipe.params, "a red dog", seed=1, num_inference_steps=2, cfg_scale=4.0, height=SIZE,
                               width=SIZE, progress=False)
    expected = float((student - target).square().mean())
    assert float(log_rows(tmp_path / "out")[0]["loss"]) == pytest.approx(expected, rel=1e-5)
    factors = lora_factors(repo, tmp_path / "out" / "step-1.safetensors")
    assert any(f.up.any() for f in factors.values())


def test_t2i_recipe_applies_a_trained_lora_file(repo, trained, tmp_path):
    recipe = load_recipe("qwen_image_t2i")
    path = trained / "step-2.safetensors"
    recipe.main(["--model_path", str(repo), "--prompt", "a red dog", "--seed", "2", "--num_inference_steps", "2",
                 "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "--device", "cpu", "--lora", str(path),
                 "--out", str(tmp_path / "dog.png")])
    pipe = load_pipeline(repo)
    params = {**pipe.params, "dit": load_lora(pipe.dit_params, path)}
    expected = pipe.generate(params, "a red dog", seed=2, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    plain = pipe.generate(pipe.params, "a red dog", seed=2, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dog.png")), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(plain))


def model_file_flags(repo: Path) -> list[str]:
    """The tiny repo's three weight files as --model_paths (not in the recipe's order), with its tokenizer."""
    files = [repo / "vae" / "diffusion_pytorch_model.safetensors", repo / "text_encoder" / "model.safetensors",
             repo / "transformer" / "diffusion_pytorch_model.safetensors"]
    return ["--model_paths", json.dumps([str(path) for path in files]), "--tokenizer", str(repo / "tokenizer")]


def model_files_run(repo: Path, metadata: Path, output: Path, *flags: str):
    return qwen_image_lora.main([
        "--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata), *model_file_flags(repo),
        "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2",
        "--lora_rank", "4", "--device", "cpu", "--output_path", str(output), *flags,
    ])


def test_model_paths_recognizes_the_repos_files_by_their_keys(repo, dataset, trained, tmp_path):
    model_files_run(repo, dataset, tmp_path, "--max_steps", "2", "--lora_layout", "diffusers")
    assert_same_lora(repo, tmp_path / "step-2.safetensors", trained / "step-2.safetensors")


def test_model_paths_without_a_component_names_it(repo, dataset, tmp_path):
    flags = model_file_flags(repo)
    flags[1] = json.dumps(json.loads(flags[1])[:2])  # the VAE and the text encoder, no DiT
    with pytest.raises(ValueError, match="no DiT among --model_paths/--model_id_with_origin_paths"):
        qwen_image_lora.main(["--dataset_base_path", str(dataset.parent), "--dataset_metadata_path", str(dataset),
                              *flags, "--device", "cpu", "--output_path", str(tmp_path)])


def test_previews_are_sampled_with_the_trained_lora_and_leave_the_training_alone(repo, dataset, trained, tmp_path):
    lora_run(repo, dataset, tmp_path, "--max_steps", "2", "--lora_layout", "diffusers", "--validation_prompts", "a red dog",
             "--validation_steps", "2", "--validation_num_inference_steps", "2")
    assert sorted(str(p.relative_to(tmp_path / "validation")) for p in (tmp_path / "validation").rglob("*.png")) == [
        "step-2/0.png"]
    assert_same_lora(repo, tmp_path / "step-2.safetensors", trained / "step-2.safetensors")
    pipe = load_pipeline(repo, max_sequence_length=TOKENS)
    params = {**pipe.params, "dit": load_lora(pipe.dit_params, trained / "step-2.safetensors")}
    expected = pipe.generate(params, ["a red dog"], seed=0, num_inference_steps=2, height=SIZE, width=SIZE, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "validation" / "step-2" / "0.png")), np.asarray(expected[0]))
    with pytest.raises(ValueError, match="--task sft:train does not train with"):
        lora_run(repo, dataset, tmp_path / "cached", "--task", "sft:train", "--validation_prompts", "a red dog")


# ----------------------------------------------------------------------------- 2 gloo ranks

SHARDED_RUNS = {  # name: (the flags of the 2 ranks, the flags of the one-process reference)
    "lora": (("--shard",), ("--gradient_accumulation_steps", "2")),
    "lora, fp8 DiT streamed from the CPU": (("--shard", "--fp8_models", "dit", "--offload_models", "dit"),
                                           ("--gradient_accumulation_steps", "2", "--fp8_models", "dit",
                                            "--offload_models", "dit")),
    "full fine-tuning": (("--trainable_models", "dit", "--learning_rate", "1e-3", "--shard"),
                         ("--trainable_models", "dit", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2")),
}


def sharded_argv(repo: Path, metadata: Path, output: Path, *flags: str) -> list[str]:
    """The 2 images twice in batches of 1: 2 steps of 2 batches (2 ranks each accumulating 1, or 1 accumulating 2)."""
    return ["--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata), *model_file_flags(repo),
            "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(TOKENS), "--learning_rate", "1e-2",
            "--lora_rank", "4", "--num_epochs", "1", "--dataset_repeat", "2", "--batch_size", "1", "--lora_layout",
            "diffusers", "--device", "cpu", "--output_path", str(output), *flags]


def _rank_main(rank: int, port: int, folder: str, runs: dict) -> None:
    """One of 2 gloo ranks, as torchrun starts it: runs the recipe on each argv of ``runs`` and saves, per run, the
    components that trained sharded, whether the params it got back hold shards, and the trained DiT."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(backend="gloo", timeout=datetime.timedelta(seconds=120))
    train = dsf.training.paradigm.train
    try:
        seen = {}
        for name, argv in runs.items():
            trained_sharded = []

            def recording_train(loss, params, *args, **kwargs):
                leaves = dsf.tree.select(params, None)
                trained_sharded.append(sorted({p.split("/")[0] for p, leaf in leaves.items() if distributed.is_sharded(leaf)}))
                return train(loss, params, *args, **kwargs)

            dsf.training.paradigm.train = recording_train
            returned = qwen_image_lora.main(argv)
            seen[name] = {"trained sharded": trained_sharded, "returned sharded": distributed.holds_shards(returned),
                          "dit": {k: v.detach().clone() for k, v in dsf.tree.select(returned["dit"], None).items()}}
        torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dsf.training.paradigm.train = train
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(repo, dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two ranks")
    runs = {name: sharded_argv(repo, dataset, folder / name, *flags) for name, (flags, _) in SHARDED_RUNS.items()}
    threads = torch.get_num_threads()
    try:
        mp.spawn(_rank_main, args=(free_port(), str(folder), runs), nprocs=2)
    finally:
        torch.set_num_threads(threads)
    return {"outputs": folder, "seen": [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]}


def initial_tensors(repo: Path, metadata: Path, output: Path, *flags: str) -> dict[str, torch.Tensor]:
    """What the run of ``flags`` starts from, under its step file's keys: the file of a step at learning rate 0."""
    qwen_image_lora.main(sharded_argv(repo, metadata, output, *flags, "--learning_rate", "0", "--max_steps", "1"))
    return load_file(output / "step-1.safetensors")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
@pytest.mark.parametrize("name", list(SHARDED_RUNS))
def test_two_ranks_with_shard_train_as_one_process(repo, dataset, two_ranks, tmp_path, name):
    _, flags = SHARDED_RUNS[name]
    qwen_image_lora.main(sharded_argv(repo, dataset, tmp_path, *flags))
    two = two_ranks["outputs"] / name
    assert [row["step"] for row in log_rows(two)] == [row["step"] for row in log_rows(tmp_path)] == ["1", "2"]
    trained, reference = load_file(two / "step-2.safetensors"), load_file(tmp_path / "step-2.safetensors")
    initial = initial_tensors(repo, dataset, tmp_path / "initial", *flags)
    moved = [key for key in reference if not torch.equal(reference[key], initial[key])]
    assert sorted(trained) == sorted(reference) and len(moved) > len(reference) / 2
    assert all(torch.equal(trained[key], initial[key]) for key in reference if key not in moved)
    # a mean of gradients by another summation order (and, sharded, by reduce-scatter): the same updates, not the
    # same last bits
    assert_same_updates({k: trained[k] for k in moved}, {k: reference[k] for k in moved}, initial)
    rank0, rank1 = (seen[name] for seen in two_ranks["seen"])
    assert rank0["trained sharded"] == rank1["trained sharded"] == [["dit"]]  # --shard split the DiT alone
    assert not rank0["returned sharded"] and not rank1["returned sharded"]  # every rank gets the trained DiT back whole
    assert sorted(rank0["dit"]) == sorted(rank1["dit"])
    assert all(torch.equal(rank0["dit"][k], rank1["dit"][k]) for k in rank0["dit"])
