"""Datasets over a folder of files plus a metadata table, image operators, and resumable batching.

A dataset folder holds data files (images) and a metadata file, ``.csv``, ``.json`` (a list of
objects) or ``.jsonl`` (one object a line), with one row per sample. Columns named in
``data_file_keys`` hold file paths relative to the folder; they are loaded through the image
operator chain (:func:`load_image` → :func:`to_rgb` → :func:`resize_and_crop` or
:func:`fit_to_max_pixels` → :func:`image_to_tensor`). Every other column passes through unchanged.
Rows are counted from 0 in file order (the csv header is not a row) in every error message.

:func:`batches` walks a dataset in a reproducible order, shuffled per epoch from an explicit key,
and yields the position to resume from with every batch.

Example:
    >>> import tempfile, numpy as np
    >>> from dsf.random import key
    >>> tmp = tempfile.TemporaryDirectory()
    >>> images = [np.full((40, 60, 3), 100 * i, np.uint8) for i in range(3)]
    >>> metadata = write_image_folder(tmp.name, images, [{"prompt": f"square {i}"} for i in range(3)])
    >>> dataset = FolderDataset(tmp.name, metadata, repeat=2, image_size=(32, 32))
    >>> len(dataset), dataset[4]["prompt"], tuple(dataset[4]["image"].shape)
    (6, 'square 1', (3, 32, 32))
    >>> position, batch = next(batches(dataset, 4, key(0)))
    >>> position, tuple(batch["image"].shape), len(batch["prompt"])
    (4, (4, 3, 32, 32), 4)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from dsf.random import Key, fold_in, permutation
from dsf.training.checkpoint import remove_stale_temporaries

METADATA_FORMATS = (".csv", ".json", ".jsonl")

Item = dict[str, Any]
ImageOperator = Callable[[Path], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Image operators


def compose(*operators: Callable) -> Callable:
    """The operator applying ``operators`` left to right.

    >>> compose(lambda x: x + 1, lambda x: 2 * x)(3)
    8
    """

    def composed(value):
        for operator in operators:
            value = operator(value)
        return value

    return composed


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path``, fully decoded (a corrupt or truncated file raises here).

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.new("L", (5, 3)).save(os.path.join(folder, "a.png"))
    ...     load_image(os.path.join(folder, "a.png")).size
    (5, 3)
    """
    with Image.open(path) as image:
        image.load()
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode (grayscale, palette and alpha images are converted).

    >>> to_rgb(Image.new("L", (2, 2))).mode
    'RGB'
    """
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` resized (bilinear) to the smallest size covering ``height`` × ``width``, then center-cropped.

    >>> resize_and_crop(Image.new("RGB", (200, 100)), 64, 64).size
    (64, 64)
    """
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got height={height}, width={width}")
    scale = max(height / image.height, width / image.width)
    scaled_width = max(width, round(image.width * scale))
    scaled_height = max(height, round(image.height * scale))
    if (scaled_width, scaled_height) != image.size:
        image = image.resize((scaled_width, scaled_height), Image.Resampling.BILINEAR)
    left = (scaled_width - width) // 2
    top = (scaled_height - height) // 2
    return image.crop((left, top, left + width, top + height))


def size_within_max_pixels(
    height: int, width: int, max_pixels: int | None, height_division: int = 16, width_division: int = 16
) -> tuple[int, int]:
    """``(height, width)`` scaled down to at most ``max_pixels`` (aspect kept), floored to the division factors.

    Sizes already within ``max_pixels`` (or ``max_pixels=None``) are only floored; nothing is upscaled.

    >>> size_within_max_pixels(1080, 1920, 512 * 512)
    (384, 672)
    >>> size_within_max_pixels(100, 70, None)
    (96, 64)
    """
    if max_pixels is not None and height * width > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        height, width = int(height * scale), int(width * scale)
    floored_height = height // height_division * height_division
    floored_width = width // width_division * width_division
    if floored_height == 0 or floored_width == 0:
        raise ValueError(
            f"a {height}x{width} image is smaller than the division factors "
            f"({height_division}, {width_division}); lower the division, raise max_pixels, or use larger images"
        )
    return floored_height, floored_width


