"""The package layout: models/, transforms/ and recipes/cli/ install as dsf.models, dsf.transforms and
dsf.cli, in editable and regular installs, and `import dsf` stays free of jax, diffusers and transformers."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import dsf.cli
import dsf.models
import dsf.transforms

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **kwargs) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, **kwargs).stdout.strip()


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {v: k for k, v in config["package-dir"].items()}
    found = {
        ".".join([roots[folder], *init.parent.relative_to(ROOT / folder).parts])
        for folder in roots
        for init in (ROOT / folder).rglob("__init__.py")
        if not any(init.is_relative_to(ROOT / other) for other in roots if other != folder and other.startswith(f"{folder}/"))
    }
    assert found == listed


def test_editable_install_maps_models_transforms_and_cli():
    assert Path(dsf.models.__file__).parent == ROOT / "models"
    assert Path(dsf.transforms.__file__).parent == ROOT / "transforms"
    assert Path(dsf.cli.__file__).parent == ROOT / "recipes" / "cli"


def test_import_dsf_pulls_no_jax_diffusers_or_transformers():
    core = "dsf.training.checkpoint, dsf.training.data, dsf.files.io, dsf.diffusion.losses, dsf.training.optim, dsf.diffusion.sampling, dsf.diffusion.schedules, dsf.training.train, dsf.transforms"
    out = run_python(
        f"import sys, dsf, {core}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'orbax', 'diffusers', 'transformers'}))"
    )
    assert out == "[]"


def test_regular_install_imports_models_and_transforms(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next(wheels.glob("dsf-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    assert not (site / "models").exists() and not (site / "transforms").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = run_python("import dsf.models.digits, dsf.transforms, dsf.cli; print(dsf.models.__file__); print(dsf.transforms.checkpoint)",
                     env=env, cwd=tmp_path)
    assert out.splitlines()[0].startswith(str(site / "dsf" / "models"))
