"""dsf.training.paradigm: a paradigm's one chain and one where=, and fit passing train's options through."""

from __future__ import annotations

import csv

import torch

import dsf
from dsf.ops import linear
from dsf.training import optim
from dsf.training.paradigm import DataFromParams, Paradigm, fit
from dsf.training.train import TrainConfig
from dsf.transforms import fp8, lora, lora_trainable


def ones(position):
    while True:
        yield position + 1, torch.ones(1, 4)


def test_data_from_params_sees_the_initialized_stack_and_fit_passes_optimizer_metrics_and_ema(tmp_path):
    params = {"dit": {"q": {"weight": torch.eye(4)}}, "text": {"w": torch.eye(4)}}
    paradigm = Paradigm("LoRA over fp8 text", dsf.chain(fp8(where=r"^text/", compute_dtype=torch.float32),
                                                        lora(2, where=r"^dit/")), lora_trainable)
    seen = []

    def encoded(initialized):
        seen.append(initialized["text"]["w"].data.dtype)
        return ones

    def loss(p, x, key):
        error = linear(x, dsf.materialize(p["dit"]["q"]["weight"])) - 2
        return error.square().mean(), {"error": error.mean()}

    config = TrainConfig(max_steps=3, progress=False, ema=0.5, output_path=str(tmp_path))
    trained = fit(paradigm, loss, params, DataFromParams(encoded), config, key=dsf.random.key(0),
                  optimizer=optim.sgd(0.1, momentum=0.0), has_aux=True)
    assert seen == [torch.float8_e4m3fn]
    assert sorted(dsf.tree.select(trained, lora_trainable)) == [
        "dit/q/weight/adapt/adapters/lora/down", "dit/q/weight/adapt/adapters/lora/up"]
    with open(tmp_path / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["1", "2", "3"] and all(row["error"] for row in rows)
    assert (tmp_path / "step-3-ema.safetensors").is_file()
