"""dsf.files.hub: local sources, downloads through fake hub clients, the environment switches, glob results."""

from __future__ import annotations

import fnmatch
import shutil
import sys
import types

import pytest

from dsf.files import hub
from dsf.files.hub import ModelSource, resolve

REPO = "org/flux-like"
REMOTE_FILES = {
    "model_index.json": "{}",
    "text_encoder/config.json": "{}",
    "text_encoder/model.safetensors": "clip",
    "tokenizer/vocab.json": "{}",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": "shard 1",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": "shard 2",
}


@pytest.fixture
def remote(tmp_path):
    """A repo as the hub serves it: ``remote/{REPO}/...``."""
    root = tmp_path / "remote" / REPO
    for name, text in REMOTE_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def base(tmp_path, monkeypatch):
    """An empty download root named by DSF_MODEL_BASE_PATH, with the other switches unset."""
    folder = tmp_path / "models"
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(folder))
    monkeypatch.delenv("DSF_SKIP_DOWNLOAD", raising=False)
    monkeypatch.delenv("DSF_DOWNLOAD_SOURCE", raising=False)
    hub._announce.cache_clear()
    return folder


def _copy_matching(remote, local_dir, allow, ignore):
    """What a hub client does: copy the repo files matching ``allow`` and no ``ignore`` pattern; return their names."""
    copied = []
    for path in sorted(p for p in remote.rglob("*") if p.is_file()):
        name = path.relative_to(remote).as_posix()
        if any(fnmatch.fnmatch(name, a) for a in allow) and not any(fnmatch.fnmatch(name, i) for i in ignore or []):
            (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, local_dir / name)
            copied.append(name)
    return copied


@pytest.fixture
def modelscope_calls(remote, monkeypatch):
    """A fake ``modelscope`` module whose ``snapshot_download`` copies from ``remote`` and records each call."""
    calls = []

    def snapshot_download(model_id, local_dir, allow_file_pattern, ignore_file_pattern):
        from pathlib import Path

        assert model_id == REPO
        copied = _copy_matching(remote, Path(local_dir), allow_file_pattern, ignore_file_pattern)
        calls.append({"local_dir": local_dir, "allow": allow_file_pattern, "ignore": ignore_file_pattern, "copied": copied})
        return local_dir

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


@pytest.fixture
def huggingface_calls(remote, monkeypatch):
    """A fake ``huggingface_hub`` module, like :func:`modelscope_calls`."""
    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns, ignore_patterns):
        from pathlib import Path

        assert repo_id == REPO
        copied = _copy_matching(remote, Path(local_dir), allow_patterns, ignore_patterns)
        calls.append({"local_dir": local_dir, "allow": allow_patterns, "ignore": ignore_patterns, "copied": copied})
        return local_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


