"""The imports run one way: every import of every library module, read from its source, against the layering.

Layers, lowest first: the engine (``dsf/*.py``: tree, weight, transform, blocks, ...); above it ``dsf.files``
and ``dsf.diffusion`` beside each other; ``dsf.training`` (which reads files); ``dsf.model_parts`` (what families
share, the family contract); ``dsf.transforms``; ``dsf.models``; ``dsf.cli`` (the recipes' command
lines). A module imports from its own layer and the ones this table allows, never from above: the
core never imports a model, a transform or the command line, no transform imports a model, and no
family imports another family (what two families share lives in ``dsf.model_parts``). The example
models built from a family (digits, moving digits) may import families; families never import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"dsf": ROOT / "dsf", "dsf.models": ROOT / "models", "dsf.transforms": ROOT / "transforms", "dsf.cli": ROOT / "recipes" / "cli"}
GROUPS = ("files", "diffusion", "training", "model_parts")
ALLOWED = {  # layer -> the layers it may import
    "engine": {"engine"},
    "files": {"engine", "files"},
    "diffusion": {"engine", "diffusion"},
    "training": {"engine", "files", "training"},
    "model_parts": {"engine", "files", "training", "model_parts"},
    "transforms": {"engine", "files", "training", "model_parts", "transforms"},
    "models": {"engine", "files", "diffusion", "training", "model_parts", "transforms", "models"},
    "cli": {"engine", "files", "diffusion", "training", "model_parts", "transforms", "models", "cli"},
}
FAMILIES = tuple(sorted(path.parent.name for path in (ROOT / "models").glob("*/family.py")))  # packages with a family record
EXAMPLES = ("digits", "moving_digits")


def module_name(path: Path) -> str:
    for package, folder in SOURCES.items():
        if path.is_relative_to(folder):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in {*GROUPS, "models", "transforms", "cli"}:
        return parts[1]
    return "engine"


def imported(path: Path) -> list[str]:
    """Every dsf module a source file imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for name in names if name == "dsf" or name.startswith("dsf.")]


def library_files() -> list[Path]:
    return sorted(path for folder in SOURCES.values() for path in folder.rglob("*.py"))


def family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "models" else None


def arrows() -> list[tuple[str, str]]:
    return [(module_name(path), name) for path in library_files() for name in imported(path)]


def wrong_way(importer: str, name: str) -> str | None:
    """Why ``importer`` may not import ``name``, or None."""
    if layer(name) not in ALLOWED[layer(importer)]:
        return f"{importer} ({layer(importer)}) imports {name} ({layer(name)})"
    home, other = family(importer), family(name)
    if home in FAMILIES and other is not None and other != home:
        return f"family {home} imports {name}: move what they share into dsf.model_parts"
    if home in FAMILIES or other is None or other == home:
        return None
    if other in EXAMPLES and home not in EXAMPLES:
        return f"{importer} imports the example model {name}"
    return None


def test_the_sources_are_found():
    names = {module_name(path) for path in library_files()}
    assert {"dsf.tree", "dsf.files.io", "dsf.model_parts.family", "dsf.transforms.lora", "dsf.models.flux.keys",
            "dsf.cli.training_flags"} <= names


def test_every_import_runs_one_way():
    problems = [problem for importer, name in arrows() if (problem := wrong_way(importer, name))]
    assert problems == []


@pytest.mark.parametrize(("importer", "name", "reason"), [
    ("dsf.files.io", "dsf.models.flux", "imports dsf.models.flux (models)"),
    ("dsf.training.train", "dsf.transforms.lora", "(transforms)"),
    ("dsf.transforms.lora", "dsf.models.flux.keys", "(models)"),
    ("dsf.model_parts.modules", "dsf.cli.training_flags", "(cli)"),
    ("dsf.models.wan.pipeline", "dsf.models.flux.pipeline", "family wan imports"),
    ("dsf.models.flux.model", "dsf.models.digits.text", "family flux imports"),
    ("dsf.tree", "dsf.diffusion.losses", "(diffusion)"),
])
def test_a_wrong_way_arrow_is_caught(importer, name, reason):
    assert reason in wrong_way(importer, name)


def test_examples_may_build_on_families():
    assert wrong_way("dsf.models.moving_digits.model", "dsf.models.wan") is None
    assert wrong_way("dsf.models.moving_digits.model", "dsf.models.digits.text") is None
