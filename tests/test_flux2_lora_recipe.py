"""recipes/flux2_lora.py end to end on tiny FLUX.2 repos laid out like the hub ones: text-to-image and editing
(reference images), split training, fp8 and block offload, the LoRA it writes loaded by diffusers' pipeline with the
same output, and its BFL-named (ComfyUI) file read back to the same LoRA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dsf
from dsf.models.flux2.pipeline import load_pipeline
from dsf.training.data import write_image_folder
from dsf.transforms import load_lora
from tiny_flux2 import write_tiny_flux2_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import Flux2KleinPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, LENGTH, ROWS = 32, 64, 2


def load_recipe():
    spec = importlib.util.spec_from_file_location("flux2_lora", ROOT / "recipes" / "flux2_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flux2_lora = load_recipe()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("FLUX.2-klein-base-tiny")
    write_tiny_flux2_pipeline(root, "klein-base")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Images, prompts, and an ``edit_image`` column naming another image of the folder as the reference."""
    folder = tmp_path_factory.mktemp("data")
    gen = np.random.default_rng(0)
    images = [gen.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(ROWS)]
    rows = [{"prompt": f"pattern {i}", "edit_image": f"images/{(i + 1) % ROWS:05d}.png"} for i in range(ROWS)]
    return write_image_folder(folder, images, rows)


def run(repo, data: Path, output: Path, *flags: str):
    argv = ["--model_path", str(repo), "--dataset_base_path", str(data.parent), "--dataset_metadata_path", str(data),
            "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(LENGTH), "--lora_rank", "4",
            "--max_steps", "2", "--learning_rate", "1e-2", "--device", "cpu", "--output_path", str(output), *flags]
    return flux2_lora.main(argv)


def test_sft_writes_a_lora_that_diffusers_loads_with_the_same_output(repo, data, tmp_path):
    run(repo, data, tmp_path / "out", "--lora_layout", "diffusers")
    lora_file = tmp_path / "out" / "step-2.safetensors"
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in load_file(lora_file))
    pipe = load_pipeline(repo, max_sequence_length=LENGTH)
    noise = pipe.noise(3, 1, SIZE, SIZE, pipe.params)
    options = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.0)
    params = {**pipe.params, "dit": load_lora(pipe.params["dit"], lora_file)}
    with torch.no_grad():
        ours = pipe.denoise(params, "pattern 0", noise=noise, progress=False, **options)
        plain = pipe.denoise(pipe.params, "pattern 0", noise=noise, progress=False, **options)
    reference = Flux2KleinPipeline.from_pretrained(repo)
    reference.load_lora_weights(str(lora_file))
    with torch.no_grad():
        raw = reference(prompt="pattern 0", latents=noise, max_sequence_length=LENGTH, output_type="latent", **options).images
    bn = reference.vae.bn
    theirs = (reference._patchify_latents(raw) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + reference.vae.config.batch_norm_eps)
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= 1e-4, error
    assert float((plain - theirs).abs().max() / theirs.abs().max()) > 100 * max(error, 1e-7)  # the LoRA is applied


def test_edit_training_with_reference_images_and_its_bfl_named_file(repo, data, tmp_path):
    """Editing trains with the reference latents in the DiT's input; the ComfyUI (BFL-named) file reads back exactly."""
    trained = run(repo, data, tmp_path / "edit", "--reference_columns", "edit_image", "--lora_layout", "comfyui")
    plain = run(repo, data, tmp_path / "t2i", "--lora_layout", "comfyui")
    file = load_file(tmp_path / "edit" / "step-2.safetensors")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in file
    assert "diffusion_model.single_blocks.0.linear1.lora_up.weight" in file
    pipe = load_pipeline(repo, max_sequence_length=LENGTH)
    back = dsf.weight.dense_tree(dsf.transforms.merge_lora(load_lora(pipe.params["dit"], tmp_path / "edit" / "step-2.safetensors")))
    merged = dsf.weight.dense_tree(dsf.transforms.merge_lora(trained["dit"]))
    flat_back, flat = dsf.tree.flatten_dict(back), dsf.tree.flatten_dict(merged)
    assert all(torch.allclose(flat_back[k], flat[k], rtol=1e-5, atol=1e-6) for k in flat)
    edited, text_only = (dsf.tree.flatten_dict(dsf.weight.dense_tree(dsf.transforms.merge_lora(t["dit"]))) for t in (trained, plain))
    assert any(not torch.allclose(edited[k], text_only[k]) for k in edited)  # the reference images changed what was learned


