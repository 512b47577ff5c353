"""The family contract (dsf.model_parts.family) as FLUX.1 and Wan fill it: every layout of every checkpoint record
round-trips through one generic load, a params tree is recognized as its family's, and model files are recognized by
the family's components, on the tiny pipelines' params."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsf
from dsf.files.model_files import components_of, recognize_model_files, require_components
from dsf.model_parts.family import family_of, registered
from dsf.models import flux, wan

# every family package under models/ (one with a family.py), each imported so that it registers its record
FAMILIES = [
    importlib.import_module(f"dsf.models.{path.parent.name}").FAMILY
    for path in sorted((Path(__file__).resolve().parents[1] / "models").glob("*/family.py"))
]


@pytest.fixture(scope="module")
def pipes():
    return {family.name: family.tiny_pipeline() for family in FAMILIES}


IDS = [family.name for family in FAMILIES]


def paths(tree) -> list[str]:
    return [path for path, _ in dsf.tree.leaves_with_paths(tree)]


def test_both_families_are_registered():
    assert {"FLUX.1", "Wan"} <= {family.name for family in registered()}


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
@pytest.mark.parametrize("component", ["dit", "vae"])
def test_every_layout_loads_back_to_the_same_params(pipes, family, component):
    pipe = pipes[family.name]
    checkpoint, (model, params) = getattr(family, component), (getattr(pipe, component), pipe.params[component])
    for layout in checkpoint.layouts:
        flat = checkpoint.from_ours(params, layout.name)
        assert checkpoint.detect_layout(flat) == layout.name
        loaded_model, loaded = checkpoint.load(flat, model.config)
        assert loaded_model.config == model.config
        assert dsf.tree.flatten_dict(loaded).keys() == dsf.tree.flatten_dict(params).keys()
        assert all(torch.equal(a, b) for a, b in zip(dsf.tree.tensors(loaded), dsf.tree.tensors(params)))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_dit_tree_is_recognized_as_its_familys(pipes, family):
    assert family_of(paths(pipes[family.name].params["dit"])) is family
    assert family_of(paths(pipes[family.name].params["vae"])) is None


def test_shape_free_fields_are_those_shapes_cannot_tell():
    assert flux.FAMILY.shape_free_fields() == ["axes_dims_rope", "rope_theta"]
    assert {"head_dim", "rope_theta"} <= set(wan.FAMILY.shape_free_fields())


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_model_files_are_recognized_by_the_familys_components(pipes, family, tmp_path):
    pipe = pipes[family.name]
    native = family.native_layout or "diffusers"
    files = {"dit": family.dit.from_ours(pipe.params["dit"], native), "vae": family.vae.from_ours(pipe.params["vae"], "diffusers")}
    for name, flat in files.items():
        save_file({key: tensor.contiguous() for key, tensor in flat.items()}, tmp_path / f"{name}.safetensors")
    found = recognize_model_files([tmp_path / "vae.safetensors", tmp_path / "dit.safetensors"], family)
    assert {key: path.name for key, path in found.items()} == {"vae": "vae.safetensors", "dit": "dit.safetensors"}
    assert components_of(["nothing.weight"], family) == []
    text = next(key for key in family.components if key not in files)  # a text encoder, not among the files
    with pytest.raises(ValueError, match=rf"no {family.components[text].name} among --model_paths"):
        require_components(found, ["dit", "vae", text], "--model_paths", family)


def test_a_file_of_another_family_is_refused_with_its_keys(pipes, tmp_path):
    flat = wan.FAMILY.dit.from_ours(pipes["Wan"].params["dit"], "original")
    save_file({key: tensor.contiguous() for key, tensor in flat.items()}, tmp_path / "wan.safetensors")
    with pytest.raises(ValueError, match="wan.safetensors holds no FLUX.1 component"):
        recognize_model_files([tmp_path / "wan.safetensors"], flux.FAMILY)
