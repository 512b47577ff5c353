"""dsf.training.train: a tiny MLP regression trained, accumulated, resumed, interrupted and saved."""

import contextlib
import csv
import dataclasses
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dsf
from damage import flip_a_stored_byte_of
from dsf.training import checkpoint
from dsf.training.train import TrainConfig, step_key, train
from updates import assert_same_updates

NUM_SAMPLES = 32
TRAINED = r"^layers/"
TRAINED_KEYS = {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}


def make_samples() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(NUM_SAMPLES, 2, generator=torch.Generator().manual_seed(0))
    return inputs, torch.sin(2 * inputs[:, :1]) + 0.5 * inputs[:, 1:]


INPUTS, TARGETS = make_samples()


def init_params() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_scale": torch.tensor([1.0, 0.5]),
        "layers": [
            {"weight": 0.5 * torch.randn(16, 2, generator=generator), "bias": torch.zeros(16)},
            {"weight": 0.25 * torch.randn(1, 16, generator=generator), "bias": torch.zeros(1)},
        ],
    }


def mlp(params, x):
    hidden = torch.tanh((x * params["input_scale"]) @ params["layers"][0]["weight"].T + params["layers"][0]["bias"])
    return hidden @ params["layers"][1]["weight"].T + params["layers"][1]["bias"]


def plain_loss(params, batch, key):
    inputs, targets = batch
    return ((mlp(params, inputs) - targets) ** 2).mean()


def noisy_loss(params, batch, key):
    inputs, targets = batch
    return plain_loss(params, (inputs + 0.05 * dsf.random.normal(key, inputs.shape), targets), key)


def samples(batch_size: int, inputs=INPUTS, targets=TARGETS):
    """A resumable stream: the position is the number of samples drawn so far."""

    def data(position):
        while True:
            indices = torch.arange(position, position + batch_size) % NUM_SAMPLES
            position += batch_size
            yield position, (inputs[indices], targets[indices])

    return data


def config(**overrides) -> TrainConfig:
    defaults = dict(learning_rate=1e-2, weight_decay=0.0, max_steps=6, progress=False)
    return TrainConfig(**{**defaults, **overrides})


def recorder():
    """A callback keeping (step, loss, copy of the trained leaves), and the list it fills."""
    seen = []

    def callback(step, params, loss):
        seen.append((step, loss, {k: v.clone() for k, v in dsf.tree.select(params, TRAINED).items()}))

    return callback, seen


def read_log(output_path) -> list[dict]:
    with open(os.path.join(output_path, "log.csv"), newline="") as file:
        return list(csv.DictReader(file))


def test_loss_decreases_and_frozen_leaves_stay():
    params = init_params()
    trained = train(plain_loss, params, samples(8), config(max_steps=100, learning_rate=2e-2), where=TRAINED, key=dsf.random.key(0))
    assert plain_loss(trained, (INPUTS, TARGETS), None) < 0.1 * plain_loss(params, (INPUTS, TARGETS), None)
    assert trained["input_scale"] is params["input_scale"]
    assert torch.equal(params["input_scale"], torch.tensor([1.0, 0.5]))
    assert not torch.equal(trained["layers"][0]["weight"], params["layers"][0]["weight"])


def test_frozen_leaves_get_no_gradient():
    seen_requires_grad = []

    def loss_fn(params, batch, key):
        seen_requires_grad.append((params["input_scale"].requires_grad, params["layers"][0]["weight"].requires_grad))
        return plain_loss(params, batch, key)

    train(loss_fn, init_params(), samples(4), config(max_steps=2), where=TRAINED, key=dsf.random.key(0))
    assert seen_requires_grad == [(False, True), (False, True)]


def test_a_step_frees_its_gradients_before_the_next_step_computes_new_ones(monkeypatch):
    import weakref

    import dsf.training.train

    previous, alive_at_next_loss = [], []
    value_and_grad = dsf.training.train.value_and_grad

    def recording(f, where=None, has_aux=False):
        def loss_and_grads(params, *args):
            alive_at_next_loss.append(sum(ref() is not None for ref in previous))
            loss, grads = value_and_grad(f, where=where, has_aux=has_aux)(params, *args)
            previous[:] = [weakref.ref(g) for g in dsf.tree.tensors(grads)]
            return loss, grads

        return loss_and_grads

    monkeypatch.setattr(dsf.training.train, "value_and_grad", recording)
    train(plain_loss, init_params(), samples(4), config(max_steps=3, max_grad_norm=None), where=TRAINED, key=dsf.random.key(0))
    assert alive_at_next_loss == [0, 0, 0] and len(previous) == 4