def fit_to_max_pixels(
    image: Image.Image, max_pixels: int | None, height_division: int = 16, width_division: int = 16
) -> Image.Image:
    """``image`` resized and cropped to :func:`size_within_max_pixels` of its size.

    >>> fit_to_max_pixels(Image.new("RGB", (1920, 1080)), 512 * 512).size
    (672, 384)
    """
    height, width = size_within_max_pixels(image.height, image.width, max_pixels, height_division, width_division)
    return resize_and_crop(image, height, width)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor ``(3, H, W)`` with values in ``[-1, 1]``.

    >>> image_to_tensor(Image.new("RGB", (4, 2), (255, 0, 0)))[:, 0, 0].tolist()
    [1.0, -1.0, -1.0]
    """
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor expects an RGB image, got mode {image.mode!r}; convert it with to_rgb first")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def image_operator(
    image_size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    height_division: int = 16,
    width_division: int = 16,
) -> ImageOperator:
    """The chain from an image file path to a ``(3, H, W)`` tensor in ``[-1, 1]``.

    With ``image_size=(height, width)`` every image becomes exactly that size; otherwise each image
    is fitted to ``max_pixels`` and floored to the division factors.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.new("RGB", (300, 200)).save(os.path.join(folder, "a.png"))
    ...     tuple(image_operator(max_pixels=100 * 100)(os.path.join(folder, "a.png")).shape)
    (3, 80, 112)
    """
    if image_size is not None and max_pixels is not None:
        raise ValueError(
            f"give image_size or max_pixels, not both (got image_size={image_size}, max_pixels={max_pixels}); "
            "image_size fixes every image's size, max_pixels only bounds it"
        )
    if image_size is not None:
        height, width = _checked_image_size(image_size)
        shape = partial(resize_and_crop, height=height, width=width)
    else:
        shape = partial(
            fit_to_max_pixels, max_pixels=max_pixels, height_division=height_division, width_division=width_division
        )
    return compose(load_image, to_rgb, shape, image_to_tensor)


def _checked_image_size(image_size) -> tuple[int, int]:
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(side, int) and side > 0 for side in image_size)
    ):
        raise ValueError(f"image_size must be (height, width) with positive ints, got {image_size!r}")
    return image_size[0], image_size[1]


# ---------------------------------------------------------------------------------------------
# Metadata


def read_metadata(metadata_path: str | os.PathLike, text_columns: Sequence[str] = ("prompt",)) -> list[dict[str, Any]]:
    """The rows of a ``.csv``, ``.json`` (list of objects) or ``.jsonl`` metadata file, as dicts.

    Csv values are strings; json values keep their types, except that the ``text_columns`` (prompts) must
    hold strings where a row has them: a number or null there is an error naming the row.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "metadata.jsonl")
    ...     _ = open(path, "w").write('{"image": "a.png", "steps": 3}\\n')
    ...     read_metadata(path)
    [{'image': 'a.png', 'steps': 3}]
    """
    path = Path(metadata_path)
    suffix = path.suffix.lower()
    if suffix not in METADATA_FORMATS:
        raise ValueError(
            f"metadata file {path} has an unknown extension {path.suffix!r}; "
            f"use one of {', '.join(METADATA_FORMATS)} (json: a list of objects, jsonl: one object a line)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist; pass the path of an existing {suffix} file")
    readers = {".csv": _read_csv_rows, ".json": _read_json_rows, ".jsonl": _read_jsonl_rows}
    rows = readers[suffix](path)
    if not rows:
        raise ValueError(f"metadata file {path} has no rows; add one row per sample")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"metadata file {path}, row {index}: expected an object of column values, got {type(row).__name__}"
            )
        for column in text_columns:
            if column in row and not isinstance(row[column], str):
                raise ValueError(
                    f"metadata file {path}, row {index}, column {column!r}: expected text, got {row[column]!r}; "
                    'write it as a string ("" for none)'
                )
    return rows


def _read_csv_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    for index, row in enumerate(rows):
        if None in row:
            raise ValueError(f"metadata file {path}, row {index} has more fields than the header; quote values with commas")
    return rows


def _read_json_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"metadata file {path} is not valid json: {error}") from error
    if not isinstance(rows, list):
        raise ValueError(
            f"metadata file {path} holds a json {type(rows).__name__}; it must hold a list of objects, one per sample"
        )
    return rows


def _read_jsonl_rows(path: Path) -> list:
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"metadata file {path}, line {line_number} is not valid json: {error}") from error
    return rows


def resolve_data_path(base_path: Path, relative_path: Any, where: str) -> Path:
    """The absolute path of ``relative_path`` inside ``base_path``, refusing any path that leaves it.

    Absolute paths, ``..`` components and symlinks resolving outside ``base_path`` raise ``ValueError``;
    ``where`` (e.g. ``"metadata.csv, row 3, column 'image'"``) starts the message.

    >>> resolve_data_path(Path("/data"), "cats/1.png", "row 0").as_posix()
    '/data/cats/1.png'
    >>> resolve_data_path(Path("/data"), "../etc/passwd", "row 0")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: row 0: data file path '../etc/passwd' leaves the dataset folder /data; ...
    """
    fix = "use a path relative to the dataset folder, without '..', that stays inside it"
    if not isinstance(relative_path, str) or not relative_path:
        raise ValueError(f"{where}: expected a file path relative to {base_path}, got {relative_path!r}")
    pure = PurePath(relative_path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{where}: data file path {relative_path!r} leaves the dataset folder {base_path}; {fix}")
    resolved_base = base_path.resolve()
    resolved = (resolved_base / pure).resolve()
    if not resolved.is_relative_to(resolved_base):
        raise ValueError(
            f"{where}: data file path {relative_path!r} resolves to {resolved}, outside the dataset folder "
            f"{resolved_base} (a symlink?); {fix}"
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Dataset


class FolderDataset:
    """Samples from a dataset folder and its metadata file; ``len`` is rows × ``repeat``.

    Item ``i`` is row ``i % rows`` as a dict: each column named in ``data_file_keys`` that the row
    has is replaced by its image, a float32 tensor ``(3, H, W)`` in ``[-1, 1]``; the other columns
    pass through (csv values as strings, json values as they are).

    Images come out exactly ``image_size=(height, width)`` when given; otherwise they are scaled
    down to at most ``max_pixels`` (``None``: no bound) with height and width floored to
    ``division``, an int or ``(height_division, width_division)``.

    Every data file path is checked against escaping the folder when the dataset is built; files
    are read when an item is accessed.

    >>> import tempfile, numpy as np
    >>> tmp = tempfile.TemporaryDirectory()
    >>> metadata = write_image_folder(tmp.name, [np.zeros((24, 40, 3), np.uint8)], [{"label": 7}])
    >>> item = FolderDataset(tmp.name, metadata, division=8)[0]
    >>> tuple(item["image"].shape), item["label"], float(item["image"].min())
    ((3, 24, 40), '7', -1.0)
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        base_path: str | os.PathLike,
        metadata_path: str | os.PathLike,
        repeat: int = 1,
        data_file_keys: Sequence[str] | str = ("image",),
        image_size: tuple[int, int] | None = None,
        max_pixels: int | None = None,
        division: int | tuple[int, int] = 16,
    ):
        self.base_path = Path(base_path)
        if not self.base_path.is_dir():
            raise FileNotFoundError(
                f"dataset folder {self.base_path} does not exist or is not a folder; "
                "pass the folder that holds the data files"
            )
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        self.metadata_path = Path(metadata_path)
        self.repeat = repeat
        self.data_file_keys = (data_file_keys,) if isinstance(data_file_keys, str) else tuple(data_file_keys)
        self.rows = tuple(read_metadata(self.metadata_path))
        _check_columns(self.rows, self.data_file_keys, self.metadata_path)
        self.data_file_paths = tuple(self._resolve_row_paths(index, row) for index, row in enumerate(self.rows))
        height_division, width_division = _checked_division(division)
        self.load_image_file = image_operator(image_size, max_pixels, height_division, width_division)

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> Item:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} items")
        row_index = index % len(self.rows)
        item = dict(self.rows[row_index])
        for key, path in self.data_file_paths[row_index].items():
            item[key] = self._load(row_index, key, path)
        return item

    def _where(self, row_index: int, key: str) -> str:
        return f"metadata file {self.metadata_path}, row {row_index}, column {key!r}"

    def _resolve_row_paths(self, row_index: int, row: Mapping[str, Any]) -> dict[str, Path]:
        return {
            key: resolve_data_path(self.base_path, row[key], self._where(row_index, key))
            for key in self.data_file_keys
            if key in row
        }

    def _load(self, row_index: int, key: str, path: Path) -> torch.Tensor:
        where = self._where(row_index, key)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: data file {path} does not exist; add the file or fix the path in the metadata")
        try:
            return self.load_image_file(path)
        except Image.DecompressionBombError as error:
            raise ValueError(f"{where}: image {path} is refused as a decompression bomb ({error}); replace the file or "
                             "remove its row") from error
        except OSError as error:
            raise OSError(f"{where}: cannot read image {path} ({error}); replace the file or remove its row") from error
        except ValueError as error:
            raise ValueError(f"{where}: cannot load image {path}: {error}") from error


