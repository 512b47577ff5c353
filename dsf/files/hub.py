"""Where model files come from: local paths, or hub repos downloaded once into a local folder.

A :class:`ModelSource` is either local files (``path``: a file, a folder or a list of files) or a
hub repo (``model_id``) with ``pattern``, a glob or a list of globs naming the files wanted:
``None``, ``""`` or ``"./"`` mean the whole repo and a trailing ``/`` means that folder.
:func:`resolve` returns local paths, downloading what is missing into
``{DSF_MODEL_BASE_PATH}/{model_id}/``; files already there are never requested again.

The environment is read at each call:

* ``DSF_MODEL_BASE_PATH``: the download root (default ``./models``).
* ``DSF_DOWNLOAD_SOURCE``: ``modelscope`` (default) or ``huggingface`` (case-insensitive).
* ``DSF_SKIP_DOWNLOAD``: ``1``/``true``/``yes`` never touches the network; files that are not
  there already are an error naming them.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "model.safetensors").write_bytes(b"")
    >>> resolve(ModelSource(path=folder / "model.safetensors")).name
    'model.safetensors'
    >>> ModelSource(model_id="black-forest-labs/FLUX.1-dev", pattern=["text_encoder/", "tokenizer/"]).pattern
    ('text_encoder/', 'tokenizer/')
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence, Union

LocalPath = Union[str, os.PathLike]
Pattern = Union[str, Sequence[str], None]

WHOLE_REPO = (None, "", "./")
DOWNLOAD_SOURCES = {"modelscope": "ModelScope", "huggingface": "the Hugging Face Hub"}
TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("", "0", "false", "no")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class ModelSource:
    """Local files (``path``) or files of a hub repo (``model_id`` + ``pattern``).

    >>> ModelSource(model_id="black-forest-labs/FLUX.1-dev", pattern="text_encoder/").model_id
    'black-forest-labs/FLUX.1-dev'
    >>> ModelSource()
    Traceback (most recent call last):
    ...
    ValueError: a ModelSource needs path= (local files) or model_id= (a hub repo such as 'black-forest-labs/FLUX.1-dev')
    """

    path: LocalPath | Sequence[LocalPath] | None = None
    model_id: str | None = None
    pattern: Pattern = None

    def __post_init__(self):
        if (self.path is None) == (self.model_id is None):
            if self.path is None:
                raise ValueError(
                    "a ModelSource needs path= (local files) or model_id= "
                    "(a hub repo such as 'black-forest-labs/FLUX.1-dev')"
                )
            raise ValueError(f"a ModelSource takes path= or model_id=, not both (got {self.path!r} and {self.model_id!r})")
        if self.path is not None and self.pattern not in WHOLE_REPO:
            raise ValueError("pattern= selects files of a hub repo (model_id=); for local files list them in path= instead")
        if self.model_id is not None:
            _check_relative(self.model_id, "model_id")
        if isinstance(self.pattern, (list, tuple)):
            if not self.pattern:
                raise ValueError("pattern=[] selects no file; give a glob, a list of globs, or None for the whole repo")
            object.__setattr__(self, "pattern", tuple(self.pattern))
        for pattern in _patterns(self.pattern):
            _check_relative(pattern, "pattern")
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))


def _check_relative(name: str, what: str) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"{what} {name!r} must be a relative name inside the repo folder (no leading '/', no '..')")


def model_folder(model_id: str) -> Path:
    """The local folder a hub repo downloads into: ``{DSF_MODEL_BASE_PATH or ./models}/{model_id}``.

    >>> model_folder("black-forest-labs/FLUX.1-dev").parts[-2:]
    ('black-forest-labs', 'FLUX.1-dev')
    """
    return Path(os.environ.get("DSF_MODEL_BASE_PATH") or "models") / model_id


def resolve(source: ModelSource | LocalPath | Sequence[LocalPath]) -> Path | list[Path]:
    """The local path(s) of a source, downloading missing hub files first.

    A local path or list of paths stands for itself and must exist. For a hub repo, each pattern
    is globbed in its folder after the download: a folder pattern gives the folder, the whole repo
    gives the repo folder, and a file glob its matches, sorted. One path in all is returned as a
    ``Path``, several (e.g. the shards of a model) as a list in pattern order.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.safetensors", "a.safetensors"): _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in resolve([folder / "b.safetensors", folder / "a.safetensors"])]
    ['b.safetensors', 'a.safetensors']
    """
    if not isinstance(source, ModelSource):
        source = ModelSource(path=source)
    if source.path is not None:
        return _existing_local(source.path)
    return _fetch(source.model_id, _patterns(source.pattern))


def local_source(source):
    """A state dict (any mapping) as is; any other source as local path(s), downloaded when it names a hub repo.

    Loaders call this first, so every ``load_*`` takes a :class:`ModelSource` as well as paths.

    >>> local_source({"w": 1})
    {'w': 1}
    """
    return source if isinstance(source, Mapping) else resolve(source)


def _existing_local(path: LocalPath | Sequence[LocalPath]) -> Path | list[Path]:
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise ValueError("ModelSource(path=...) got an empty list of files")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such model file or folder: {', '.join(missing)}")
    return paths[0] if isinstance(path, (str, os.PathLike)) else paths


def _patterns(pattern: Pattern) -> tuple[str, ...]:
    """Our patterns as a tuple, the whole repo spelled ``"./"``."""
    listed = [pattern] if pattern is None or isinstance(pattern, str) else list(pattern)
    return tuple("./" if p in WHOLE_REPO else p for p in listed)


def _download_pattern(pattern: str) -> str:
    """The hub-side (fnmatch) pattern of one of ours: the whole repo is ``*``, a folder ``dir/*``."""
    if pattern == "./":
        return "*"
    return pattern + "*" if pattern.endswith("/") else pattern


def _is_literal_file(pattern: str) -> bool:
    return not pattern.endswith("/") and not any(c in pattern for c in GLOB_CHARACTERS)


def _matches(folder: Path, pattern: str) -> list[Path]:
    if pattern == "./":
        return [folder] if folder.is_dir() and any(folder.iterdir()) else []
    if pattern.endswith("/"):
        target = folder / pattern
        return [target] if target.is_dir() and any(target.iterdir()) else []
    return sorted(folder.glob(pattern))


def _present_files(folder: Path, patterns: Sequence[str]) -> list[str]:
    """Repo-relative names of the files under ``folder`` that the download patterns would fetch."""
    if not folder.is_dir():
        return []
    wanted = [_download_pattern(p) for p in patterns]
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [name for name in names if any(fnmatch.fnmatch(name, w) for w in wanted)]


def _fetch(model_id: str, patterns: tuple[str, ...]) -> Path | list[Path]:
    folder = model_folder(model_id)
    if _skip_download():
        _require_present(model_id, folder, patterns)
    elif not all(_is_literal_file(p) and (folder / p).is_file() for p in patterns):
        present = _present_files(folder, patterns)
        _download(model_id, folder, [_download_pattern(p) for p in patterns], [glob.escape(name) for name in present])
    found = []
    for pattern in patterns:
        matches = _matches(folder, pattern)
        if not matches:
            raise FileNotFoundError(
                f"nothing matching {pattern!r} in {folder} after downloading {model_id!r} from "
                f"{DOWNLOAD_SOURCES[_download_source()]}; check the pattern against the repo's file names"
            )
        found.extend(matches)
    return found[0] if len(found) == 1 else found


def _require_present(model_id: str, folder: Path, patterns: Sequence[str]) -> None:
    missing = [p for p in patterns if not _matches(folder, p)]
    if missing:
        wanted = ", ".join("the whole repo" if p == "./" else repr(p) for p in missing)
        raise FileNotFoundError(
            f"DSF_SKIP_DOWNLOAD is set, and {wanted} of {model_id!r} is not in {folder}; put the files there "
            "(or point DSF_MODEL_BASE_PATH at the folder holding them), or unset DSF_SKIP_DOWNLOAD to download them"
        )


def _download(model_id: str, folder: Path, allow: list[str], ignore: list[str]) -> None:
    source = _download_source()
    _announce(source)
    folder.mkdir(parents=True, exist_ok=True)
    if source == "huggingface":
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ImportError(
                "DSF_DOWNLOAD_SOURCE=huggingface needs the huggingface_hub package: pip install huggingface_hub "
                "(or the dsf[hub] extra), or unset DSF_DOWNLOAD_SOURCE to download from ModelScope"
            ) from None
        snapshot_download(repo_id=model_id, local_dir=str(folder), allow_patterns=allow, ignore_patterns=ignore)
    else:
        from modelscope import snapshot_download

        snapshot_download(model_id, local_dir=str(folder), allow_file_pattern=allow, ignore_file_pattern=ignore)


@functools.cache
def _announce(source: str) -> None:
    print(
        f"dsf: downloading model files from {DOWNLOAD_SOURCES[source]} "
        "(DSF_DOWNLOAD_SOURCE=modelscope|huggingface chooses; DSF_SKIP_DOWNLOAD=1 stays offline)"
    )


def _download_source() -> str:
    value = os.environ.get("DSF_DOWNLOAD_SOURCE", "").strip().lower() or "modelscope"
    if value not in DOWNLOAD_SOURCES:
        raise ValueError(f"DSF_DOWNLOAD_SOURCE={value!r} is not one of {sorted(DOWNLOAD_SOURCES)}")
    return value


def _skip_download() -> bool:
    value = os.environ.get("DSF_SKIP_DOWNLOAD", "").strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"DSF_SKIP_DOWNLOAD={value!r} is not understood; use one of {TRUE_WORDS} or {FALSE_WORDS[1:]}")
    return value in TRUE_WORDS