def test_accumulating_two_samples_equals_one_batch_of_two():
    results = []
    for batch_size, accumulation in ((1, 2), (2, 1)):
        callback, seen = recorder()
        cfg = config(max_steps=3, gradient_accumulation_steps=accumulation, max_grad_norm=0.05, weight_decay=0.1)
        trained = train(plain_loss, init_params(), samples(batch_size), cfg, where=TRAINED, key=dsf.random.key(0), callback=callback)
        results.append(([loss for _, loss, _ in seen], dsf.tree.select(trained, TRAINED)))
    (accumulated_losses, accumulated), (batch_losses, batched) = results
    assert accumulated_losses == pytest.approx(batch_losses, rel=1e-6)
    assert_same_updates(accumulated, batched, dsf.tree.select(init_params(), TRAINED))
    assert not torch.equal(batched["layers/1/weight"], init_params()["layers"][1]["weight"])


def test_loss_gets_the_key_of_each_step_and_micro_batch():
    keys = []

    def loss_fn(params, batch, key):
        keys.append(key)
        return plain_loss(params, batch, key)

    base = dsf.random.key(7)
    train(loss_fn, init_params(), samples(2), config(max_steps=2, gradient_accumulation_steps=2), where=TRAINED, key=base)
    assert keys == [step_key(base, step, micro) for step in (1, 2) for micro in (0, 1)]
    assert len(set(keys)) == 4


def test_compute_dtype_runs_the_loss_under_autocast():
    dtypes = []

    def loss_fn(params, batch, key):
        dtypes.append((batch[0] @ params["layers"][0]["weight"].T).dtype)
        return plain_loss(params, batch, key)

    cfg = config(max_steps=1, compute_dtype=torch.bfloat16)
    trained = train(loss_fn, init_params(), samples(4), cfg, where=TRAINED, key=dsf.random.key(0))
    assert dtypes == [torch.bfloat16]
    assert trained["layers"][0]["weight"].dtype == torch.float32


def test_autocast_runs_on_the_device_offloaded_weights_compute_on(monkeypatch):
    from dsf.transforms.offload import Fetch

    devices = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: devices.append(device_type) or contextlib.nullcontext())
    params = init_params()
    params["streamed"] = dsf.Weight(torch.ones(2)).with_stage(Fetch(torch.device("cuda")))  # stored on the CPU, used on CUDA
    cfg = config(max_steps=1, compute_dtype=torch.bfloat16)
    train(plain_loss, params, samples(4), cfg, where=TRAINED, key=dsf.random.key(0))
    assert devices == ["cuda"]


def interrupt_at(step):
    def callback(current, params, loss):
        if current == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("interruption", ["killed after step 3", "max_steps=3"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, interruption):
    run = dict(where=TRAINED, key=dsf.random.key(3))
    cfg = dict(max_steps=6, gradient_accumulation_steps=2, warmup_steps=2, checkpoint_steps=2, keep_last=2)
    full = train(noisy_loss, init_params(), samples(2), config(output_path=str(tmp_path / "full"), **cfg), **run)

    resumed_path = str(tmp_path / "resumed")
    if interruption == "max_steps=3":
        train(noisy_loss, init_params(), samples(2), config(output_path=resumed_path, **{**cfg, "max_steps": 3}), **run)
        assert checkpoint.all_steps(os.path.join(resumed_path, "checkpoints")) == [2, 3]
    else:
        with pytest.raises(KeyboardInterrupt):
            train(noisy_loss, init_params(), samples(2), config(output_path=resumed_path, **cfg), callback=interrupt_at(3), **run)
        assert [row["step"] for row in read_log(resumed_path)] == ["1", "2", "3"]
    resumed = train(noisy_loss, init_params(), samples(2), config(output_path=resumed_path, resume=True, **cfg), **run)

    for path, value in dsf.tree.select(full, TRAINED).items():
        assert torch.equal(value, dsf.tree.select(resumed, TRAINED)[path]), path
    full_log, resumed_log = read_log(tmp_path / "full"), read_log(resumed_path)
    assert [row["step"] for row in resumed_log] == ["1", "2", "3", "4", "5", "6"]
    assert [(row["loss"], row["lr"], row["grad_norm"]) for row in resumed_log] == [
        (row["loss"], row["lr"], row["grad_norm"]) for row in full_log
    ]
    assert checkpoint.all_steps(tmp_path / "full" / "checkpoints") == [4, 6]
    assert checkpoint.all_steps(os.path.join(resumed_path, "checkpoints")) == [4, 6]


def test_resume_ignores_a_partial_checkpoint(tmp_path):
    cfg = dict(output_path=str(tmp_path), checkpoint_steps=2)
    train(plain_loss, init_params(), samples(2), config(max_steps=4, **cfg), where=TRAINED, key=dsf.random.key(0))
    leftover = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    (leftover / "arrays").mkdir(parents=True)
    callback, seen = recorder()
    resumed = config(max_steps=6, resume=True, **cfg)
    train(plain_loss, init_params(), samples(2), resumed, where=TRAINED, key=dsf.random.key(0), callback=callback)
    assert [step for step, _, _ in seen] == [5, 6]
    assert not leftover.exists()


def test_fresh_run_refuses_to_mix_with_existing_checkpoints(tmp_path):
    cfg = config(max_steps=1, output_path=str(tmp_path), checkpoint_steps=1)
    train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0))
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0))