def test_split_training_equals_training_in_one_go_under_fp8_and_offload(repo, data, tmp_path):
    memory = ("--fp8_models", "text", "--offload_models", "dit,text", "--use_gradient_checkpointing")
    cache = run(repo, data, tmp_path / "cache", "--task", "sft:data_process", *memory)
    split = flux2_lora.main(["--model_path", str(repo), "--dataset_base_path", str(cache), "--task", "sft:train",
                             "--lora_rank", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--device", "cpu",
                             "--output_path", str(tmp_path / "split"), *memory])
    whole = run(repo, data, tmp_path / "whole", *memory)
    a, b = (load_file(tmp_path / name / "step-2.safetensors") for name in ("split", "whole"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert split is not None and whole is not None


def test_a_lora_trains_over_comfyuis_fp8mixed_dit_file(repo, data, tmp_path):
    """--dit a ComfyUI fp8mixed file: the blocks stay fp8 (at the file's scales) while a LoRA trains over them, and it
    is the LoRA trained over the same numbers stored in float32."""
    from comfy_fp8 import comfy_fp8
    from safetensors.torch import save_file

    from dsf.models import flux2
    from dsf.models.flux2 import keys

    _, base = flux2.load_dit(repo)
    bfl = {keys.COMFY_PREFIX + k: v.contiguous() for k, v in keys.ours_to_bfl(base).items()}
    tensors, metadata, dequantized = comfy_fp8(bfl, lambda key, t: t.ndim == 2 and "blocks." in key, "header")
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text((repo / "transformer" / "config.json").read_text())  # the sizes shapes cannot tell
    save_file(tensors, files / "flux2_fp8mixed.safetensors", metadata=metadata)
    save_file(dequantized, files / "flux2_dequantized.safetensors")
    trained = run(repo, data, tmp_path / "fp8", "--dit", str(files / "flux2_fp8mixed.safetensors"))
    run(repo, data, tmp_path / "float32", "--dit", str(files / "flux2_dequantized.safetensors"))
    stored = trained["dit"]["single_transformer_blocks"][0]["attn"]["to_qkv_mlp_proj"]["weight"]
    assert stored.data.dtype == torch.float8_e4m3fn and "adapt" in stored.stages
    over_fp8, over_float32 = (load_file(tmp_path / name / "step-2.safetensors") for name in ("fp8", "float32"))
    assert over_fp8.keys() == over_float32.keys() and all(torch.equal(over_fp8[k], over_float32[k]) for k in over_fp8)


def test_full_fine_tuning_writes_a_dit_that_loads_and_a_preset_lora_is_merged_first(repo, data, tmp_path):
    from dsf.models import flux2
    from dsf.transforms import lora, save_lora

    pipe = load_pipeline(repo, max_sequence_length=LENGTH)
    run(repo, data, tmp_path / "full", "--trainable_models", "dit", "--max_steps", "1")
    dit, params = flux2.load_dit(tmp_path / "full" / "step-1.safetensors", config={"axes_dims_rope": [4, 4, 4, 4]})
    assert dit.config == pipe.dit.config
    before, after = dsf.tree.flatten_dict(pipe.params["dit"]), dsf.tree.flatten_dict(params)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)

    preset = lora(rank=2, targets="img_in").init(pipe.params["dit"], dsf.random.key(9))
    preset = dsf.tree.map_with_path(lambda p, x: torch.randn_like(x) if p.endswith("/up") else x, preset)
    save_lora(preset, tmp_path / "preset.safetensors", "comfyui")
    with_preset = run(repo, data, tmp_path / "preset", "--preset_lora_path", str(tmp_path / "preset.safetensors"),
                      "--max_steps", "1")
    base = dsf.tree.flatten_dict(dsf.weight.dense_tree(with_preset["dit"]))["x_embedder.weight"]
    merged = dsf.tree.flatten_dict(dsf.weight.dense_tree(dsf.transforms.merge_lora(preset)))["x_embedder.weight"]
    assert torch.allclose(base, merged, atol=1e-6)  # the base it trained on is the preset merged (x_embedder: not trained)
    assert not torch.allclose(base, before["x_embedder.weight"], atol=1e-3)


def test_direct_distill_matches_the_student_sampler(repo, tmp_path):
    import csv

    columns = [{"seed": 11, "num_inference_steps": 2, "cfg_scale": 1}, {"seed": 12, "num_inference_steps": 3, "cfg_scale": 2}]
    gen = np.random.default_rng(1)
    images = [gen.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in columns]
    metadata = write_image_folder(tmp_path / "teacher", images, [{"prompt": f"pattern {i}", **c} for i, c in enumerate(columns)])
    argv = ["--model_path", str(repo), "--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata),
            "--max_sequence_length", str(LENGTH), "--lora_rank", "4", "--max_steps", "2", "--batch_size", "2",
            "--device", "cpu", "--task", "direct_distill", "--output_path", str(tmp_path / "out")]
    flux2_lora.main(argv)
    with open(tmp_path / "out" / "log.csv") as file:
        first_loss, second_loss = (float(row["loss"]) for row in csv.DictReader(file))
    assert first_loss != second_loss
    pipe = load_pipeline(repo, max_sequence_length=LENGTH)
    errors = []
    with torch.no_grad():
        for i, column in enumerate(columns):
            image = torch.from_numpy(images[i]).permute(2, 0, 1).float()[None] / 127.5 - 1
            target = pipe.vae.encode(pipe.vae_params, image)
            student = pipe.denoise(pipe.params, f"pattern {i}", seed=column["seed"], height=SIZE, width=SIZE,
                                   num_inference_steps=column["num_inference_steps"], guidance_scale=column["cfg_scale"],
                                   progress=False)
            errors.append((student - target).square().mean())
    assert first_loss == pytest.approx(float(sum(errors) / 2), rel=1e-5)
    with pytest.raises(ValueError, match="direct_distill trains at the teacher images' own size"):
        flux2_lora.main([*argv, "--height", "48", "--width", "48"])


def diffusers_files(repo: Path, folder: str):
    """The safetensors of one component folder of the tiny repo: a file, or a list of shards (one model)."""
    files = sorted(str(p) for p in (repo / folder).glob("*.safetensors"))
    return files[0] if len(files) == 1 else files


def test_model_paths_are_recognized_by_their_keys_and_train_as_the_pipeline_folder_does(repo, data, tmp_path):
    import json

    listed = [diffusers_files(repo, folder) for folder in ("vae", "text_encoder", "transformer")]  # any order
    files = ("--model_paths", json.dumps(listed), "--tokenizer", str(repo / "tokenizer"))
    argv = [*files, "--dataset_base_path", str(data.parent), "--dataset_metadata_path", str(data), "--height", str(SIZE),
            "--width", str(SIZE), "--max_sequence_length", str(LENGTH), "--lora_rank", "4", "--max_steps", "2",
            "--learning_rate", "1e-2", "--device", "cpu", "--lora_layout", "diffusers"]
    flux2_lora.main([*argv, "--output_path", str(tmp_path / "files")])
    run(repo, data, tmp_path / "folder", "--lora_layout", "diffusers")
    a, b = (load_file(tmp_path / name / "step-2.safetensors") for name in ("files", "folder"))
    assert sorted(a) == sorted(b) and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    without_text = json.dumps(listed[::2])
    with pytest.raises(ValueError, match="no text encoder among --model_paths/--model_id_with_origin_paths"):
        flux2_lora.main([*argv, "--model_paths", without_text, "--output_path", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="pass --tokenizer"):
        flux2_lora.main([*argv[4:], "--model_paths", json.dumps(listed), "--output_path", str(tmp_path / "none")])


SHARDED_RUNS = {  # name: flags of a run on 2 gloo ranks with --shard, and of its one-process reference
    "lora": ("--lora_layout", "diffusers"),
    "full fine-tuning": ("--trainable_models", "dit", "--learning_rate", "1e-3"),
}


def sharded_rank(rank: int, port: int, folder: str, runs: dict) -> None:
    """One of 2 gloo ranks (the variables torchrun sets): the recipe's ``main`` on each argv of ``runs``; what it
    returned, as plain tensors, goes to ``folder/rank{rank}.pt``."""
    import datetime
    import os

    import torch.distributed as dist

    from dsf.training import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(backend="gloo", timeout=datetime.timedelta(seconds=300))
    try:
        returned = {}
        for name, argv in runs.items():
            trained = flux2_lora.main(argv)
            returned[name] = {p: t.detach().clone() for p, t in dsf.tree.select(trained, None).items()}
        torch.save(returned, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_shard_train_as_one_process_accumulating_two(repo, data, tmp_path):
    """2 ranks with --shard (the DiT split over them), each taking 1 batch a step, make the updates of one process
    with --gradient_accumulation_steps 2: the same files; every rank gets the trained params back whole."""
    import os
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    from updates import assert_same_updates

    if not dist.is_available():
        pytest.skip("torch.distributed is unavailable")

    def argv(name, output, *flags):  # the 2 rows twice, in batches of 1: 2 steps of 2 batches
        return ["--model_path", str(repo), "--dataset_base_path", str(data.parent), "--dataset_metadata_path", str(data),
                "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(LENGTH), "--lora_rank", "4",
                "--dataset_repeat", "2", "--batch_size", "1", "--learning_rate", "1e-2", "--device", "cpu",
                "--output_path", str(output / name), *SHARDED_RUNS[name], *flags]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = {name: argv(name, tmp_path / "two", "--shard") for name in SHARDED_RUNS}
    mp.spawn(sharded_rank, args=(port, str(tmp_path), runs), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    one = {name: flux2_lora.main(argv(name, tmp_path / "one", "--gradient_accumulation_steps", "2")) for name in SHARDED_RUNS}

    initial = dsf.tree.flatten_dict(load_pipeline(repo, max_sequence_length=LENGTH).params["dit"])
    for name in SHARDED_RUNS:
        two_file, one_file = (load_file(tmp_path / side / name / "step-2.safetensors") for side in ("two", "one"))
        if name == "lora":  # the same arithmetic as the one process: bit-equal
            assert sorted(two_file) == sorted(one_file) and all(torch.equal(two_file[k], one_file[k]) for k in one_file)
        else:  # gradients averaged by reduce-scatter, whose last bits AdamW may blow up in a few elements
            assert_same_updates(two_file, one_file, initial)
        reference = dsf.tree.select(one[name], None)
        assert sorted(ranks[0][name]) == sorted(reference)
        assert all(torch.equal(ranks[0][name][p], ranks[1][name][p]) for p in reference)  # whole, the same on both
    assert sorted(os.listdir(tmp_path / "two" / "full fine-tuning" / "checkpoints")) == ["rank-0-of-2", "rank-1-of-2"]


@pytest.mark.parametrize("flags, error", [
    (("--validation_prompts", "a cat", "--task", "sft:train"), "samples with the VAE and the text encoder, which --task sft:train"),
    (("--offload_models", "vae"), r"--offload_models takes components of \('dit', 'text'\), got \['vae'\]"),
])
def test_flags_that_cannot_work_together_are_refused(repo, flags, error):
    args = flux2_lora.parser().parse_args(["--model_path", str(repo), "--dataset_base_path", "d",
                                           "--dataset_metadata_path", "m.csv", *flags])
    with pytest.raises(ValueError, match=error):
        flux2_lora.check_flags(args)


def test_validation_previews_sample_through_the_training_chain(repo, data, tmp_path):
    run(repo, data, tmp_path / "plain", "--lora_layout", "diffusers")
    run(repo, data, tmp_path / "previewed", "--lora_layout", "diffusers", "--validation_prompts", "pattern 0", "pattern 1",
        "--validation_steps", "1", "--validation_num_inference_steps", "2")
    folder = tmp_path / "previewed" / "validation"
    assert sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png")) == [
        "step-1/0.png", "step-1/1.png", "step-2/0.png", "step-2/1.png"]
    assert Image.open(folder / "step-2" / "0.png").size == (SIZE, SIZE)
    trained = [load_file(tmp_path / name / "step-2.safetensors") for name in ("plain", "previewed")]
    assert all(torch.equal(trained[0][key], trained[1][key]) for key in trained[0])  # previews cost no randomness
