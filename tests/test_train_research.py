"""dsf.training.train for research: another optimizer and schedule, metrics from the loss, an EMA, all resumable."""

import csv
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import dsf
from dsf.models.digits import DigitsConfig, new_model
from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
from dsf.training import checkpoint, optim
from dsf.training.train import TrainConfig, train

TINY = DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1)
MAX_STEPS = 6


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    items = load_training_set(write_digits_folder(tmp_path_factory.mktemp("digits"), image_size=16, limit=32), image_size=16)
    return new_model(TINY, dsf.random.key(0)), items


def loss_with_metrics(model):
    loss = digits_loss(model)

    def loss_and_metrics(params, batch, key):
        value = loss(params, batch, key)
        return value, {"pixel_mean": batch["image"].float().mean(), "dit_sq_norm": sum(x.square().sum() for x in
                                                                                        dsf.tree.tensors(params["dit"]))}

    return loss_and_metrics


def sgd_cosine():
    return optim.sgd(optim.warmup(optim.cosine_decay(0.05, decay_steps=MAX_STEPS - 2), warmup_steps=2), momentum=0.9)


def run(digits, output_path, callback=None, optimizer=None, has_aux=True, **overrides):
    model, items = digits
    cfg = TrainConfig(max_steps=MAX_STEPS, checkpoint_steps=2, save_steps=2, ema=0.9, output_path=str(output_path),
                      progress=False)
    return train(loss_with_metrics(model) if has_aux else digits_loss(model), model.params,
                 data_stream(items, batch_size=4, key=dsf.random.key(1)), dataclasses.replace(cfg, **overrides),
                 key=dsf.random.key(2), where="^dit/", optimizer=optimizer or sgd_cosine(), has_aux=has_aux,
                 callback=callback)


def read_rows(output_path) -> list[dict]:
    with open(output_path / "log.csv", newline="") as file:
        return [{name: value for name, value in row.items() if name != "elapsed_seconds"} for row in csv.DictReader(file)]


def interrupt_at(step):
    def callback(current, params, loss):
        if current == step:
            raise KeyboardInterrupt

    return callback