def test_resume_with_another_key_is_refused(tmp_path):
    cfg = dict(output_path=str(tmp_path), checkpoint_steps=1)
    train(plain_loss, init_params(), samples(2), config(max_steps=1, **cfg), where=TRAINED, key=dsf.random.key(0))
    with pytest.raises(ValueError, match="resume with the key of the original run"):
        train(plain_loss, init_params(), samples(2), config(max_steps=2, resume=True, **cfg), where=TRAINED, key=dsf.random.key(1))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    targets = TARGETS.clone()
    targets[4] = math.nan
    callback, seen = recorder()
    cfg = config(max_steps=6, output_path=str(tmp_path), checkpoint_steps=2, save_steps=1)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(FloatingPointError, match=f"at step 5: .*last good checkpoint is {checkpoints / '4'} \\(step 4\\)"):
        train(plain_loss, init_params(), samples(1, targets=targets), cfg, where=TRAINED, key=dsf.random.key(0), callback=callback)
    assert [step for step, _, _ in seen] == [1, 2, 3, 4]
    assert checkpoint.all_steps(checkpoints) == [2, 4]
    assert not (tmp_path / "step-5.safetensors").exists()
    assert [row["step"] for row in read_log(tmp_path)] == ["1", "2", "3", "4"]
    restored = checkpoint.restore_state(checkpoints)
    assert restored["step"] == 4 and restored["data_position"] == 4
    for path, value in seen[-1][2].items():
        assert torch.equal(restored["trainable"][path], value)


def test_save_steps_write_exactly_the_trainable_leaves(tmp_path):
    callback, seen = recorder()
    cfg = config(max_steps=3, output_path=str(tmp_path), save_steps=2)
    trained = train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0), callback=callback)
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".safetensors")) == [
        "step-2.safetensors",
        "step-3.safetensors",
    ]
    at_step_2, at_step_3 = load_file(tmp_path / "step-2.safetensors"), load_file(tmp_path / "step-3.safetensors")
    assert set(at_step_2) == set(at_step_3) == TRAINED_KEYS
    for key in TRAINED_KEYS:
        assert torch.equal(at_step_2[key], seen[1][2][key.replace(".", "/")])
        assert torch.equal(at_step_3[key], dsf.tree.flatten_dict(trained)[key])
    with safe_open(tmp_path / "step-3.safetensors", "pt") as file:
        assert file.metadata() == {"step": "3"}


def test_log_has_one_row_per_logged_step(tmp_path):
    cfg = config(max_steps=5, log_every=2, output_path=str(tmp_path))
    train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0))
    rows = read_log(tmp_path)
    assert [row["step"] for row in rows] == ["2", "4", "5"]
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "elapsed_seconds"]
    assert all(float(row["grad_norm"]) > 0 and float(row["lr"]) == 1e-2 for row in rows)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(max_steps=0), "max_steps must be a positive int"),
        (dict(checkpoint_steps=10), "checkpoint_steps need an output_path"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be positive or None"),
        (dict(compute_dtype=torch.int8), "compute_dtype"),
    ],
)
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        config(**bad)


def test_where_must_select_floating_point_tensors():
    params = {**init_params(), "ids": torch.arange(3)}
    with pytest.raises(ValueError, match="selects 'ids' of torch.int64"):
        train(plain_loss, params, samples(2), config(max_steps=1), where=r"^(layers|ids)", key=dsf.random.key(0))
    with pytest.raises(ValueError, match="selects no leaf"):
        train(plain_loss, params, samples(2), config(max_steps=1), where="nothing", key=dsf.random.key(0))


