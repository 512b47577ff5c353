"""recipes/flux_lora.py under torchrun: 2 gloo ranks against one process, on the tiny FLUX.1 in BFL's layout.

Two ranks with --gradient_accumulation_steps 1 train on the batches of one process with 2, so
they write the same files: the LoRA, sharded or not (--shard), the whole DiT (--trainable_models dit
--shard), a LoRA over fp8 weights. The LoRA runs do the same arithmetic as the one process (a mean of
two gradients is exact, and loaded weights are aligned as gathered ones are), so they agree to the
last bit; the sharded full fine-tuning averages the DiT's gradients by reduce-scatter, whose last
bits AdamW may blow up in a few elements, so its files are compared by update (tests/updates.py). Rank 0 alone writes, saves and prints;
--shard splits the DiT alone, and every rank gets the trained params back whole. sft:data_process
encodes in rank 0 alone, and rank 0 downloads the hub files before the other rank looks for them.
All the 2-rank runs share one launch (tests/flux_lora_worker.py).
"""

from __future__ import annotations

import csv
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import flux_lora_worker as worker
from dsf.models import flux
from dsf.transforms import lora_trainable
from dsf.tree import flatten_dict, select
from tiny_flux import write_tiny_flux_bfl_files
from updates import assert_same_updates

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

SFT_RUNS = {  # name: (flags, the flags of the one-process reference)
    "lora": ((), ()),
    "lora, sharded": (("--shard", "--use_gradient_checkpointing"), ()),
    "full fine-tuning, sharded": (("--trainable_models", "dit", "--learning_rate", "1e-3", "--shard"),
                                  ("--trainable_models", "dit", "--learning_rate", "1e-3")),
    "lora over fp8, sharded": (("--fp8_models", "dit,t5,clip", "--shard"), ("--fp8_models", "dit,t5,clip")),
}
SHARDED = [name for name, (flags, _) in SFT_RUNS.items() if "--shard" in flags]
OTHER_ARITHMETIC = ("full fine-tuning, sharded",)  # gradients averaged by reduce-scatter, not by accumulation
HUB_FOLDERS = ("t5", "dit", "clip", "vae")
HUB_ORIGINS = ",".join(f"{worker.REPO}:{folder}/" for folder in HUB_FOLDERS)  # each file with its config.json


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_lora_distributed")
    hub = root / "hub"
    tiny = write_tiny_flux_bfl_files(hub / worker.REPO)
    return {"root": root, "hub": hub, "tiny": tiny, "digits": worker.write_digits(root / "digits")}


def data_process_argv(problem, output) -> list[str]:
    return [*worker.data_flags(problem["digits"]), *worker.model_flags(problem["tiny"], ("vae", "clip", "t5")),
            "--task", "sft:data_process", "--device", "cpu", "--output_path", str(output)]


@pytest.fixture(scope="module")
def ranks(problem):
    """What each of 2 ranks saw of every run, all in one launch."""
    two = problem["root"] / "two ranks"
    two.mkdir()
    runs = {name: (worker.sft_argv(problem["tiny"], problem["digits"], two / name, *flags), {})
            for name, (flags, _) in SFT_RUNS.items()}
    runs["data process"] = (data_process_argv(problem, two / "cache"), {})
    hub_argv = [*worker.data_flags(problem["digits"]), "--model_id_with_origin_paths", HUB_ORIGINS, "--lora_rank", "4",
                "--max_steps", "1", "--device", "cpu", "--output_path", str(two / "hub run")]
    runs["hub"] = (hub_argv, {"DSF_MODEL_BASE_PATH": str(two / "downloaded"), "DSF_SKIP_DOWNLOAD": "0"})
    return {"seen": worker.launch(runs, two, problem["hub"]), "outputs": two}


@pytest.fixture(scope="module")
def one_rank(problem):
    """The one-process references: each SFT run with --gradient_accumulation_steps 2, and the cache."""
    one = problem["root"] / "one rank"
    recipe = worker.load_recipe()
    returned = {}
    for name, (_, flags) in SFT_RUNS.items():
        argv = worker.sft_argv(problem["tiny"], problem["digits"], one / name, *flags, "--gradient_accumulation_steps", "2")
        returned[name] = recipe.main(argv)
    recipe.main(data_process_argv(problem, one / "cache"))
    return {"returned": returned, "outputs": one}