def test_sgd_cosine_ema_and_metrics_resume_bit_identically(digits, tmp_path):
    full = run(digits, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(digits, tmp_path / "resumed", callback=interrupt_at(3))
    assert checkpoint.all_steps(tmp_path / "resumed" / "checkpoints") == [2]
    resumed = run(digits, tmp_path / "resumed", resume=True)

    for path, value in dsf.tree.select(full, "^dit/").items():
        assert torch.equal(value, dsf.tree.select(resumed, "^dit/")[path]), path
    rows = read_rows(tmp_path / "full")
    assert rows == read_rows(tmp_path / "resumed")
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "pixel_mean", "dit_sq_norm"]
    assert [row["step"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [float(row["lr"]) for row in rows] == [sgd_cosine().learning_rate(step) for step in range(1, 7)]
    assert len({row["pixel_mean"] for row in rows}) == 6 and len({row["dit_sq_norm"] for row in rows}) == 6

    for name in ("step-2", "step-4", "step-6", "step-2-ema", "step-4-ema", "step-6-ema"):
        in_full, in_resumed = load_file(tmp_path / "full" / f"{name}.safetensors"), load_file(tmp_path / "resumed" / f"{name}.safetensors")
        assert sorted(in_full) == sorted(in_resumed) and all(torch.equal(in_full[k], in_resumed[k]) for k in in_full), name
    states = [checkpoint.restore_state(tmp_path / run_name / "checkpoints") for run_name in ("full", "resumed")]
    assert all(state["step"] == 6 for state in states)
    for path, average in states[0]["ema"].items():
        assert torch.equal(average, states[1]["ema"][path]), path
    assert sorted(states[0]["optimizer"]) == ["momentum", "step"]
    for path, buffer in states[0]["optimizer"]["momentum"].items():
        assert torch.equal(buffer, states[1]["optimizer"]["momentum"][path]), path


def test_the_ema_is_the_moving_average_of_the_trained_leaves(digits, tmp_path):
    seen = []
    run(digits, tmp_path, callback=lambda step, params, loss: seen.append(dsf.tree.select(params, "^dit/")),
        save_steps=None, checkpoint_steps=None)
    expected = dict(dsf.tree.select(digits[0].params, "^dit/"))
    for leaves in seen:
        expected = {path: 0.9 * expected[path] + 0.1 * leaves[path] for path in expected}
    saved = load_file(tmp_path / f"step-{MAX_STEPS}-ema.safetensors")
    trained = load_file(tmp_path / f"step-{MAX_STEPS}.safetensors")
    assert set(saved) == {path.replace("/", ".") for path in expected}
    for path, average in expected.items():
        torch.testing.assert_close(saved[path.replace("/", ".")], average, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(saved[name], trained[name]) for name in saved)


def test_resuming_with_another_optimizer_is_refused(digits, tmp_path):
    run(digits, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="trained with the sgd optimizer, but this run uses lion"):
        run(digits, tmp_path, resume=True, optimizer=optim.lion(1e-4))
    with pytest.raises(ValueError, match="trained with the sgd optimizer, but this run uses default adamw"):
        model, items = digits
        cfg = TrainConfig(max_steps=4, checkpoint_steps=2, ema=0.9, output_path=str(tmp_path), progress=False, resume=True)
        train(loss_with_metrics(model), model.params, data_stream(items, 4, dsf.random.key(1)), cfg, key=dsf.random.key(2),
              where="^dit/", has_aux=True)
    with pytest.raises(ValueError, match="other settings: .*momentum.*0.9.*0.5"):
        run(digits, tmp_path, resume=True, optimizer=optim.sgd(optim.warmup(optim.cosine_decay(0.05, decay_steps=4), 2),
                                                                momentum=0.5))
    with pytest.raises(ValueError, match="ema 0.9 -> 0.99"):
        run(digits, tmp_path, resume=True, ema=0.99)


def test_metrics_must_keep_their_names_on_resume(digits, tmp_path):
    run(digits, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"metrics \[\] differ from the columns"):
        run(digits, tmp_path, resume=True, max_steps=3, has_aux=False)


def test_metrics_go_to_tensorboard(digits, tmp_path, monkeypatch):
    import dsf.training.train

    scalars = []

    class Recorder:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass

    monkeypatch.setattr(dsf.training.train, "_tensorboard_writer", lambda log_dir, purge_step: Recorder())
    run(digits, tmp_path, max_steps=1)
    assert sorted(scalars) == [(f"train/{name}", 1) for name in ("dit_sq_norm", "grad_norm", "loss", "lr", "pixel_mean")]


@pytest.mark.parametrize("bad_metrics, message", [
    ([1.0], "metrics a dict of named scalars"),
    ({"loss": 1.0}, "metric name 'loss' cannot be a log column"),
    ({"spread": torch.ones(2)}, "metric 'spread' must be a scalar"),
])
def test_bad_metrics_are_named(bad_metrics, message):
    def loss_fn(params, batch, key):
        return params["w"].square().sum(), bad_metrics

    with pytest.raises(ValueError, match=message):
        train(loss_fn, {"w": torch.ones(1)}, lambda position: iter([(1, None)]), TrainConfig(max_steps=1, progress=False),
              key=dsf.random.key(0), has_aux=True)


def test_an_optimizer_with_adamw_settings_in_the_config_is_refused():
    with pytest.raises(ValueError, match="TrainConfig sets learning_rate, warmup_steps, .*optimizer= replaces it"):
        train(lambda p, x, k: p["w"].sum(), {"w": torch.ones(1)}, lambda position: iter([(1, None)]),
              TrainConfig(learning_rate=0.1, warmup_steps=3, max_steps=1, progress=False), key=dsf.random.key(0),
              optimizer=optim.sgd(0.1))


def test_bad_ema_is_refused():
    with pytest.raises(ValueError, match="ema must be a decay in"):
        TrainConfig(ema=1.0)