def test_resume_falls_back_from_a_damaged_newest_checkpoint_to_an_identical_run(tmp_path, capsys):
    run = dict(where=TRAINED, key=dsf.random.key(3))
    cfg = dict(max_steps=6, checkpoint_steps=2, keep_last=3)
    full = train(noisy_loss, init_params(), samples(2), config(output_path=str(tmp_path / "full"), **cfg), **run)
    resumed_path = tmp_path / "resumed"
    train(noisy_loss, init_params(), samples(2), config(output_path=str(resumed_path), **{**cfg, "max_steps": 4}), **run)
    (resumed_path / "checkpoints" / "4" / "structure" / "metadata").write_bytes(bytes(50))
    resumed = train(noisy_loss, init_params(), samples(2), config(output_path=str(resumed_path), resume=True, **cfg), **run)
    assert f"{resumed_path / 'checkpoints' / '4'} cannot be read" in capsys.readouterr().err
    for path, value in dsf.tree.select(full, TRAINED).items():
        assert torch.equal(value, dsf.tree.select(resumed, TRAINED)[path]), path
    assert sorted(os.listdir(resumed_path / "checkpoints")) == ["2", "4", "4.damaged", "6"]


def test_the_last_good_checkpoint_named_after_a_nan_is_one_that_verifies(tmp_path):
    targets = TARGETS.clone()
    targets[4] = math.nan
    checkpoints = tmp_path / "checkpoints"

    def damage_checkpoint_4(step, params, loss):
        if step == 4:
            flip_a_stored_byte_of(checkpoints / "4", params["layers"][0]["weight"])

    cfg = config(max_steps=6, output_path=str(tmp_path), checkpoint_steps=2, keep_last=None)
    with pytest.raises(FloatingPointError, match=f"last good checkpoint is {checkpoints / '2'} \\(step 2\\)"):
        train(plain_loss, init_params(), samples(1, targets=targets), cfg, where=TRAINED, key=dsf.random.key(0),
              callback=damage_checkpoint_4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_steps=2), "is at step 4, past max_steps=2"),
        (dict(learning_rate=5e-3), "other settings: learning_rate 0.01 -> 0.005"),
        (dict(run_settings={"batch_size": 4}), "other settings: batch_size 2 -> 4"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps 1 -> 2"),
    ],
)
def test_resume_under_other_settings_is_refused(tmp_path, change, message):
    cfg = config(max_steps=4, output_path=str(tmp_path), checkpoint_steps=2, run_settings={"batch_size": 2})
    train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0))
    with pytest.raises(ValueError, match=message):
        train(plain_loss, init_params(), samples(2), dataclasses.replace(cfg, resume=True, **change), where=TRAINED,
              key=dsf.random.key(0))


def test_resume_says_what_changed_and_that_a_finished_run_has_nothing_to_train(tmp_path, capsys):
    cfg = config(max_steps=4, output_path=str(tmp_path), checkpoint_steps=2)
    train(plain_loss, init_params(), samples(2), cfg, where=TRAINED, key=dsf.random.key(0))
    callback, seen = recorder()
    train(plain_loss, init_params(), samples(2), dataclasses.replace(cfg, resume=True), where=TRAINED, key=dsf.random.key(0),
          callback=callback)
    assert seen == [] and "already finished at step 4 = max_steps; nothing to train" in capsys.readouterr().err
    train(plain_loss, init_params(), samples(2), dataclasses.replace(cfg, resume=True, max_steps=6, checkpoint_steps=3),
          where=TRAINED, key=dsf.random.key(0), callback=callback)
    assert [step for step, _, _ in seen] == [5, 6]
    assert "with checkpoint_steps 2 -> 3, max_steps 4 -> 6" in capsys.readouterr().err


def test_a_restart_removes_what_a_killed_run_left(tmp_path):
    cfg = config(max_steps=4, output_path=str(tmp_path), checkpoint_steps=1, keep_last=2)
    train(plain_loss, init_params(), samples(2), dataclasses.replace(cfg, keep_last=None), where=TRAINED, key=dsf.random.key(0))
    (tmp_path / ".step-5.safetensors.a1b2c3d4.tmp").write_bytes(b"")
    (tmp_path / "notes.tmp").write_text("the user's")
    train(plain_loss, init_params(), samples(2), dataclasses.replace(cfg, resume=True), where=TRAINED, key=dsf.random.key(0))
    assert checkpoint.all_steps(tmp_path / "checkpoints") == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == ["notes.tmp"]
