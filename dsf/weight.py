"""Weight records: a stored tensor plus the slots that storage transforms fill, and one `materialize`.

A parameter in a tree is either a plain tensor or a :class:`Weight`. A weight keeps its stored
``data`` and up to one *stage* per physical phase, always run in this order at use:

    fetch (offload) -> gather (shard) -> decode (fp8, dtype cast) -> adapt (lora)

Fetch and gather act on the whole record (they move or assemble ``data`` and the tensors of the
later stages) and return a record without their stage; decode and adapt turn the stored value into
what the computation uses. The order is fixed here, so the order in which transforms were chained
never matters. A stage is an optree dataclass node: its tensors are leaves of the parameter tree
(e.g. ``blocks/0/q/weight/adapt/down``), so gradients, optimizers and checkpoints see them.

Example:
    >>> import torch
    >>> from dsf.weight import Weight, Cast, materialize
    >>> w = Weight(torch.ones(2, 2, dtype=torch.bfloat16)).with_stage(Cast(torch.float32))
    >>> materialize(w).dtype
    torch.float32

Writing a storage transform
---------------------------
A transform's ``init`` sees the tree as the transforms chained before it left it: plain tensors, and
records whose slots they filled. What a slot tells about ``data``:

- fetch (offload): ``data`` and the tensors of the decode stage live in storage memory (the CPU,
  pinned for a GPU, or a :class:`dsf.files.disk.DiskTensor` still on disk);
- gather (shard): ``data`` is a DTensor holding this rank's rows;
- decode (fp8, :class:`Cast`, or a transform written outside dsf): ``data`` is encoded, and only that
  stage can read it; its dtype says nothing about the weight (fp8 bytes, int8, packed bits);
- adapt (lora): factors applied to the decoded value, whatever decoded it.

The rules, which make "chain order never matters" hold for a transform written outside dsf too:

1. **Claim a slot only if it is free.** Before changing anything, a transform that fills a slot calls
   :func:`check_slot_free` on each weight it selects: a slot another transform filled is refused at
   init with an error naming the transform, the weight, the stage there and its storage. Each of two
   transforms claiming one slot refuses the other's record, so the pair fails at init in every order.
2. **Select by ``where=`` and shape, never by the dtype of ``data``.** A record whose decode slot is
   filled holds encoded storage, whatever its dtype, not something to skip: skipping it keeps the other
   transform's storage in one order and not in the other. Handle it (move it, split its bytes) or refuse
   it (rule 1). :func:`is_float_weight` tells the two apart: a tensor that is not floating point and not
   encoded (an index table) is no weight, and passes.
3. **Keep the meaning of the slots already filled.** Re-encode ``data`` where it lives (its device; pinned
   stays pinned), in the weight's shape (``Weight.shape`` is what lora and shard read), and keep the
   other stages: ``Weight(new_data, record.stages).with_stage(new_stage)``.
4. **Whole-record phases carry what they do not know.** A fetch or gather stage moves or assembles every
   tensor of the record (``optree.tree_map`` over it), whatever stage holds it.

A complete storage transform, int8 weights with a per-tensor scale (what tests/test_transform_law.py
composes with every transform of dsf, in every order):

    >>> import optree, dsf
    >>> @stage("decode")
    ... class Int8(Stage):
    ...     scale: torch.Tensor
    ...     dtype: torch.dtype = optree.dataclasses.field(pytree_node=False)
    ...
    ...     def apply(self, value):
    ...         return (value.to(torch.float32) * self.scale).to(self.dtype)
    >>> def int8(where=None) -> dsf.Transform:
    ...     keep = dsf.tree.as_predicate(where)
    ...
    ...     def selected(path, param):  # rule 2: where= and shape; encoded storage is not skipped
    ...         return keep(path, param) and is_float_weight(param) and len(param.shape) >= 2
    ...
    ...     def stored(path, param):
    ...         check_slot_free("int8", path, param, "decode")  # rule 1, before anything changes
    ...         record = as_weight(param)
    ...         scale = record.data.detach().abs().amax().float().clamp(min=1e-12) / 127
    ...         data = (record.data.detach().float() / scale).round().to(torch.int8)
    ...         data = data.pin_memory() if record.data.is_pinned() else data  # rule 3: where it lived
    ...         return Weight(data, record.stages).with_stage(Int8(scale, record.data.dtype))
    ...
    ...     return dsf.Transform("int8", init_fn=lambda params, key=None: map_weights(stored, params, selected))
    >>> params = {"q": {"weight": torch.tensor([[0.5, -1.0], [0.25, 0.0]]), "bias": torch.zeros(2)}}
    >>> stored = int8().init(params)
    >>> stored["q"]["weight"].data.dtype, materialize(stored["q"]["weight"]).tolist()
    (torch.int8, [[0.5039370059967041, -1.0], [0.25196850299835205, 0.0]])
    >>> from dsf.transforms import fp8
    >>> dsf.chain(int8(), fp8()).init(params)
    Traceback (most recent call last):
    ...
    ValueError: fp8 cannot store 'q/weight': its decode slot already holds Int8 (int8 storage) from another transform; a weight takes one decode transform, in any chain order: narrow the where= of one of them
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator

import optree
import torch

from dsf.tally import Tally
from dsf.tree import NAMESPACE, map_with_path

PHASES = ("fetch", "gather", "decode", "adapt")
_RECORD_PHASES = ("fetch", "gather")


class Stage:
    """Base of stage records. Subclasses set ``phase`` and implement ``apply``.

    ``apply(record) -> record`` for the fetch and gather phases, ``apply(value) -> value`` for
    decode and adapt. ``combine(other)`` says what happens when a second stage claims the same
    phase of a weight: by default it is an error (two transforms claiming one slot).
    """

    phase: ClassVar[str]

    def apply(self, value):
        raise NotImplementedError

    def combine(self, other: "Stage") -> "Stage":
        raise ValueError(
            f"two transforms claim the {self.phase!r} slot of one weight: {type(self).__name__} is there, "
            f"{type(other).__name__} was added; apply only one {self.phase} transform to a weight (narrow `where=`)"
        )


class Weight:
    """A stored tensor and its filled slots (a dict phase -> stage).

    What trains is never marked on the record: a paradigm's ``where=`` says it
    (:class:`dsf.training.paradigm.Paradigm`), and storage that cannot be trained (fp8) is refused there.

    >>> w = Weight(torch.zeros(3))
    >>> w.slot_names()
    []
    """

    __slots__ = ("data", "stages")

    def __init__(self, data, stages: dict[str, Stage] | None = None):
        self.data = data
        self.stages = dict(stages or {})

    def slot_names(self) -> list[str]:
        return [p for p in PHASES if p in self.stages]

    def with_stage(self, stage: Stage) -> "Weight":
        """A copy with ``stage`` in its phase (combined with a stage already there, or an error)."""
        if stage.phase not in PHASES:
            raise ValueError(f"unknown weight phase {stage.phase!r}; phases are {PHASES}")
        present = self.stages.get(stage.phase)
        stages = dict(self.stages)
        stages[stage.phase] = stage if present is None else present.combine(stage)
        return Weight(self.data, stages)

    def without_stage(self, phase: str) -> "Weight":
        return Weight(self.data, {p: s for p, s in self.stages.items() if p != phase})

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __repr__(self) -> str:
        data = self.data
        desc = f"{tuple(data.shape)} {data.dtype} {data.device}" if isinstance(data, torch.Tensor) else repr(data)
        return f"Weight({desc}, slots={self.slot_names()})"


def _flatten_weight(w: Weight):
    phases = tuple(w.slot_names())
    return (w.data, *(w.stages[p] for p in phases)), phases, ("data", *phases)


def _unflatten_weight(phases, children):
    data, *stages = children
    return Weight(data, dict(zip(phases, stages)))


optree.register_pytree_node(Weight, _flatten_weight, _unflatten_weight, namespace=NAMESPACE)


def stage(phase: str):
    """Class decorator: an optree dataclass stage record of ``phase``.

    Fields are tree leaves (tensors) unless declared with ``optree.dataclasses.field(pytree_node=False)``.
    """

    def make(cls):
        cls = optree.dataclasses.dataclass(cls, frozen=True, namespace=NAMESPACE)
        cls.phase = phase
        return cls

    return make


@stage("decode")
class Cast(Stage):
    """Decode stage: compute in ``dtype`` while storing another (e.g. bf16 storage, fp32 compute).

    >>> materialize(Weight(torch.ones(1, dtype=torch.float16)).with_stage(Cast(torch.float32))).dtype
    torch.float32
    """

    dtype: torch.dtype = optree.dataclasses.field(pytree_node=False)

    def apply(self, value):
        return value.to(self.dtype)


_materialize_counter = Tally("materialize_counter", lambda: [0])


@contextlib.contextmanager
def count_materializations() -> Iterator[list[int]]:
    """Count weight records materialized inside the block (``counter[0]``), backward recompute included.

    >>> with count_materializations() as counter:
    ...     _ = materialize(Weight(torch.ones(1)))
    >>> counter[0]
    1
    """
    with _materialize_counter.counting() as counter:
        yield counter


def materialize(param):
    """The value a computation uses: a plain tensor unchanged, a weight run through its stages.

    >>> materialize(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    if not isinstance(param, Weight):
        return param
    counter = _materialize_counter.current()
    if counter is not None:
        counter[0] += 1
    record = param
    for phase in _RECORD_PHASES:
        if phase in record.stages:
            record = record.stages[phase].apply(record)
    value = record.data
    for phase in PHASES:
        if phase not in _RECORD_PHASES and phase in record.stages:
            value = record.stages[phase].apply(value)
    return value


def materialize_tree(tree):
    """Every weight record of a tree materialized; plain tensors pass through.

    >>> materialize_tree({"w": Weight(torch.zeros(1))})["w"]
    tensor([0.])
    """
    return map_with_path(lambda _, x: materialize(x), tree, is_leaf=lambda x: isinstance(x, Weight))


def dense(param):
    """The value of a parameter as a plain tensor: materialized, and an adapted form (factored LoRA) merged.

    Ops that need the whole matrix (conv, norms, ``functional_call``) use this; ``ops.linear`` keeps
    a form factored.

    >>> dense(Weight(torch.ones(1))).tolist()
    [1.0]
    """
    value = materialize(param)
    return value.merge() if hasattr(value, "merge") else value


def dense_tree(tree):
    """Every parameter of a tree as a plain tensor (see :func:`dense`).

    >>> dense_tree({"w": Weight(torch.zeros(1))})["w"]
    tensor([0.])
    """
    return map_with_path(lambda _, x: dense(x), tree, is_leaf=lambda x: isinstance(x, Weight))


def map_weights(fn, tree, where=None):
    """Apply ``fn(path, param) -> param`` to every parameter (tensor or record) matching ``where``.

    This is how a transform's ``init`` installs its stages.

    >>> map_weights(lambda p, w: Weight(w), {"a": torch.ones(1)})["a"]
    Weight((1,) torch.float32 cpu, slots=[])
    """
    from dsf.tree import as_predicate

    keep = as_predicate(where)

    def visit(path: str, param: Any):
        return fn(path, param) if keep(path, param) else param

    return map_with_path(visit, tree, is_leaf=lambda x: isinstance(x, Weight))


def is_float_weight(param) -> bool:
    """Whether ``param`` is a floating-point weight: float data, or data that a decode stage encodes (fp8 bytes, an
    outsider's int8); an integer tensor without a decode stage (an index table) is not one.

    >>> is_float_weight(torch.ones(1)), is_float_weight(torch.arange(2)), is_float_weight(Weight(torch.arange(2)))
    (True, False, False)
    >>> is_float_weight(Weight(torch.ones(1, dtype=torch.int8)).with_stage(Cast(torch.float32)))
    True
    """
    record = as_weight(param)
    dtype = getattr(record.data, "dtype", None)
    return "decode" in record.stages or (dtype is not None and dtype.is_floating_point)


def check_slot_free(transform: str, path: str, param, phase: str) -> None:
    """Refuse, at init, to fill the ``phase`` slot of the weight at ``path`` when another transform's stage holds it
    (rule 1 of the module's guide); ``transform`` names the transform asking.

    >>> check_slot_free("int8", "w", Weight(torch.ones(1)), "decode")
    >>> check_slot_free("int8", "w", Weight(torch.ones(1, dtype=torch.bfloat16)).with_stage(Cast(torch.float32)), "decode")
    Traceback (most recent call last):
    ...
    ValueError: int8 cannot store 'w': its decode slot already holds Cast (bfloat16 storage) from another transform; a weight takes one decode transform, in any chain order: narrow the where= of one of them
    """
    if phase not in PHASES:
        raise ValueError(f"unknown weight phase {phase!r}; phases are {PHASES}")
    present = param.stages.get(phase) if isinstance(param, Weight) else None
    if present is None:
        return
    storage = getattr(param.data, "dtype", type(param.data).__name__)
    raise ValueError(
        f"{transform} cannot store {path!r}: its {phase} slot already holds {type(present).__name__} "
        f"({str(storage).removeprefix('torch.')} storage) from another transform; a weight takes one {phase} transform, "
        "in any chain order: narrow the where= of one of them"
    )


def as_weight(param) -> Weight:
    """A weight record of a parameter (a plain tensor becomes a record without stages)."""
    return param if isinstance(param, Weight) else Weight(param)


def compute_device(param) -> torch.device:
    """The device a parameter is used on: its fetch stage's target (offload), else where its data is.

    >>> compute_device(Weight(torch.ones(1)))
    device(type='cpu')
    """
    if isinstance(param, Weight):
        target = getattr(param.stages.get("fetch"), "device", None)
        return torch.device(target) if target is not None else param.data.device
    return param.device


def compute_dtype(param) -> torch.dtype:
    """The dtype a parameter computes in: its decode stage's (fp8, cast), else its data's.

    >>> compute_dtype(Weight(torch.ones(1, dtype=torch.bfloat16)).with_stage(Cast(torch.float32)))
    torch.float32
    """
    if isinstance(param, Weight):
        target = getattr(param.stages.get("decode"), "dtype", None)
        return target if target is not None else param.data.dtype
    return param.dtype