@pytest.fixture
def no_network(monkeypatch):
    """Hub clients that fail the test if called."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    for name in ("modelscope", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(snapshot_download=refuse))


def test_single_file_pattern_gives_that_file_under_the_base_path(base, modelscope_calls):
    path = resolve(ModelSource(model_id=REPO, pattern="text_encoder/model.safetensors"))
    assert path == base / REPO / "text_encoder" / "model.safetensors"
    assert path.read_text() == "clip"
    assert modelscope_calls[0]["local_dir"] == str(base / REPO)
    assert modelscope_calls[0]["allow"] == ["text_encoder/model.safetensors"]
    assert modelscope_calls[0]["copied"] == ["text_encoder/model.safetensors"]


def test_sharded_pattern_gives_the_sorted_shards(base, modelscope_calls):
    paths = resolve(ModelSource(model_id=REPO, pattern="transformer/*.safetensors"))
    assert [p.name for p in paths] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]


def test_folder_pattern_gives_the_folder_and_fetches_all_of_it(base, modelscope_calls):
    assert resolve(ModelSource(model_id=REPO, pattern="text_encoder/")) == base / REPO / "text_encoder"
    assert modelscope_calls[0]["allow"] == ["text_encoder/*"]
    assert modelscope_calls[0]["copied"] == ["text_encoder/config.json", "text_encoder/model.safetensors"]


@pytest.mark.parametrize("pattern", [None, "", "./"])
def test_whole_repo_patterns_give_the_repo_folder(base, modelscope_calls, pattern):
    assert resolve(ModelSource(model_id=REPO, pattern=pattern)) == base / REPO
    assert modelscope_calls[0]["allow"] == ["*"]
    assert len(modelscope_calls[0]["copied"]) == len(REMOTE_FILES)


def test_a_list_of_patterns_gives_every_match_in_pattern_order(base, modelscope_calls):
    paths = resolve(ModelSource(model_id=REPO, pattern=["tokenizer/", "text_encoder/*.json"]))
    assert paths == [base / REPO / "tokenizer", base / REPO / "text_encoder" / "config.json"]
    assert modelscope_calls[0]["allow"] == ["tokenizer/*", "text_encoder/*.json"]


def test_files_already_present_are_not_requested_again(base, modelscope_calls):
    present = base / REPO / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    present.parent.mkdir(parents=True)
    present.write_text("local copy")
    paths = resolve(ModelSource(model_id=REPO, pattern="transformer/*.safetensors"))
    assert modelscope_calls[0]["ignore"] == ["transformer/diffusion_pytorch_model-00001-of-00002.safetensors"]
    assert modelscope_calls[0]["copied"] == ["transformer/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert [p.read_text() for p in paths] == ["local copy", "shard 2"]


def test_a_second_resolve_downloads_nothing(base, modelscope_calls):
    source = ModelSource(model_id=REPO, pattern="transformer/")
    first = resolve(source)
    assert resolve(source) == first
    assert modelscope_calls[1]["copied"] == []
    assert len(modelscope_calls[1]["ignore"]) == 2


def test_a_named_file_already_present_needs_no_network(base, no_network):
    present = base / REPO / "text_encoder" / "model.safetensors"
    present.parent.mkdir(parents=True)
    present.write_text("local")
    assert resolve(ModelSource(model_id=REPO, pattern="text_encoder/model.safetensors")) == present


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_skip_download_works_offline_with_the_files_present(base, no_network, monkeypatch, value):
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", value)
    folder = base / REPO / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("local")
    assert resolve(ModelSource(model_id=REPO, pattern="text_encoder/")) == folder
    assert resolve(ModelSource(model_id=REPO, pattern="text_encoder/*.safetensors")) == folder / "model.safetensors"


def test_skip_download_names_the_missing_files_and_the_folder(base, no_network, monkeypatch):
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match=r"'tokenizer_2/'.*not in .*org/flux-like.*unset DSF_SKIP_DOWNLOAD"):
        resolve(ModelSource(model_id=REPO, pattern=["tokenizer_2/"]))


def test_huggingface_switch_is_case_insensitive(base, modelscope_calls, huggingface_calls, monkeypatch, capsys):
    monkeypatch.setenv("DSF_DOWNLOAD_SOURCE", "HuggingFace")
    assert resolve(ModelSource(model_id=REPO, pattern="tokenizer/vocab.json")).read_text() == "{}"
    assert modelscope_calls == []
    assert huggingface_calls[0]["allow"] == ["tokenizer/vocab.json"]
    assert huggingface_calls[0]["local_dir"] == str(base / REPO)
    assert "Hugging Face" in capsys.readouterr().out


def test_missing_huggingface_hub_is_a_clear_error(base, monkeypatch):
    monkeypatch.setenv("DSF_DOWNLOAD_SOURCE", "huggingface")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        resolve(ModelSource(model_id=REPO, pattern="tokenizer/"))


def test_the_source_is_announced_once(base, modelscope_calls, capsys):
    resolve(ModelSource(model_id=REPO, pattern="tokenizer/"))
    resolve(ModelSource(model_id=REPO, pattern="text_encoder/"))
    out = capsys.readouterr().out
    assert out.count("dsf: downloading model files from ModelScope") == 1


def test_environment_is_read_at_call_time(tmp_path, base, modelscope_calls, monkeypatch):
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(tmp_path / "elsewhere"))
    assert resolve(ModelSource(model_id=REPO, pattern="tokenizer/")) == tmp_path / "elsewhere" / REPO / "tokenizer"


def test_default_base_path_is_models_in_the_working_directory(tmp_path, base, modelscope_calls, monkeypatch):
    monkeypatch.delenv("DSF_MODEL_BASE_PATH")
    monkeypatch.chdir(tmp_path)
    assert resolve(ModelSource(model_id=REPO, pattern="tokenizer/")).resolve() == tmp_path / "models" / REPO / "tokenizer"


def test_a_pattern_the_repo_does_not_have_is_an_error_naming_it(base, modelscope_calls):
    with pytest.raises(FileNotFoundError, match=r"nothing matching 'vae/\*' in .*ModelScope"):
        resolve(ModelSource(model_id=REPO, pattern="vae/*"))


def test_local_paths_stand_for_themselves(tmp_path, no_network):
    (tmp_path / "a.safetensors").write_text("")
    assert resolve(tmp_path / "a.safetensors") == tmp_path / "a.safetensors"
    assert resolve(ModelSource(path=[str(tmp_path / "a.safetensors")])) == [tmp_path / "a.safetensors"]
    with pytest.raises(FileNotFoundError, match="b.safetensors"):
        resolve(ModelSource(path=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs path= .* or model_id="),
        ({"path": "x", "model_id": REPO}, "not both"),
        ({"path": "x", "pattern": "*.json"}, "pattern= selects files of a hub repo"),
        ({"model_id": "../outside"}, "relative name"),
        ({"model_id": REPO, "pattern": "/etc/*"}, "relative name"),
        ({"model_id": REPO, "pattern": []}, "selects no file"),
    ],
)
def test_bad_sources_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelSource(**kwargs)


@pytest.mark.parametrize("name, value", [("DSF_SKIP_DOWNLOAD", "maybe"), ("DSF_DOWNLOAD_SOURCE", "ftp")])
def test_bad_environment_values_are_errors(base, modelscope_calls, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        resolve(ModelSource(model_id=REPO, pattern="tokenizer/"))