def _check_columns(rows: Sequence[Mapping[str, Any]], data_file_keys: tuple[str, ...], metadata_path: Path) -> None:
    columns = {column for row in rows for column in row}
    missing = [key for key in data_file_keys if key not in columns]
    if missing:
        raise ValueError(
            f"metadata file {metadata_path} has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(map(repr, sorted(columns)))}); add the column or pass data_file_keys with the right names"
        )


def _checked_division(division) -> tuple[int, int]:
    pair = (division, division) if isinstance(division, int) else tuple(division)
    if len(pair) != 2 or not all(isinstance(factor, int) and factor > 0 for factor in pair):
        raise ValueError(f"division must be a positive int or (height_division, width_division), got {division!r}")
    return pair


# ---------------------------------------------------------------------------------------------
# Batching


def collate(items: Sequence[Item]) -> dict[str, Any]:
    """One batch from items with the same keys: tensors stacked on a new first axis, other values as lists.

    >>> batch = collate([{"image": torch.zeros(3, 2, 2), "prompt": "a"}, {"image": torch.ones(3, 2, 2), "prompt": "b"}])
    >>> tuple(batch["image"].shape), batch["prompt"]
    ((2, 3, 2, 2), ['a', 'b'])
    """
    if not items:
        raise ValueError("cannot collate an empty list of items; pass at least one item")
    keys = list(items[0])
    for position, item in enumerate(items):
        if set(item) != set(keys):
            raise ValueError(
                f"cannot batch items with different keys: item 0 has {sorted(keys)}, item {position} has {sorted(item)}; "
                "give every metadata row the same columns"
            )
    return {key: _collate_values(key, [item[key] for item in items]) for key in keys}


