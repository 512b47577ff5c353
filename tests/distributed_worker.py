"""Scenarios that tests/test_distributed.py and tests/test_shard.py run on 2 gloo ranks.

:func:`launch` starts the ranks with ``torch.multiprocessing.spawn``; each sets the variables that
torchrun sets, joins the job with ``dsf.training.distributed.init()``, runs one scenario on a tiny FLUX.1 and
writes what it saw to ``folder/rank{r}.pt`` for the test to compare with a single process. The
problem (model, loss, data, training settings) lives here so both sides build the same one.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsf
from dsf.training import distributed
from dsf.diffusion.losses import flow_matching_loss
from dsf.models import flux
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX1
from dsf.training.train import TrainConfig, train
from dsf.transforms import checkpoint, fp8, lora, lora_trainable, offload
from dsf.transforms.shard import count_gathers, shard, unshard

WORLD_SIZE = 2
CONFIG = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2,
                         num_single_blocks=2, context_dim=32, pooled_dim=16)
DIT = flux.FluxDiT(CONFIG)
K = dsf.random.split(dsf.random.key(0), 6)
SAMPLES = dsf.random.normal(K[0], (8, 16, 4, 4))
COND = {
    "text_embeds": dsf.random.normal(K[1], (2, 5, 32)),
    "pooled_embeds": dsf.random.normal(K[2], (2, 16)),
    "guidance": torch.full((2,), 3.5),
}
TRAIN_KEY = K[5]
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,proj_mlp"


# ----------------------------------------------------------------------------- the problem


def base_params():
    return flux.init_dit(CONFIG, K[3])


def lora_params():
    return lora(rank=4, targets=LORA_TARGETS).init(base_params(), K[4])


def velocity(params, x, sigma, **cond):
    return DIT(params, x, sigma, **cond)


def flux_loss(params, latents, key):
    return flow_matching_loss(velocity, params, latents, key, COND, schedule=FLUX1)


def flux_data(position):
    """Batches of 2 samples; the position counts batches."""
    while True:
        start = 2 * position % len(SAMPLES)
        position += 1
        yield position, SAMPLES[start : start + 2]


def train_config(**overrides) -> TrainConfig:
    defaults = dict(learning_rate=1e-3, max_steps=3, max_grad_norm=0.5, progress=False)
    return TrainConfig(**{**defaults, **overrides})


def sampler(params, noise):
    return sample(velocity, params, noise, FLUX1.sigmas(3), COND, progress=False)


def with_trained_lora(params):
    """Non-zero LoRA up factors (as after some training), the same whatever the chain order."""
    def fill(path, x):
        return dsf.random.normal(dsf.random.key(len(path)), x.shape) * 0.1 if path.endswith("/up") else x

    return dsf.tree.map_with_path(fill, params)


def composed_stack(*, sharded: bool, reverse: bool = False):
    parts = [
        lora(rank=4, targets=LORA_TARGETS),
        fp8(where=r"^(transformer_blocks|single_transformer_blocks)/", compute_dtype=torch.float32),
        offload(device="cpu"),
        checkpoint(),
    ] + ([shard()] if sharded else [])
    return dsf.chain(*(reversed(parts) if reverse else parts))


def loss_grads_and_samples(stack, rank: int):
    """The loss, LoRA gradients and samples of a stack over the tiny FLUX, with this rank's own key and noise."""
    params = with_trained_lora(stack.init(base_params(), K[4]))
    value, grads = dsf.value_and_grad(stack(flux_loss), where=lora_trainable)(params, SAMPLES[:2], dsf.random.key(rank))
    with torch.no_grad():
        samples = stack(sampler)(params, dsf.random.normal(dsf.random.key(100 + rank), (2, 16, 4, 4)))
    return {"loss": value, "grads": dsf.tree.select(grads, None), "samples": samples}


def plain_tensors(tree) -> dict[str, torch.Tensor]:
    return {path: leaf.detach().clone() for path, leaf in dsf.tree.select(tree, None).items()}


def local_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in dsf.tree.tensors(distributed.local_shards(tree)))


# ----------------------------------------------------------------------------- scenarios (on every rank)


def data_parallel_lora(folder: str) -> dict:
    losses = []
    trained = train(flux_loss, lora_params(), flux_data, train_config(output_path=f"{folder}/run"), key=TRAIN_KEY,
                    where=lora_trainable, callback=lambda step, params, loss: losses.append(loss))
    return {"lora": plain_tensors(dsf.tree.select(trained, lora_trainable)), "losses": losses}


def sharded_training(folder: str) -> dict:
    stack = dsf.chain(shard(), checkpoint())
    params = stack.init(base_params(), K[4])
    trainable_kinds = sorted({type(leaf).__name__ for leaf in dsf.tree.select(params, None).values()})
    trained = train(stack(flux_loss), params, flux_data, train_config(output_path=f"{folder}/run"), key=TRAIN_KEY)
    return {"params": plain_tensors(unshard(trained)), "kinds": trainable_kinds,
            "local_bytes": local_bytes(trained), "full_bytes": dsf.tree.nbytes(base_params())}


def gathers(stack) -> dict:
    """What a training step and a sampling run of ``stack`` gather, and how many weights it shards."""
    params = stack.init(base_params(), K[4])
    with count_gathers() as training:
        dsf.value_and_grad(stack(flux_loss))(params, SAMPLES[:2], TRAIN_KEY)
    with count_gathers() as sampling, torch.no_grad():
        stack(sampler)(params, SAMPLES[:2])
    sharded = [path for path, leaf in dsf.tree.select(params, None).items() if distributed.is_sharded(leaf)]
    return {"training": training, "sampling": sampling, "sharded paths": sharded}


def sharded_composition(folder: str) -> dict:
    rank = distributed.world().rank
    return {
        "plain": loss_grads_and_samples(composed_stack(sharded=False), rank),
        "sharded": loss_grads_and_samples(composed_stack(sharded=True), rank),
        "sharded, reversed": loss_grads_and_samples(composed_stack(sharded=True, reverse=True), rank),
        "gathers": gathers(dsf.chain(shard(), checkpoint())),
    }


def sharded_resume(folder: str) -> dict:
    stack = dsf.chain(shard(), checkpoint())
    params = stack.init(base_params(), K[4])
    runs = {}
    for name, settings in (("whole", dict(max_steps=4)), ("first half", dict(max_steps=2)),
                           ("resumed", dict(max_steps=4, resume=True))):
        losses = []
        output = f"{folder}/{'whole' if name == 'whole' else 'halves'}"
        trained = train(stack(flux_loss), params, flux_data, train_config(output_path=output, checkpoint_steps=2, **settings),
                        key=TRAIN_KEY, callback=lambda step, p, loss: losses.append((step, loss)))
        runs[name] = {"losses": losses, "params": plain_tensors(unshard(trained))}
    return runs


SCENARIOS = {f.__name__: f for f in (data_parallel_lora, sharded_training, sharded_composition, sharded_resume)}


# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, scenario: str, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = distributed.init(backend="gloo", timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(SCENARIOS[scenario](folder), os.path.join(folder, f"rank{world.rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def launch(scenario: str, folder) -> list:
    """Run ``scenario`` on :data:`WORLD_SIZE` gloo ranks; return what each rank saw, by rank."""
    mp.spawn(_rank_main, args=(scenario, _free_port(), str(folder)), nprocs=WORLD_SIZE)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]
