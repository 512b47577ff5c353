"""The training loop: an optimizer (AdamW by default) on the leaves ``where`` selects, with gradient
accumulation, clipping, logging of the loss and the loss's own metrics, an exponential moving average
of the trained leaves, safetensors saves and resumable checkpoints.

Randomness and data come from explicit values that checkpoints keep: micro-batch ``m`` of
optimizer step ``s`` (steps count from 1) gets the key :func:`step_key` ``(key, s, m)``, and
``data(position)`` restarts the batch stream at a saved position. A resumed run therefore sees the
same keys and batches as an uninterrupted one and, on the CPU, ends with bit-identical parameters.
In a torchrun job (:func:`dsf.training.distributed.init`) each rank trains on its share of the batches,
keyed by their index among all ranks' micro-batches, and the main rank logs and saves; see
:mod:`dsf.training.distributed`.

Files under ``config.output_path``:

    log.csv                  step, loss, lr, grad_norm, elapsed_seconds, then the loss's metrics (every ``log_every`` steps)
    step-{N}.safetensors     the trainable leaves, "."-joined checkpoint keys
    step-{N}-ema.safetensors their exponential moving average, when ``ema`` is set
    checkpoints/{N}/         the resumable state (orbax, checksummed), newest ``keep_last`` kept
    validation/step-{N}/     the preview images ``{index}.png`` of ``validate`` (every ``validate_every`` steps)
    tensorboard/             the same scalars (and previews), when ``torch.utils.tensorboard`` imports

Example:
    >>> import torch, dsf
    >>> xs = torch.linspace(-1, 1, 8)
    >>> def data(position):  # the same batch forever; the position counts batches
    ...     while True:
    ...         position += 1
    ...         yield position, xs
    >>> def loss_fn(params, x, key):
    ...     return ((x * params["w"] + params["b"] - 3 * x) ** 2).mean()
    >>> params = {"w": torch.zeros(1), "b": torch.zeros(1)}
    >>> config = TrainConfig(learning_rate=0.1, weight_decay=0.0, max_steps=100, progress=False)
    >>> trained = train(loss_fn, params, data, config, where="w", key=dsf.random.key(0))
    >>> round(trained["w"].item(), 1), trained["b"] is params["b"]
    (3.0, True)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dsf.training import checkpoint, distributed
from dsf.autodiff import value_and_grad
from dsf.training.optim import Optimizer, adamw, constant_with_warmup
from dsf.random import Key, fold_in
from dsf.tree import Where, flatten_dict, leaves_with_paths, map_with_path, select
from dsf.weight import Weight, compute_device

LossFn = Callable[[Any, Any, Key], torch.Tensor]  # or (loss, {metric name: scalar}) with has_aux=True
DataStream = Callable[[Any], Iterator[tuple[Any, Any]]]
Callback = Callable[[int, Any, float], None]
Saver = Callable[[str, Any], None]
Validate = Callable[[Any], Sequence[Any]]  # params -> PIL images

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "elapsed_seconds")
# the settings of the default AdamW, which an optimizer= passed to train replaces
ADAMW_SETTINGS = ("learning_rate", "weight_decay", "betas", "eps", "warmup_steps")
# settings a resumed run must share with its checkpoint; the others (max_steps, how often it saves) may change
FIXED_SETTINGS = (*ADAMW_SETTINGS, "gradient_accumulation_steps", "max_grad_norm", "compute_dtype", "ema")
CHANGEABLE_SETTINGS = ("max_steps", "save_steps", "checkpoint_steps", "keep_last", "log_every")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    ``max_grad_norm=None`` turns clipping off. ``compute_dtype`` other than float32 runs the loss
    under ``torch.autocast`` on the device the parameters compute on (:func:`compute_device_type`). ``output_path=None`` writes nothing;
    otherwise the trainable leaves are saved every ``save_steps`` steps and after the last one, and
    the resumable state every ``checkpoint_steps`` steps and after the last one (keeping the newest
    ``keep_last``; ``None`` keeps all). ``resume=True`` continues from the newest checkpoint in
    ``output_path/checkpoints`` that verifies (or starts afresh if there is none); the checkpoint
    must have been written with the same :data:`FIXED_SETTINGS` and ``run_settings`` (what else
    defines the run, e.g. ``{"batch_size": 8}``: JSON values), while the others may change.
    ``learning_rate``, ``weight_decay``, ``betas``, ``eps`` and ``warmup_steps`` set the default
    AdamW; a run given its own ``optimizer=`` leaves them at their defaults. ``ema``, a decay in
    (0, 1) such as 0.999, keeps an exponential moving average of the trained leaves (in float32 for
    16-bit leaves): after each update ``ema = ema * decay + leaf * (1 - decay)``, starting from the
    leaves before training.

    >>> TrainConfig(max_steps=10).gradient_accumulation_steps
    1
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    compute_dtype: torch.dtype = torch.float32
    output_path: str | None = None
    save_steps: int | None = None
    checkpoint_steps: int | None = None
    keep_last: int | None = 2
    resume: bool = False
    progress: bool = True
    log_every: int = 1
    run_settings: Mapping[str, Any] | None = None
    ema: float | None = None

    def __post_init__(self):
        for name in ("max_steps", "gradient_accumulation_steps", "log_every"):
            _require_positive_int(name, getattr(self, name))
        for name in ("save_steps", "checkpoint_steps", "keep_last"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        if self.ema is not None and not (isinstance(self.ema, float) and 0.0 < self.ema < 1.0):
            raise ValueError(f"ema must be a decay in (0, 1) such as 0.999, or None (no average), got {self.ema!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {self.max_grad_norm!r}")
        if not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating torch.dtype such as torch.bfloat16, got {self.compute_dtype!r}")
        if self.run_settings is not None:
            _check_run_settings(self.run_settings)
        if self.output_path is None:
            needing_output = [name for name in ("save_steps", "checkpoint_steps") if getattr(self, name) is not None]
            needing_output += ["resume"] if self.resume else []
            if needing_output:
                raise ValueError(f"{', '.join(needing_output)} need an output_path to write to; set output_path")


def step_key(key: Key, step: int, micro_batch: int) -> Key:
    """The key handed to the loss for ``micro_batch`` (from 0) of optimizer ``step`` (from 1).

    >>> from dsf.random import key
    >>> step_key(key(0), 1, 0) != step_key(key(0), 1, 1) != step_key(key(0), 2, 0)
    True
    """
    return fold_in(fold_in(key, step), micro_batch)


def compute_device_type(params) -> str:
    """The device type a loss over ``params`` computes on, for ``torch.autocast``: the accelerator a
    parameter computes on (an offloaded record's fetch target counts, not the CPU it is stored on),
    else ``"cpu"``.

    >>> from dsf.transforms.offload import Fetch
    >>> compute_device_type({"w": Weight(torch.ones(1)).with_stage(Fetch(torch.device("cuda"))), "b": torch.ones(1)})
    'cuda'
    """
    types = {compute_device(p).type for _, p in leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight))
             if isinstance(p, (Weight, torch.Tensor))}
    accelerators = sorted(types - {"cpu", "meta"})
    return accelerators[0] if accelerators else "cpu"


def trainable_leaves(params, where: Where) -> dict[str, torch.Tensor]:
    """``{path: tensor}`` of the leaves ``where`` selects; each must be a floating-point tensor.

    >>> trainable_leaves({"w": torch.ones(2), "b": torch.zeros(1)}, "w")
    {'w': tensor([1., 1.])}
    """
    selected = select(params, where)
    if not selected:
        examples = ", ".join(path for path, _ in leaves_with_paths(params)[:5])
        raise ValueError(f"where={where!r} selects no leaf of params; paths look like: {examples}")
    for path, leaf in selected.items():
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            kind = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise ValueError(f"where={where!r} selects {path!r} of {kind}; only floating-point tensors train, narrow where=")
    return selected


def train(
    loss_fn: LossFn,
    params,
    data: DataStream,
    config: TrainConfig,
    *,
    key: Key,
    where: Where = None,
    callback: Callback | None = None,
    save: Saver | None = None,
    optimizer: Optimizer | None = None,
    has_aux: bool = False,
    validate: Validate | None = None,
    validate_every: int | None = None,
):
    """Train the leaves of ``params`` that ``where`` selects; return ``params`` with the trained leaves.

    ``loss_fn(params, batch, key)`` returns a scalar tensor, or with ``has_aux=True`` a pair
    ``(loss, metrics)`` whose ``metrics`` maps names to scalars (tensors or numbers), averaged like
    the loss and logged beside it at every logged step. ``data(position)`` yields
    ``(next_position, batch)`` pairs, where handing ``next_position`` back to ``data`` continues the
    stream from there (a fresh run starts at position 0). Each optimizer step averages the losses
    and gradients of ``config.gradient_accumulation_steps`` micro-batches, clips the gradients to
    ``config.max_grad_norm``, and takes a step of ``optimizer`` (default: AdamW with the settings of
    ``config``; else e.g. :func:`dsf.training.optim.sgd` with a schedule) on the selected leaves; the
    other leaves are passed through untouched and get no gradients. Checkpoints keep the optimizer's
    state, whatever it holds, and the optimizer's ``settings``: a run resumed with another optimizer
    is refused. With ``config.ema`` the moving average goes into the checkpoints and into
    ``step-{N}-ema.safetensors`` beside each step file. ``callback(step, params, loss)`` runs after each
    step and its saves. ``save(path, params)`` writes the ``step-{N}.safetensors`` files instead of
    the default (the trainable leaves under their "."-joined paths), e.g. a LoRA in a file layout.
    A non-finite loss or gradient norm stops the run with a
    ``FloatingPointError`` before that step is applied or saved.

    ``validate(params)`` returns preview images (PIL images, e.g. of fixed prompts and seeds, so the same
    prompt shows the same noise at every step); it runs without gradients every ``validate_every``
    steps and after the last one, before that step's checkpoint, and its images are written to
    ``validation/step-{N}/{index}.png`` (a folder that appears whole) and to TensorBoard. A preview
    folder already there (from a run killed after writing it) is not made again; the previews run
    under a forked torch random state, so they take nothing from the training's randomness. In a job
    every rank calls ``validate`` (the collectives of sharded weights need all ranks); the main rank writes.

    >>> import dsf
    >>> def data(position):
    ...     while True:
    ...         position += 1
    ...         yield position, torch.tensor([2.0])
    >>> params = {"w": torch.zeros(1)}
    >>> losses = []
    >>> config = TrainConfig(learning_rate=0.1, max_steps=3, progress=False)
    >>> _ = train(lambda p, x, k: ((p["w"] - x) ** 2).sum(), params, data, config, key=dsf.random.key(0),
    ...           callback=lambda step, p, loss: losses.append(loss))
    >>> losses[0], len(losses)
    (4.0, 3)

    Another optimizer and schedule, a metric from the loss, and a moving average:

    >>> from dsf.training import optim
    >>> sgd = optim.sgd(optim.warmup(optim.cosine_decay(0.1, decay_steps=8), warmup_steps=2), momentum=0.9)
    >>> def loss_and_metrics(p, x, k):
    ...     error = p["w"] - x
    ...     return (error ** 2).sum(), {"error": error.sum()}
    >>> config = TrainConfig(max_steps=10, progress=False, ema=0.5)
    >>> trained = train(loss_and_metrics, params, data, config, key=dsf.random.key(0), optimizer=sgd, has_aux=True)
    >>> round(trained["w"].item(), 1)
    2.0

    Previews every 2 steps (a sampler would draw images of fixed prompts and seeds):

    >>> import tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> config = TrainConfig(learning_rate=0.1, max_steps=4, progress=False, output_path=folder)
    >>> def preview(p):
    ...     return [Image.new("L", (2, 2), round(100 * p["w"].item()))]
    >>> _ = train(lambda p, x, k: ((p["w"] - x) ** 2).sum(), params, data, config, key=dsf.random.key(0),
    ...           validate=preview, validate_every=2)
    >>> sorted(os.listdir(os.path.join(folder, "validation"))), os.listdir(os.path.join(folder, "validation", "step-4"))
    (['step-2', 'step-4'], ['0.png'])
    """
    world = distributed.world()
    _check_validation(validate, validate_every, config)
    trainable = trainable_leaves(params, where)
    chosen = _default_optimizer(config) if optimizer is None else _checked_optimizer(optimizer, config)
    stepper = distributed.shardwise(chosen)
    checkpoint_dir = distributed.checkpoint_dir(config.output_path, trainable)
    _remove_stale_step_files(config.output_path)
    newest = _newest_checkpoint(config, checkpoint_dir)
    if newest:
        start_step, trainable, optimizer_state, ema, position, elapsed = _restored_run(
            checkpoint_dir, newest, trainable, key, config, optimizer
        )
    else:
        start_step, optimizer_state, position, elapsed = 0, stepper.init(trainable), 0, 0.0
        ema = _ema_start(trainable) if config.ema is not None else None
    device_type = compute_device_type(params)
    trainable_paths = set(trainable)
    loss_and_grads = value_and_grad(
        _in_compute_dtype(loss_fn, config.compute_dtype, device_type, has_aux), where=lambda path, leaf: path in trainable_paths,
        has_aux=has_aux,
    )
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(_RunLog(config.output_path if world.rank == 0 else None, start_step))
        bar = stack.enter_context(
            tqdm(total=config.max_steps, initial=start_step, disable=not config.progress or world.rank != 0, unit="step")
        )
        stream = distributed.rank_batches(data(position), world)
        started = time.perf_counter() - elapsed
        for step in range(start_step + 1, config.max_steps + 1):
            loss, metrics, grads, position = _accumulated_loss_and_grads(
                loss_and_grads, _with_leaves(params, trainable), stream, key, step, config.gradient_accumulation_steps, world,
                has_aux,
            )
            if config.max_grad_norm is None:
                norm = distributed.global_norm(grads)
            else:
                grads, norm = distributed.clip_by_global_norm(grads, config.max_grad_norm)
            grad_norm = norm.item()
            _check_finite(loss, grad_norm, step, checkpoint_dir)
            trainable, optimizer_state = stepper.update(grads, optimizer_state, trainable)
            del grads  # before the next step's backward: a second gradient set would double that memory
            if ema is not None:
                ema = _ema_update(ema, trainable, config.ema)
            elapsed = time.perf_counter() - started
            if step % config.log_every == 0 or step == config.max_steps:
                learning_rate = None if chosen.learning_rate is None else chosen.learning_rate(step)
                log.write(step, loss, learning_rate, grad_norm, elapsed, metrics)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            bar.update()
            if validate is not None and (step % validate_every == 0 or step == config.max_steps):
                _preview(config.output_path, step, validate, _with_leaves(params, trainable), log, resumed=bool(newest))
            _save_due(config, checkpoint_dir, step, params, trainable, optimizer_state, ema, key, position, elapsed, save,
                      optimizer)
            if callback is not None:
                callback(step, _with_leaves(params, trainable), loss)
    return _with_leaves(params, trainable)


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_run_settings(run_settings: Mapping[str, Any]) -> None:
    taken = sorted(set(run_settings) & {field.name for field in dataclasses.fields(TrainConfig)})
    if taken:
        raise ValueError(f"run_settings {taken} repeat TrainConfig fields; pass them as the fields themselves")
    try:
        json.dumps(dict(run_settings))
    except TypeError as error:
        raise ValueError(f"run_settings must hold JSON values (numbers, strings, lists), got {dict(run_settings)!r} ({error})") from None


def run_settings(config: TrainConfig, optimizer: Optimizer | None = None) -> dict[str, dict[str, Any]]:
    """What a checkpoint records of the run's settings, as JSON values: ``{"fixed": ..., "changeable": ...}``.

    A run with its own ``optimizer`` records that optimizer's ``settings`` under ``"optimizer"`` instead
    of the default AdamW's :data:`ADAMW_SETTINGS`.

    >>> settings = run_settings(TrainConfig(max_steps=5, run_settings={"batch_size": 8}))
    >>> settings["fixed"]["batch_size"], settings["fixed"]["compute_dtype"], settings["changeable"]["max_steps"]
    (8, 'torch.float32', 5)
    >>> from dsf.training.optim import sgd
    >>> fixed = run_settings(TrainConfig(), sgd(0.1, momentum=0.9))["fixed"]
    >>> fixed["optimizer"]["optimizer"], "learning_rate" in fixed
    ('sgd', False)
    """
    fixed = {name: getattr(config, name) for name in FIXED_SETTINGS if optimizer is None or name not in ADAMW_SETTINGS}
    fixed["compute_dtype"] = str(config.compute_dtype)
    if optimizer is not None:
        fixed["optimizer"] = dict(optimizer.settings or {"optimizer": "custom"})
    fixed.update(config.run_settings or {})
    changeable = {name: getattr(config, name) for name in CHANGEABLE_SETTINGS}
    return json.loads(json.dumps({"fixed": fixed, "changeable": changeable}))


def _check_resumable(saved: str, config: TrainConfig, step: int, where: str, optimizer: Optimizer | None) -> None:
    """Refuse to resume checkpoint ``step`` (at ``where``, with the JSON ``saved`` settings) under another optimizer,
    other fixed settings or a ``max_steps`` below its step; say which changeable settings changed. ``optimizer``
    ``None`` is the default AdamW."""
    if step > config.max_steps:
        raise ValueError(
            f"the checkpoint at {where} is at step {step}, past max_steps={config.max_steps}: its model was trained "
            f"further than asked; pass max_steps >= {step} to continue it, or start a new run in an empty output_path"
        )
    before, now = json.loads(saved), run_settings(config, optimizer)
    trained_with, resumed_with = _optimizer_name(before["fixed"]), _optimizer_name(now["fixed"])
    if trained_with != resumed_with:
        raise ValueError(
            f"the checkpoint at {where} was trained with the {trained_with} optimizer, but this run uses {resumed_with}; "
            f"its optimizer state fits {trained_with} only: resume with the optimizer of the original run "
            f"({before['fixed'].get('optimizer', 'the default, optimizer=None')}), or start a new run in an empty output_path"
        )
    changed = {
        kind: [f"{name} {before[kind].get(name)!r} -> {now[kind].get(name)!r}"
               for name in sorted(set(before[kind]) | set(now[kind])) if before[kind].get(name) != now[kind].get(name)]
        for kind in ("fixed", "changeable")
    }
    if changed["fixed"]:
        raise ValueError(
            f"the checkpoint at {where} was trained with other settings: {', '.join(changed['fixed'])}; resume with the "
            "settings of the original run, or start a new run in an empty output_path"
        )
    if changed["changeable"] and distributed.is_main():
        print(f"resuming {where} with {', '.join(changed['changeable'])}", file=sys.stderr)


def _optimizer_name(fixed: Mapping[str, Any]) -> str:
    """The optimizer recorded in a run's fixed settings: the default AdamW where a run had no optimizer=."""
    return fixed["optimizer"]["optimizer"] if "optimizer" in fixed else "default adamw"


def _default_optimizer(config: TrainConfig) -> Optimizer:
    """AdamW with the settings of ``config`` (which checkpoints record as the config's fields)."""
    return adamw(constant_with_warmup(config.learning_rate, config.warmup_steps), config.betas, config.eps, config.weight_decay)


def _checked_optimizer(optimizer: Optimizer, config: TrainConfig) -> Optimizer:
    """``optimizer``, after checking that ``config`` leaves the default AdamW's settings alone (they would be ignored)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a dsf.training.optim.Optimizer (e.g. optim.sgd(...)), got {type(optimizer).__name__}")
    defaults = TrainConfig()
    ignored = [name for name in ADAMW_SETTINGS if getattr(config, name) != getattr(defaults, name)]
    if ignored:
        raise ValueError(
            f"TrainConfig sets {', '.join(ignored)}, which configure the default AdamW, but optimizer= replaces it; "
            "give them to the optimizer (e.g. optim.adamw(optim.warmup(1e-4, 100), weight_decay=0.1)) and leave them "
            "at their defaults"
        )
    return optimizer


def _ema_start(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The moving average before the first step: a copy of the leaves, in float32 for 16-bit leaves."""
    return {path: x.detach().to(torch.float32 if x.element_size() < 4 else x.dtype, copy=True) for path, x in trainable.items()}


def _ema_update(ema: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """``ema * decay + trainable * (1 - decay)``, as new tensors (on each rank's shards of sharded leaves)."""
    local_ema, local_leaves = distributed.local_shards((ema, trainable))
    paths = list(ema)
    averaged = torch._foreach_lerp(
        [local_ema[p] for p in paths], [local_leaves[p].to(local_ema[p].dtype) for p in paths], 1.0 - decay
    )
    return distributed.sharded_like(dict(zip(paths, averaged)), trainable)


def _newest_checkpoint(config: TrainConfig, checkpoint_dir: str | None) -> int:
    """The newest complete checkpoint the run resumes from (0 for a fresh run)."""
    latest = None if checkpoint_dir is None else distributed.latest_step(checkpoint_dir)
    if config.resume:
        return latest or 0
    if latest is not None and config.checkpoint_steps is not None:
        raise FileExistsError(
            f"{checkpoint_dir} already holds checkpoints (newest: step {latest}); pass resume=True to continue "
            "that run, or choose an empty output_path for a new one"
        )
    return 0


def _restored_run(checkpoint_dir: str, newest: int, trainable: dict[str, torch.Tensor], key: Key, config: TrainConfig,
                  optimizer: Optimizer | None):
    """``(step, trainable, optimizer_state, ema, data_position, elapsed_seconds)`` from the newest checkpoint up to step
    ``newest`` that verifies, on the devices of ``trainable`` (``ema`` None without ``config.ema``); leftovers of
    killed saves are removed after. ``optimizer`` is the run's own, ``None`` for the default."""
    step, state = _newest_good_state(checkpoint_dir, newest, distributed.holds_shards(trainable))
    state = distributed.sharded_like(state, trainable)
    where = os.path.join(checkpoint_dir, str(step))
    if state["key"] != key.value:
        raise ValueError(
            f"the checkpoint at {where} was trained with key value {state['key']}, but key={key}; "
            "resume with the key of the original run, or start a new run in an empty output_path"
        )
    _check_same_leaves(state["trainable"], trainable, where)
    _check_resumable(state["settings"], config, step, where, optimizer)
    if step == config.max_steps and distributed.is_main():
        print(f"the run at {where} already finished at step {step} = max_steps; nothing to train "
              "(pass a larger max_steps to train further)", file=sys.stderr)
    if distributed.holds_shards(trainable) or distributed.is_main():
        checkpoint.remove_leftovers(checkpoint_dir, config.keep_last)
    optimizer_state = dict(state["optimizer"])
    for slot, tensors in optimizer_state.items():
        if isinstance(tensors, dict):
            optimizer_state[slot] = _on_devices_of(tensors, trainable)
    ema = _on_devices_of(state["ema"], trainable) if config.ema is not None else None
    return (step, _on_devices_of(state["trainable"], trainable), optimizer_state, ema, state["data_position"],
            state["elapsed_seconds"])


def _newest_good_state(checkpoint_dir: str, newest: int, sharded: bool) -> tuple[int, dict]:
    """:func:`checkpoint.restore_newest_good` in a job: a folder every rank reads is checked (and damaged checkpoints
    moved aside) by the main rank first; ranks reading their own shards must agree on the step."""
    if sharded or distributed.is_main():
        try:
            step, state = checkpoint.restore_newest_good(checkpoint_dir, newest)
        finally:
            if not sharded:
                distributed.barrier()
    else:
        distributed.barrier()
        step, state = checkpoint.restore_newest_good(checkpoint_dir, newest)
    if sharded and distributed.world().size > 1:
        steps: list[int] = [0] * distributed.world().size
        torch.distributed.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks' newest good checkpoints differ (steps {steps}); resume needs one step all ranks hold")
    return step, state


def _remove_stale_step_files(output_path: str | None) -> None:
    """Remove the temporary step files and preview folders a killed run was writing (main rank)."""
    if output_path is not None and distributed.is_main():
        checkpoint.remove_stale_temporaries(output_path, r"step-\d+(-ema)?\.safetensors")
        checkpoint.remove_stale_temporaries(os.path.join(output_path, "validation"), r"step-\d+")


def _check_validation(validate: Validate | None, validate_every: int | None, config: TrainConfig) -> None:
    if validate is None and validate_every is None:
        return
    if validate is None or validate_every is None:
        given, missing = ("validate", "validate_every") if validate_every is None else ("validate_every", "validate")
        raise ValueError(f"{given} was given without {missing}; previews need both: a sampling function and how often to run it")
    _require_positive_int("validate_every", validate_every)
    if config.output_path is None:
        raise ValueError("validate writes its previews under output_path/validation; set output_path")


def _preview(output_path: str, step: int, validate: Validate, params, log: "_RunLog", resumed: bool) -> None:
    """The previews of ``step``: made by ``validate`` and written as ``validation/step-{step}/{index}.png`` through a
    temporary folder, or, in a ``resumed`` run, read back when the killed run wrote them already (as the main rank
    sees the folder, so that every rank samples or none); logged to TensorBoard."""
    folder = os.path.join(output_path, "validation", f"step-{step}")
    if _as_main_rank_sees(resumed and os.path.isdir(folder)):
        if distributed.is_main():
            from PIL import Image

            names = sorted(os.listdir(folder), key=lambda name: int(name.removesuffix(".png")))
            log.images(step, [Image.open(os.path.join(folder, name)) for name in names])
        return
    with torch.no_grad(), torch.random.fork_rng():
        images = list(validate(params))
    if distributed.is_main():
        _write_preview_folder(folder, images)
    log.images(step, images)


def _as_main_rank_sees(value: bool) -> bool:
    """``value`` as the main rank computed it, on every rank of a job."""
    if distributed.world().size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _write_preview_folder(folder: str, images: Sequence[Any]) -> None:
    """``images`` (PIL) as ``{index}.png`` in ``folder``, written to a temporary folder beside it and renamed over
    what a former run left there."""
    for index, image in enumerate(images):
        if not hasattr(image, "save"):
            raise TypeError(f"validate must return PIL images (e.g. a pipeline's generate), got {type(image).__name__} "
                            f"at index {index}")
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    for index, image in enumerate(images):
        image.save(os.path.join(temporary, f"{index}.png"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def _check_same_leaves(restored: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = sorted(set(trainable) - set(restored)), sorted(set(restored) - set(trainable))
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint at {where} trains other leaves than where= selects: missing {missing}, "
            f"unexpected {unexpected}; resume with the where= of the original run"
        )
    for path, tensor in trainable.items():
        if restored[path].shape != tensor.shape:
            raise ValueError(
                f"leaf {path!r} has shape {tuple(tensor.shape)} but {tuple(restored[path].shape)} in the checkpoint at {where}"
            )


def _on_devices_of(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {path: tensor.to(like[path].device) for path, tensor in tensors.items()}


def _in_compute_dtype(loss_fn: LossFn, compute_dtype: torch.dtype, device_type: str, has_aux: bool) -> LossFn:
    if compute_dtype == torch.float32:
        return loss_fn

    def loss_in_compute_dtype(params, batch, key):
        with torch.autocast(device_type, dtype=compute_dtype):
            out = loss_fn(params, batch, key)
            return (out[0].float(), out[1]) if has_aux else out.float()

    return loss_in_compute_dtype


def _with_leaves(params, leaves: dict[str, torch.Tensor]):
    """``params`` with the leaves at the paths of ``leaves`` replaced."""
    return map_with_path(lambda path, leaf: leaves.get(path, leaf), params)


def _accumulated_loss_and_grads(
    loss_and_grads, params, stream, key: Key, step: int, micro_batches: int, world: distributed.World, has_aux: bool
):
    """``(mean loss, mean metrics, mean grads, data position)`` over the micro-batches of one optimizer step, on all ranks."""
    losses, metric_sums, total = [], {}, None
    for micro_batch in range(micro_batches):
        try:
            position, batch = next(stream)
        except StopIteration:
            raise RuntimeError(
                f"the data stream ended during step {step}; make data(position) endless (e.g. dsf.training.data.batches) "
                "or lower max_steps"
            ) from None
        out, grads = loss_and_grads(params, batch, step_key(key, step, world.micro_batch_index(micro_batch)))
        loss = out[0] if has_aux else out
        if has_aux:
            metric_sums = _summed_metrics(metric_sums, _metric_values(out[1], step), micro_batch)
        grads = dict(leaves_with_paths(grads))
        losses.append(loss.item())
        if total is None:
            total = grads
        else:
            sums, addends = distributed.local_shards((list(total.values()), [grads[path] for path in total]))
            torch._foreach_add_(sums, addends)
    if micro_batches > 1:
        torch._foreach_div_(distributed.local_shards(list(total.values())), micro_batches)
    loss, grads = distributed.mean_over_ranks(sum(losses) / micro_batches, total)
    metrics = {name: distributed.mean_over_ranks(value / micro_batches, {})[0] for name, value in metric_sums.items()}
    return loss, metrics, grads, position


def _metric_values(metrics, step: int) -> dict[str, float]:
    """The metrics a loss returned beside its value, as floats; refuses what cannot be logged."""
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"with has_aux=True the loss returns (loss, metrics) with metrics a dict of named scalars, got "
            f"{type(metrics).__name__} at step {step}"
        )
    values = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or name in LOG_COLUMNS or not name or "," in name:
            raise ValueError(f"metric name {name!r} cannot be a log column: use a non-empty string without commas "
                             f"other than {', '.join(LOG_COLUMNS)}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            values[name] = value.item()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            raise ValueError(f"metric {name!r} must be a scalar (a number or a one-element tensor), got {value!r}")
    return values


def _summed_metrics(sums: dict[str, float], values: dict[str, float], micro_batch: int) -> dict[str, float]:
    """``sums`` plus the ``values`` of one more micro-batch, which must name the same metrics."""
    if micro_batch and list(values) != list(sums):
        raise ValueError(f"the loss returned metrics {list(values)} after {list(sums)} in the same step; "
                         "return the same names every time")
    return {name: sums.get(name, 0.0) + value for name, value in values.items()}


def _check_finite(loss: float, norm: float, step: int, checkpoint_dir: str | None) -> None:
    if math.isfinite(loss) and math.isfinite(norm):
        return
    latest = None if checkpoint_dir is None else checkpoint.newest_good_step(checkpoint_dir)
    if latest is None:
        last_good = "no checkpoint that verifies was saved before it (set output_path and checkpoint_steps to keep some)"
    else:
        last_good = (
            f"the last good checkpoint is {os.path.join(checkpoint_dir, str(latest))} (step {latest}); "
            "continue from it with resume=True"
        )
    raise FloatingPointError(
        f"loss {loss} with gradient norm {norm} at step {step}: the run stopped without applying or saving step {step}; "
        f"{last_good} after fixing the cause (a lower learning_rate, max_grad_norm, the batch data)"
    )


def _save_due(config: TrainConfig, checkpoint_dir, step, params, trainable, optimizer_state, ema, key, position, elapsed,
              save: Saver | None, optimizer: Optimizer | None) -> None:
    """Write the safetensors files and the checkpoint that ``step`` calls for (``optimizer``: the run's own, ``None``
    for the default)."""
    last = step == config.max_steps
    if config.output_path is not None and (last or (config.save_steps and step % config.save_steps == 0)):
        _write_step_file(os.path.join(config.output_path, f"step-{step}.safetensors"), params, trainable, step, save)
        if ema is not None:
            leaves = {path: average.to(trainable[path].dtype) for path, average in ema.items()}
            _write_step_file(os.path.join(config.output_path, f"step-{step}-ema.safetensors"), params, leaves, step, save)
    if config.checkpoint_steps is not None and (last or step % config.checkpoint_steps == 0):
        state = {
            "trainable": trainable,
            "optimizer": optimizer_state,
            "step": step,
            "key": key.value,
            "data_position": position,
            "elapsed_seconds": elapsed,
            "settings": json.dumps(run_settings(config, optimizer), sort_keys=True),
        }
        if ema is not None:
            state["ema"] = ema
        distributed.save_state(checkpoint_dir, step, state, keep_last=config.keep_last)


def _write_step_file(path: str, params, leaves: dict[str, torch.Tensor], step: int, save: Saver | None) -> None:
    """``params`` with ``leaves`` through ``save``, or by default just ``leaves`` under their "."-joined paths (main rank)."""
    whole = distributed.full_tensors(leaves)
    if save is not None and distributed.is_main():
        save(path, _with_leaves(params, whole))
    elif distributed.is_main():
        trained = flatten_dict(map_with_path(lambda leaf_path, leaf: whole.get(leaf_path), params))
        checkpoint.save_safetensors(path, trained, metadata={"step": str(step)})


class _RunLog:
    """The CSV log (and TensorBoard, when it imports) of a run that starts after ``start_step``.

    Rows after ``start_step`` left by an interrupted run are dropped, so a resumed log reads like an
    uninterrupted one. The header (:data:`LOG_COLUMNS`, then the names of the loss's metrics) is written
    with the first row; a resumed log keeps its header, and the metrics must match it.
    """

    def __init__(self, output_path: str | None, start_step: int):
        self.file = self.writer = self.tensorboard = self.columns = None
        if output_path is None:
            return
        os.makedirs(output_path, exist_ok=True)
        self.path = os.path.join(output_path, "log.csv")
        self.columns, rows = _log_until(self.path, start_step) if start_step else (None, [])
        _write_log_start(self.path, self.columns, rows)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        self.tensorboard = _tensorboard_writer(os.path.join(output_path, "tensorboard"), start_step + 1)

    def write(self, step: int, loss: float, lr: float | None, grad_norm: float, elapsed: float,
              metrics: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        columns = (*LOG_COLUMNS, *metrics)
        if self.columns is None:
            self.writer.writerow(columns)
            self.columns = columns
        elif columns != self.columns:
            raise ValueError(
                f"the loss's metrics {list(metrics)} differ from the columns of {self.path} {list(self.columns)}; "
                "return the metrics the run started with, or start a new run in an empty output_path"
            )
        self.writer.writerow((step, loss, "" if lr is None else lr, grad_norm, elapsed, *metrics.values()))
        self.file.flush()
        if self.tensorboard is not None:
            scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **metrics}
            for name, value in scalars.items():
                if value is not None:
                    self.tensorboard.add_scalar(f"train/{name}", value, step)

    def images(self, step: int, images: Sequence[Any]) -> None:
        """Preview images (PIL) of ``step`` to TensorBoard, as ``validation/{index}``."""
        if self.tensorboard is None:
            return
        import numpy as np

        for index, image in enumerate(images):
            self.tensorboard.add_image(f"validation/{index}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _log_until(path: str, step: int) -> tuple[tuple[str, ...] | None, list[list[str]]]:
    """``(header or None, the rows up to step)`` of the log at ``path``."""
    if not os.path.exists(path):
        return None, []
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows:
        return None, []
    return tuple(rows[0]), [row for row in rows[1:] if int(row[0]) <= step]


def _write_log_start(path: str, header: tuple[str, ...] | None, rows: list[list[str]]) -> None:
    """Replace the log at ``path`` by its header (none yet: an empty file) and ``rows``, through a temporary file."""
    temporary_path = f"{path}.tmp"
    with open(temporary_path, "w", newline="") as file:
        writer = csv.writer(file)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    os.replace(temporary_path, path)


def _tensorboard_writer(log_dir: str, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
