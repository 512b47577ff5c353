"""Parameter trees: optree helpers over nested dicts and lists of tensors and weight records.

A path is the "/"-joined chain of dict keys and list indices down to a leaf, e.g.
``blocks/0/attn/to_q/weight``. Checkpoint files join the same chain with "." instead;
:func:`flatten_dict` and :func:`unflatten_dict` convert between the tree and such a flat mapping.

Example:
    >>> import torch, dsf
    >>> params = {"blocks": [{"w": torch.ones(2, 2)}, {"w": torch.zeros(2, 2)}], "head": torch.ones(2)}
    >>> dsf.tree.paths(params)
    ['blocks/0/w', 'blocks/1/w', 'head']
    >>> trainable, frozen = dsf.tree.partition(params, r"^blocks/")
    >>> sorted(dsf.tree.select(trainable, None))
    ['blocks/0/w', 'blocks/1/w']
    >>> dsf.tree.combine(trainable, frozen)["head"] is params["head"]
    True
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import optree
import torch

NAMESPACE = "dsf"  # optree registry namespace of dsf's records (weights and their stages)

Predicate = Callable[[str, Any], bool]
Where = None | str | Iterable[str] | Predicate


def _join(path: tuple) -> str:
    return "/".join(str(entry) for entry in path)


def leaves_with_paths(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in flattening order (``None`` holes skipped)."""
    paths_, leaves, _ = optree.tree_flatten_with_path(tree, is_leaf=is_leaf, namespace=NAMESPACE)
    return [(_join(p), leaf) for p, leaf in zip(paths_, leaves)]


def paths(tree) -> list[str]:
    """The "/"-joined path of every leaf."""
    return [p for p, _ in leaves_with_paths(tree)]


def map_with_path(fn: Callable[..., Any], tree, *rest, is_leaf=None):
    """``fn(path, leaf, *other_leaves)`` over every leaf; returns a tree of the same structure.

    >>> map_with_path(lambda p, x: p, {"a": [1, 2]})
    {'a': ['a/0', 'a/1']}
    """
    return optree.tree_map_with_path(lambda p, *xs: fn(_join(p), *xs), tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def as_predicate(where: Where) -> Predicate:
    """A ``(path, leaf) -> bool`` filter from ``None`` (all), a regex, a list of regexes or a callable.

    Regexes are searched (``re.search``) in the "/"-joined path.

    >>> as_predicate(r"lora_(down|up)$")("blocks/0/q/weight/lora_up", None)
    True
    """
    if where is None:
        return lambda path, leaf: True
    if callable(where):
        return where
    patterns = [where] if isinstance(where, str) else list(where)
    compiled = [re.compile(p) for p in patterns]
    return lambda path, leaf: any(c.search(path) for c in compiled)


def select(tree, where: Where) -> dict[str, Any]:
    """``{path: leaf}`` of the leaves matching ``where``.

    >>> select({"a": 1, "b": 2}, "b")
    {'b': 2}
    """
    keep = as_predicate(where)
    return {p: x for p, x in leaves_with_paths(tree) if keep(p, x)}


def partition(tree, where: Where):
    """Split a tree into (matching, rest): two trees of the same structure with ``None`` holes.

    >>> partition({"a": 1, "b": 2}, "a")
    ({'a': 1, 'b': None}, {'a': None, 'b': 2})
    """
    keep = as_predicate(where)
    selected = map_with_path(lambda p, x: x if keep(p, x) else None, tree)
    rest = map_with_path(lambda p, x: None if keep(p, x) else x, tree)
    return selected, rest


def combine(*trees):
    """Merge trees from :func:`partition`: at each leaf, the first value that is not ``None``.

    >>> combine({"a": 1, "b": None}, {"a": None, "b": 2})
    {'a': 1, 'b': 2}
    """

    def first(*xs):
        return next((x for x in xs if x is not None), None)

    return optree.tree_map(first, *trees, none_is_leaf=True, namespace=NAMESPACE)


def flatten_dict(tree, sep: str = ".") -> dict[str, Any]:
    """The flat ``{key: leaf}`` mapping of a checkpoint file (keys joined with ``sep``).

    >>> flatten_dict({"blocks": [{"w": 1}]})
    {'blocks.0.w': 1}
    """
    return {p.replace("/", sep): x for p, x in leaves_with_paths(tree)}


def unflatten_dict(flat: dict[str, Any], sep: str = "."):
    """Nested dicts from flat checkpoint keys; a level whose keys are 0..n-1 becomes a list.

    >>> unflatten_dict({"blocks.1.w": 2, "blocks.0.w": 1, "head": 0})
    {'blocks': [{'w': 1}, {'w': 2}], 'head': 0}
    """
    root: dict = {}
    for name, value in flat.items():
        node = root
        *parents, last = name.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint key {name!r} nests below a tensor of the same name")
        if last in node:
            raise ValueError(f"checkpoint key {name!r} collides with a nested key")
        node[last] = value
    return _lists_from_int_keys(root)


def _lists_from_int_keys(node):
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_int_keys(v) for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        indices = sorted(int(k) for k in children)
        if indices == list(range(len(indices))):
            return [children[str(i)] for i in indices]
    return children


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor leaf (inside weight records too)."""
    return [x for _, x in leaves_with_paths(tree) if isinstance(x, torch.Tensor)]


def nbytes(tree) -> int:
    """Bytes held by the tensors of a tree (meta tensors count their would-be size)."""
    return sum(t.numel() * t.element_size() for t in tensors(tree))


def num_params(tree) -> int:
    """Number of elements in the tensors of a tree."""
    return sum(t.numel() for t in tensors(tree))


def summary(params) -> str:
    """A table with one row per parameter: path, shape, dtype, device, bytes and filled weight slots.

    >>> print(summary({"w": torch.zeros(2, 3)}))  # doctest: +NORMALIZE_WHITESPACE
    path  shape   dtype    device  bytes  slots
    w     (2, 3)  float32  cpu     24     -
    total 6 parameters, 24 bytes
    """
    from dsf.weight import Weight

    rows = [("path", "shape", "dtype", "device", "bytes", "slots")]
    for path, leaf in leaves_with_paths(params, is_leaf=lambda x: isinstance(x, Weight)):
        if isinstance(leaf, Weight):
            data, slots = leaf.data, ",".join(leaf.slot_names()) or "-"
        else:
            data, slots = leaf, "-"
        if not isinstance(data, torch.Tensor):
            rows.append((path, "-", type(data).__name__, "-", "-", slots))
            continue
        rows.append(
            (path, str(tuple(data.shape)), str(data.dtype).removeprefix("torch."), str(data.device), str(nbytes(leaf)), slots)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"total {num_params(params)} parameters, {nbytes(params)} bytes")
    return "\n".join(lines)