def log_rows(folder) -> list[dict]:
    with open(folder / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


def initial_dit(problem) -> dict[str, torch.Tensor]:
    """The tiny DiT before training, under the keys of a full fine-tuning's step file."""
    return flatten_dict(flux.load_dit(problem["tiny"]["dit"])[1])


def assert_same_training(trained: dict, reference: dict, name: str, initial) -> None:
    """Bit-equal where the runs do the same arithmetic; the same update from ``initial()`` where they do not."""
    if name in OTHER_ARITHMETIC:
        assert_same_updates(trained, reference, initial())
        return
    assert sorted(trained) == sorted(reference) and len(reference) > 0
    for key in reference:
        assert torch.equal(trained[key], reference[key]), key


@pytest.mark.parametrize("name", list(SFT_RUNS))
def test_two_ranks_write_the_files_of_one_rank_accumulating_two(problem, ranks, one_rank, name):
    two, one = ranks["outputs"] / name, one_rank["outputs"] / name
    files = load_file(two / "step-3.safetensors"), load_file(one / "step-3.safetensors")
    assert_same_training(*files, name, lambda: initial_dit(problem))
    rows, reference = log_rows(two), log_rows(one)
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    for row, expected in zip(rows, reference):
        assert float(row["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5)
        assert float(row["grad_norm"]) == pytest.approx(float(expected["grad_norm"]), rel=1e-4)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # log.csv, step-3.safetensors, checkpoints


@pytest.mark.parametrize("name", list(SFT_RUNS))
def test_every_rank_gets_the_trained_params_whole(problem, ranks, one_rank, name):
    trained = [seen[name]["returned"] for seen in ranks["seen"]]
    reference = select(one_rank["returned"][name], None)
    assert not any(params["sharded"] for params in trained)
    assert sorted(trained[0]["params"]) == sorted(reference)
    assert all(torch.equal(trained[0]["params"][p], trained[1]["params"][p]) for p in reference)
    changed = select(one_rank["returned"][name], lora_trainable if "lora" in name else "^dit/")
    as_file_keys = lambda tree: {p.removeprefix("dit/").removesuffix("/data").replace("/", "."): tree[p] for p in changed}  # noqa: E731
    assert_same_training(as_file_keys(trained[0]["params"]), as_file_keys(changed), name, lambda: initial_dit(problem))


@pytest.mark.parametrize("name", list(SFT_RUNS))
def test_rank_0_alone_saves_and_prints(ranks, name):
    rank0, rank1 = (seen[name] for seen in ranks["seen"])
    assert rank0["saved"] == ["step-3.safetensors"] and rank1["saved"] == []
    assert "trained 3 steps" in rank0["printed"] and rank1["printed"] == ""


def test_shard_splits_the_dit_alone(ranks):
    for seen in ranks["seen"]:
        for name in SFT_RUNS:
            assert seen[name]["sharded components"] == [["dit"] if name in SHARDED else []], name
    checkpoints = ranks["outputs"] / "full fine-tuning, sharded" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["rank-0-of-2", "rank-1-of-2"]  # the optimizer state, sharded too


def test_data_processing_runs_on_rank_0_alone(ranks, one_rank):
    rank0, rank1 = (seen["data process"] for seen in ranks["seen"])
    assert rank0["returned"] == rank1["returned"] == ranks["outputs"] / "cache"
    assert "cached 6 encoded samples" in rank0["printed"] and rank1["printed"] == ""
    two, one = ranks["outputs"] / "cache", one_rank["outputs"] / "cache"
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == ["index.json", "shard-00000.safetensors"]
    assert (two / "index.json").read_text() == (one / "index.json").read_text()
    first, second = load_file(two / "shard-00000.safetensors"), load_file(one / "shard-00000.safetensors")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_rank_0_downloads_the_hub_files_and_rank_1_finds_them(ranks, problem):
    rank0, rank1 = (seen["hub"] for seen in ranks["seen"])
    repo = problem["hub"] / worker.REPO
    wanted = [p for folder in (*HUB_FOLDERS, "tokenizer", "tokenizer_2") for p in (repo / folder).rglob("*") if p.is_file()]
    downloaded = sorted(name for call in rank0["downloads"] for name in call)
    assert downloaded == sorted(p.relative_to(repo).as_posix() for p in wanted) and len(downloaded) > 8
    assert all(call == [] for call in rank1["downloads"])  # it looked after rank 0 had downloaded them all
    assert rank0["saved"] == ["step-1.safetensors"] and rank1["saved"] == []
