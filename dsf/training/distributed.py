"""Runs over several processes: torchrun jobs, data parallelism, and the DTensor shards of ``shard()``.

A job is launched with ``torchrun``, which starts one process per GPU (per CPU slot with gloo) and
tells each its place through environment variables; :func:`init` reads them and joins the job
(NCCL on GPUs, gloo on CPUs). Without torchrun it does nothing, and every function here then acts
as for a single process: one rank, nothing to reduce, nothing to gather.

:func:`dsf.training.train.train` reads the job from :func:`world`:

- data: rank ``r`` of ``n`` takes, of each ``n`` consecutive batches of ``data(position)``, the
  ``r``-th (:func:`rank_batches`; from :func:`dsf.training.data.batches` it loads only those); its micro-batch
  ``m`` is the global micro-batch ``m·n + r`` of the step, which keys its randomness
  (:meth:`World.micro_batch_index`). ``n`` ranks with ``gradient_accumulation_steps=a`` therefore
  see the batches and keys of one process with ``a·n`` micro-batches, and make the same update (to
  float32 rounding).
- gradients: the replicated ones are averaged with one all-reduce (:func:`mean_over_ranks`); those of
  sharded leaves (DTensors) arrive averaged by the reduce-scatter of their gather.
- optimizer, norm and clipping: elementwise math runs on each rank's local shards
  (:func:`shardwise`, :func:`clip_by_global_norm`), so the optimizer state is sharded like the leaves.
- the main rank (0) logs and writes files; a sharded state is checkpointed by every rank, its local
  shards under ``checkpoints/rank-{r}-of-{n}`` (:func:`checkpoint_dir`), and resumes only on ``n`` ranks.

Example:
    >>> import torch
    >>> world().rank, world().size
    (0, 1)
    >>> loss, grads = mean_over_ranks(0.5, {"w": torch.ones(2)})
    >>> loss, grads["w"].tolist()
    (0.5, [1.0, 1.0])
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import optree
import torch
import torch.distributed as dist

from dsf.training import checkpoint, optim
from dsf.tree import NAMESPACE

if dist.is_available():
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: its ``rank`` among ``size`` processes, its rank on its node,
    and the device it computes on.

    >>> World(rank=1, size=2).micro_batch_index(3)
    7
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    def micro_batch_index(self, micro_batch: int) -> int:
        """The index among all ranks' micro-batches of a step of this rank's ``micro_batch``."""
        return micro_batch * self.size + self.rank


def world() -> World:
    """The job this process belongs to (a single process when :func:`init` has not joined one).

    A rank of an NCCL job computes on the GPU of its local rank, one of a gloo job on the CPU.

    >>> world().size
    1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init(backend: str | None = None, timeout: datetime.timedelta | None = None) -> World:
    """Join the torchrun job this process was started in; return :func:`world`.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a process
    started without torchrun stays a single process. Calling it again returns the same world.
    ``backend`` defaults to ``"nccl"`` where CUDA is available, else ``"gloo"`` (pass ``"gloo"`` to
    train on CPUs anyway); ``timeout`` bounds each collective (torch's default otherwise).

    >>> init().size  # no torchrun variables here
    1
    """
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return world()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with torchrun (it sets all of "
            f"{', '.join(TORCHRUN_VARIABLES)}) or unset WORLD_SIZE to run a single process"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with it to run under torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timeout)
    return world()


def is_main() -> bool:
    """Whether this process is rank 0, the one that logs and writes files.

    >>> is_main()
    True
    """
    return world().rank == 0


def barrier() -> None:
    """Wait until every rank arrives here (nothing to wait for in a single process).

    >>> barrier()
    """
    if world().size > 1:
        dist.barrier()