def _collate_values(key: str, values: list) -> Any:
    if not all(isinstance(value, torch.Tensor) for value in values):
        return values
    shapes = {tuple(value.shape) for value in values}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack {key!r}: shapes differ ({sorted(shapes)}); "
            "fix the size with image_size=(height, width) or use batch_size=1"
        )
    return torch.stack(values)


def epoch_order(key: Key | None, epoch: int, size: int, shuffle: bool = True) -> list[int]:
    """The order of item indices in ``epoch``: ``permutation(fold_in(key, epoch), size)``, or ``range(size)``.

    >>> from dsf.random import key
    >>> sorted(epoch_order(key(0), 3, 5)), epoch_order(None, 3, 5, shuffle=False)
    ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    """
    if not shuffle:
        return list(range(size))
    _require_key(key)
    return permutation(fold_in(key, epoch), size).tolist()


def batches(
    dataset: Sequence[Item],
    batch_size: int,
    key: Key | None,
    start: int = 0,
    shuffle: bool = True,
    collate_fn: Callable[[Sequence[Item]], Any] = collate,
) -> Iterator[tuple[int, Any]]:
    """Endless ``(position, batch)`` pairs over ``dataset``, in an order fixed by ``key``.

    The samples form one stream over epochs: epoch ``e`` visits every item once, in the order
    :func:`epoch_order` gives. Each batch holds the next ``batch_size`` samples of that stream (a
    batch may span two epochs), and ``position`` is the stream index of the next sample to draw.
    Calling again with ``start=position`` resumes exactly where the run left off.

    A batch (with the default ``collate_fn``) is a dict with the items' keys: tensors stacked to
    ``(batch_size, ...)`` (images: ``(batch_size, 3, H, W)`` in ``[-1, 1]``), other values as lists of
    length ``batch_size``.

    >>> from itertools import islice
    >>> from dsf.random import key
    >>> data = [{"x": torch.tensor(i)} for i in range(5)]
    >>> run = [(p, b["x"].tolist()) for p, b in islice(batches(data, 2, key(0)), 4)]
    >>> [p for p, _ in run]
    [2, 4, 6, 8]
    >>> resumed = [(p, b["x"].tolist()) for p, b in islice(batches(data, 2, key(0), start=4), 2)]
    >>> resumed == run[2:]
    True
    >>> [b["x"].tolist() for _, b in islice(batches(data, 2, None, shuffle=False), 3)]
    [[0, 1], [2, 3], [4, 0]]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int (a position yielded by batches), got {start!r}")
    if len(dataset) == 0:
        raise ValueError("cannot draw batches from an empty dataset; check its metadata file")
    if shuffle:
        _require_key(key)
    return _BatchStream(dataset, batch_size, key, start, shuffle, collate_fn)


def _require_key(key) -> None:
    if not isinstance(key, Key):
        raise ValueError(f"shuffled batches need a random key, got {key!r}; pass dsf.random.key(seed) or shuffle=False")


class _BatchStream:
    """The iterator :func:`batches` returns; ``skip()`` passes a batch without loading it (another rank's,
    see :func:`dsf.training.distributed.rank_batches`)."""

    def __init__(self, dataset, batch_size, key, start, shuffle, collate_fn):
        self.dataset, self.batch_size, self.key, self.shuffle, self.collate_fn = dataset, batch_size, key, shuffle, collate_fn
        self.position = start
        self.epoch, self.order = None, []

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Any]:
        items = [self.dataset[index] for index in self._next_indices()]
        return self.position, self.collate_fn(items)

    def skip(self) -> int:
        """Pass the next batch without loading its items; the position after it."""
        self._next_indices()
        return self.position

    def _next_indices(self) -> list[int]:
        size = len(self.dataset)
        indices = []
        for _ in range(self.batch_size):
            if self.position // size != self.epoch:
                self.epoch = self.position // size
                self.order = epoch_order(self.key, self.epoch, size, self.shuffle)
            indices.append(self.order[self.position % size])
            self.position += 1
        return indices


# ---------------------------------------------------------------------------------------------
# Writing a dataset folder


def write_image_folder(
    folder: str | os.PathLike,
    images: Sequence[np.ndarray],
    rows: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    metadata_name: str = "metadata.csv",
) -> Path:
    """Write ``images`` as PNG files under ``folder/images/`` and a metadata csv; return the csv's path.

    ``images`` are uint8 arrays ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB); ``rows[i]`` are the
    other columns of image ``i``, to which the ``image_key`` column (the PNG path relative to
    ``folder``) is added first. Every file is written under a temporary name and then renamed, and
    the metadata last, so no reader sees a half-written file; the temporary files a killed write left
    are removed first.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_image_folder(folder, [np.zeros((8, 8), np.uint8)], [{"label": 0}])
    ...     path.read_text()
    'image,label\\nimages/00000.png,0\\n'
    """
    if len(images) != len(rows):
        raise ValueError(f"got {len(images)} images but {len(rows)} rows; give one row of columns per image")
    if not images:
        raise ValueError("no images to write; pass at least one image and its row")
    for index, row in enumerate(rows):
        if image_key in row:
            raise ValueError(f"row {index} already has the column {image_key!r}; it is filled in with the PNG path")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder / "images", r"\d+\.png")
    remove_stale_temporaries(folder, re.escape(metadata_name))
    width = max(5, len(str(len(images) - 1)))
    metadata_rows = []
    for index, (image, row) in enumerate(zip(images, rows)):
        relative_path = f"images/{index:0{width}d}.png"
        png = _image_from_array(image, index)
        _write_atomically(folder / relative_path, lambda file: png.save(file, format="PNG"))
        metadata_rows.append({image_key: relative_path, **row})
    metadata_path = folder / metadata_name
    csv_bytes = _csv_text(metadata_rows).encode("utf-8")
    _write_atomically(metadata_path, lambda file: file.write(csv_bytes))
    return metadata_path


def _image_from_array(image: np.ndarray, index: int) -> Image.Image:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"image {index} has dtype {array.dtype}; write_image_folder takes uint8 arrays in [0, 255] "
            "(e.g. np.clip(x * 255 / x.max(), 0, 255).astype(np.uint8))"
        )
    if array.ndim == 2:
        return Image.fromarray(array)
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array)
    raise ValueError(f"image {index} has shape {array.shape}; expected (H, W) grayscale or (H, W, 3) RGB")


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        os.replace(temporary_name, path)
    except BaseException:
        os.unlink(temporary_name)
        raise


def check_native_resolution(
    image_paths: Sequence[str | os.PathLike], image_size: tuple[int, int] | None, max_pixels: int | None, division: int = 16
) -> None:
    """Refuse data that the dataset would resize: direct distillation compares latents at the teacher image's size.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "teacher.png"
    >>> Image.new("RGB", (48, 32)).save(path)
    >>> check_native_resolution([path], (32, 48), None)
    >>> check_native_resolution([path], (32, 32), None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: direct distillation trains at the teacher images' own size, but .../teacher.png (32x48) would become 32x32; ...
    """
    for path in image_paths:
        with Image.open(path) as image:
            native = (image.height, image.width)
        trained = image_size or size_within_max_pixels(*native, max_pixels, division, division)
        if tuple(trained) != native:
            raise ValueError(
                f"direct distillation trains at the teacher images' own size, but {path} ({native[0]}x{native[1]}) would "
                f"become {trained[0]}x{trained[1]}; pass --height {native[0]} --width {native[1]}, or leave them out with "
                f"--max_pixels of at least {native[0] * native[1]} (sides multiples of {division})"
            )