def mesh() -> DeviceMesh:
    """The 1-D device mesh over every rank of the job, on this rank's device type.

    >>> mesh()
    Traceback (most recent call last):
    ...
    RuntimeError: a device mesh needs a torchrun job: call dsf.training.distributed.init() in a process started by torchrun
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a device mesh needs a torchrun job: call dsf.training.distributed.init() in a process started by torchrun")
    current = world()
    return init_device_mesh(current.device.type, (current.size,))


# ----------------------------------------------------------------------------- DTensor shards


def is_sharded(value) -> bool:
    """Whether ``value`` is a DTensor (its elements spread over, or replicated on, the mesh's ranks).

    >>> is_sharded(torch.ones(2))
    False
    """
    return dist.is_available() and isinstance(value, DTensor)


def holds_shards(tree) -> bool:
    """Whether a tree (weight records included) holds a DTensor.

    >>> holds_shards({"w": torch.ones(2), "step": 3})
    False
    """
    return any(is_sharded(leaf) for leaf in optree.tree_leaves(tree, namespace=NAMESPACE))


def rows_of_rank(tensor: torch.Tensor, ranks: int, rank: int) -> torch.Tensor:
    """The rows of ``tensor`` that rank ``rank`` of ``ranks`` holds under torch's ``Shard(0)`` split (a view):
    chunks of ⌈rows / ranks⌉ rows in rank order, so the last ranks may hold fewer rows, or none.

    >>> [rows_of_rank(torch.arange(5), 4, rank).tolist() for rank in range(4)]
    [[0, 1], [2, 3], [4], []]
    """
    chunk = -(-tensor.shape[0] // ranks)
    start = min(rank * chunk, tensor.shape[0])
    return tensor[start : start + chunk]


def distribute(tensor: torch.Tensor, device_mesh: DeviceMesh, keep_device: bool = False) -> DTensor:
    """``tensor`` split along its first dimension over ``device_mesh`` (a 0-d tensor is replicated).

    Every rank must hold the same whole tensor, as dsf's keyed initialization and loading give: each
    copies its rows (torch's ``Shard(0)`` split: the last ranks may hold fewer, or none) and nothing is
    sent. The copy goes to the mesh's device, as ``distribute_tensor`` puts it; with ``keep_device``
    it stays on the tensor's device, in pinned memory when the tensor is pinned (storage that offload
    keeps off the GPU stays there). A tensor on ``meta`` stays on ``meta``.

    >>> distribute(torch.ones(2), None)
    Traceback (most recent call last):
    ...
    ValueError: distribute needs a device mesh (dsf.training.distributed.mesh()), got None
    """
    if device_mesh is None:
        raise ValueError("distribute needs a device mesh (dsf.training.distributed.mesh()), got None")
    tensor = tensor.detach()
    rows = rows_of_rank(tensor, device_mesh.size(), device_mesh.get_local_rank()) if tensor.ndim else tensor
    stays = keep_device or tensor.is_meta
    device = tensor.device if stays else torch.device(device_mesh.device_type)
    local = torch.empty_like(rows, device=device, pin_memory=stays and tensor.is_pinned()).copy_(rows)
    placements = [Shard(0)] if tensor.ndim else [Replicate()]
    return _around(local, device_mesh, placements, tensor.shape, tensor.stride())


def _around(local: torch.Tensor, device_mesh: DeviceMesh, placements, shape, stride) -> DTensor:
    """A DTensor around ``local`` where it lives. ``DTensor.from_local`` would move a CPU shard to the
    GPU of an NCCL mesh; this is the constructor FSDP2 keeps CPU-offloaded shards with (``_from_local_no_grad``)."""
    meta = TensorMeta(torch.Size(shape), tuple(stride), local.dtype)
    return DTensor(local, DTensorSpec(device_mesh, tuple(placements), tensor_meta=meta), requires_grad=False)


def shard_like(local: torch.Tensor, like) -> torch.Tensor:
    """``local`` as this rank's shard of a DTensor with the mesh, placements, shape and stride of the DTensor
    ``like``, left where it lives (a pinned CPU shard stays pinned, on the CPU); a plain ``like`` gives ``local``.

    >>> shard_like(torch.zeros(2), torch.ones(2))
    tensor([0., 0.])
    """
    if not is_sharded(like):
        return local
    return _around(local, like.device_mesh, like.placements, like.shape, like.stride())


def max_over_ranks(value: torch.Tensor, device_mesh: DeviceMesh) -> torch.Tensor:
    """The elementwise maximum of ``value`` over the ranks of ``device_mesh``, on ``value``'s device: one
    all-reduce (MAX) of a copy on the world's device, since NCCL reduces GPU memory only.

    >>> max_over_ranks(torch.ones(1), None)
    Traceback (most recent call last):
    ...
    ValueError: max_over_ranks needs a device mesh (dsf.training.distributed.mesh()), got None
    """
    if device_mesh is None:
        raise ValueError("max_over_ranks needs a device mesh (dsf.training.distributed.mesh()), got None")
    on_world = value.to(world().device, copy=True)
    dist.all_reduce(on_world, op=dist.ReduceOp.MAX, group=device_mesh.get_group())
    return on_world.to(value.device)


def _largest_magnitude(tensor: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of ``tensor``'s elements as a float32 scalar (0 for no elements)."""
    if tensor.numel() == 0:
        return torch.zeros((), device=tensor.device)
    low, high = torch.aminmax(tensor.detach())
    return torch.maximum(-low, high).float()


def quantized_shards(quantize, value: DTensor, granularity: str) -> tuple[DTensor, DTensor]:
    """``quantize(value, granularity)`` of a DTensor split by rows, computed on each rank's local shard where it
    lives (a CPU shard of an offloaded weight included): the bytes and scale of quantizing the whole tensor.

    Per channel (row) each rank quantizes its own rows, the scale split like them; per tensor the ranks
    first agree on the largest magnitude (:func:`max_over_ranks`, one element), the scale replicated.
    ``quantize(tensor, granularity, amax=None) -> (data, scale)`` is :func:`dsf.transforms.fp8.quantize`,
    ``amax`` the per-tensor largest magnitude to scale by. Data and scale are pinned where the shard is.

    >>> quantized_shards(None, torch.ones(2, 2), "tensor")
    Traceback (most recent call last):
    ...
    ValueError: quantized_shards quantizes a DTensor split along its first dimension (shard()), got a Tensor
    """
    if not (is_sharded(value) and tuple(value.placements) == (Shard(0),)):
        placed = getattr(value, "placements", None)
        raise ValueError(
            f"quantized_shards quantizes a DTensor split along its first dimension (shard()), got a {type(value).__name__}"
            + (f" placed {placed}" if placed else "")
        )
    local = value.to_local()
    if granularity == "tensor":
        data, scale = quantize(local, granularity, amax=max_over_ranks(_largest_magnitude(local), value.device_mesh))
        scale = _around(_pinned_like(scale, local), value.device_mesh, [Replicate()], scale.shape, scale.stride())
    else:
        data, scale = quantize(local, granularity)  # (rows, 1, ...): the whole scale has the shard's strides
        whole = (value.shape[0], *scale.shape[1:])
        scale = _around(_pinned_like(scale, local), value.device_mesh, [Shard(0)], whole, scale.stride())
    return shard_like(_pinned_like(data, local), value), scale


def _pinned_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory() if reference.is_pinned() and not tensor.is_pinned() else tensor


def gathered(value):
    """A DTensor as the plain whole tensor on every rank (a collective: every rank calls it); others unchanged.

    1-byte floats (fp8) travel as bytes. In backward, the gradient of the whole tensor is averaged
    over the ranks and each keeps its shard of it (a reduce-scatter): every rank computed it on its
    own data, as in data-parallel training.

    >>> gathered(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    if not is_sharded(value):
        return value
    if value.is_floating_point() and value.element_size() == 1:
        as_bytes = DTensor.from_local(
            value.to_local().view(torch.uint8), value.device_mesh, value.placements,
            shape=value.shape, stride=value.stride(), run_check=False,
        )
        return as_bytes.full_tensor().view(value.dtype)
    return value.full_tensor(grad_placements=[Partial("avg")] * value.device_mesh.ndim)


def full_tensors(tree):
    """Every DTensor of a tree as its plain whole tensor (a collective); other leaves unchanged.

    >>> full_tensors({"w": torch.zeros(1), "step": 2})
    {'w': tensor([0.]), 'step': 2}
    """
    return optree.tree_map(gathered, tree, namespace=NAMESPACE)


def local_shards(tree):
    """Every DTensor of a tree as this rank's local tensor (no communication); other leaves unchanged.

    >>> local_shards({"w": torch.zeros(1)})
    {'w': tensor([0.])}
    """
    return optree.tree_map(lambda leaf: leaf.to_local() if is_sharded(leaf) else leaf, tree, namespace=NAMESPACE)


def sharded_like(tree, like: dict[str, torch.Tensor]):
    """A nested dict whose tensors at keys of ``like`` become shards like ``like``'s DTensors.

    The inverse of :func:`local_shards` for states keyed by leaf path (trainable leaves, optimizer
    moments): a tensor under key ``path`` is taken as this rank's local shard of ``like[path]``.

    >>> sharded_like({"step": 1, "exp_avg": {"w": torch.zeros(1)}}, {"w": torch.ones(1)})
    {'step': 1, 'exp_avg': {'w': tensor([0.])}}
    """
    if not isinstance(tree, dict):
        return tree
    return {
        key: _shard_of(value, like[key], key)
        if key in like and is_sharded(like[key]) and isinstance(value, torch.Tensor)
        else sharded_like(value, like)
        for key, value in tree.items()
    }


def _shard_of(local: torch.Tensor, like: DTensor, path: str) -> DTensor:
    expected = tuple(like.to_local().shape)
    if tuple(local.shape) != expected:
        raise ValueError(
            f"the local shard of {path!r} has shape {tuple(local.shape)}, but rank {world().rank} of {world().size} holds "
            f"{expected} of its {tuple(like.shape)}: a sharded state resumes only on the number of ranks that saved it"
        )
    return DTensor.from_local(
        local.to(like.device), like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
    )


def shardwise(optimizer: optim.Optimizer) -> optim.Optimizer:
    """``optimizer`` run on each rank's local shards of DTensor leaves, its state sharded like them.

    Exact for elementwise optimizers such as :func:`dsf.training.optim.adamw`; plain leaves pass as they are.

    >>> opt = shardwise(optim.adamw(learning_rate=0.1, weight_decay=0.0))
    >>> trainable = {"w": torch.zeros(1)}
    >>> opt.update({"w": torch.ones(1)}, opt.init(trainable), trainable)[0]["w"]
    tensor([-0.1000])
    """

    def init(trainable):
        return sharded_like(optimizer.init(local_shards(trainable)), trainable)

    def update(grads, state, trainable):
        new_trainable, new_state = optimizer.update(local_shards(grads), local_shards(state), local_shards(trainable))
        return sharded_like(new_trainable, trainable), sharded_like(new_state, trainable)

    return optim.Optimizer(init, update)


def _split_over_ranks(value) -> bool:
    return is_sharded(value) and any(placement.is_shard() for placement in value.placements)


def global_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`dsf.training.optim.global_norm` of gradients of which some may be sharded (their squares summed over ranks).

    >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    if not holds_shards(grads):
        return optim.global_norm(grads)
    norms = torch._foreach_norm(list(local_shards(grads).values()), 2)
    squares = torch.stack([norm.float() for norm in norms]) ** 2
    split = torch.tensor([_split_over_ranks(g) for g in grads.values()], device=squares.device)
    summed_over_ranks = squares[split].sum()
    dist.all_reduce(summed_over_ranks)
    return torch.sqrt(summed_over_ranks + squares[~split].sum())


def clip_by_global_norm(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`dsf.training.optim.clip_by_global_norm` of gradients of which some may be sharded.

    >>> clipped, norm = clip_by_global_norm({"g": torch.tensor([6.0, 8.0])}, max_norm=5.0)
    >>> clipped["g"], norm
    (tensor([3.0000, 4.0000]), tensor(10.))
    """
    if not holds_shards(grads):
        return optim.clip_by_global_norm(grads, max_norm)
    norm = global_norm(grads)
    clipped, _ = optim.clip_by_global_norm(local_shards(grads), max_norm, norm=norm)
    return sharded_like(clipped, grads), norm


# ----------------------------------------------------------------------------- data parallelism


def rank_batches(stream: Iterator[tuple[Any, Any]], world: World) -> Iterator[tuple[Any, Any]]:
    """This rank's share of a ``(position, batch)`` stream: of each ``world.size`` consecutive
    batches the ``world.rank``-th, with the position after the last of them (where every rank resumes).

    A stream with a ``skip()`` method returning the position after the batch it passes (what
    :func:`dsf.training.data.batches` returns) passes the other ranks' batches without loading them; any
    other stream is drawn in full on every rank.

    >>> stream = ((position, f"batch {position - 1}") for position in range(1, 7))
    >>> list(rank_batches(stream, World(rank=1, size=2)))
    [(2, 'batch 1'), (4, 'batch 3'), (6, 'batch 5')]
    """
    if world.size == 1:
        yield from stream
        return
    skip = getattr(stream, "skip", lambda: next(stream)[0])
    while True:
        try:
            for rank in range(world.size):
                if rank == world.rank:
                    position, batch = next(stream)
                else:
                    position = skip()
        except StopIteration:
            return
        yield position, batch


def mean_over_ranks(loss: float, grads: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the replicated gradients averaged over the ranks (one all-reduce per dtype, on the
    rank's device, each gradient returned where it was: a CPU-stored weight's gradient under offload).

    Gradients of DTensor leaves pass unchanged: their gather's reduce-scatter averaged them.

    >>> mean_over_ranks(2.0, {"w": torch.ones(1)})
    (2.0, {'w': tensor([1.])})
    """
    current = world()
    if current.size == 1:
        return loss, grads
    total_loss = torch.tensor([loss], dtype=torch.float64, device=current.device)
    dist.all_reduce(total_loss)
    averaged = dict(grads)
    for paths in _paths_by_dtype({path: g for path, g in grads.items() if not is_sharded(g)}).values():
        flat = torch.cat([grads[path].reshape(-1) for path in paths]).to(current.device)  # NCCL reduces GPU memory only
        dist.all_reduce(flat)
        flat /= current.size
        pieces = flat.split([grads[path].numel() for path in paths])
        averaged.update({path: piece.view_as(grads[path]).to(grads[path].device) for path, piece in zip(paths, pieces)})
    return total_loss.item() / current.size, averaged


def _paths_by_dtype(tensors: dict[str, torch.Tensor]) -> dict[torch.dtype, list[str]]:
    groups: dict[torch.dtype, list[str]] = {}
    for path, tensor in tensors.items():
        groups.setdefault(tensor.dtype, []).append(path)
    return groups


# ----------------------------------------------------------------------------- checkpoints


_RANK_FOLDER = re.compile(r"rank-(\d+)-of-(\d+)")


def checkpoint_dir(output_path: str | None, trainable: dict[str, torch.Tensor]) -> str | None:
    """Where this rank keeps the resumable checkpoints of a run training ``trainable`` (``None``: nowhere).

    ``output_path/checkpoints``, written by the main rank, when the trainable leaves are replicated
    (any number of ranks resumes it); ``output_path/checkpoints/rank-{r}-of-{n}`` when they are
    sharded. A folder that holds the other kind, or shards of another number of ranks, is refused.

    >>> checkpoint_dir("/tmp/run", {"w": torch.ones(1)})
    '/tmp/run/checkpoints'
    """
    if output_path is None:
        return None
    root = os.path.join(output_path, "checkpoints")
    current = world()
    saved_by = sorted({int(m.group(2)) for name in _listing(root) if (m := _RANK_FOLDER.fullmatch(name))})
    if not holds_shards(trainable):
        if saved_by:
            raise ValueError(
                f"{root} holds the sharded checkpoints of a run on {saved_by[0]} ranks, but this run on {current.size} "
                f"does not shard its trainable leaves: a sharded state resumes only on the number of ranks that saved "
                f"it, with shard() over the trainable leaves (torchrun with {saved_by[0]} processes in all); "
                "or choose another output_path"
            )
        return root
    other_sizes = [size for size in saved_by if size != current.size]
    if other_sizes:
        raise ValueError(
            f"{root} holds the checkpoints of a sharded run on {other_sizes[0]} ranks, and this run has {current.size}: "
            f"a sharded state resumes only on the number of ranks that saved it (torchrun with {other_sizes[0]} "
            "processes in all), or choose another output_path"
        )
    if checkpoint.all_steps(root):
        raise ValueError(
            f"{root} holds the checkpoints of a run whose trainable leaves were not sharded, and this run shards "
            "them: resume it without shard() over the trainable leaves, or choose another output_path"
        )
    return os.path.join(root, f"rank-{current.rank}-of-{current.size}")


def _listing(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def latest_step(directory: str) -> int | None:
    """The newest checkpoint step that every rank holds in its ``directory`` (``None``: none).

    >>> latest_step("/nonexistent/checkpoints") is None
    True
    """
    steps = checkpoint.all_steps(directory)
    if world().size == 1:
        return steps[-1] if steps else None
    every_rank: list[list[int]] = [[] for _ in range(world().size)]
    dist.all_gather_object(every_rank, steps)
    common = set.intersection(*map(set, every_rank))
    if not common and any(every_rank):
        held = "; ".join(f"rank {rank}: {held}" for rank, held in enumerate(every_rank))
        raise RuntimeError(
            f"the ranks hold no checkpoint step in common ({held}): keep output_path on a filesystem every rank "
            "shares, and keep_last at 2 or more so that a save interrupted on one rank leaves a step all ranks hold"
        )
    return max(common) if common else None


def save_state(directory: str, step: int, state: dict, keep_last: int | None = None) -> None:
    """:func:`dsf.training.checkpoint.save_state` for a job: a state holding shards is written by every rank
    (its local shards, in its own ``directory``), a replicated one by the main rank; returns when all are done.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_state(folder, 1, {"w": torch.ones(1)})
    ...     checkpoint.all_steps(folder)
    [1]
    """
    if holds_shards(state) or is_main():
        checkpoint.save_state(directory, step, local_shards(state), keep_last=keep_last)
    barrier()
