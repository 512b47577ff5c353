"""dsf.training.data: metadata formats, image operators, path safety, errors, resumable batching."""

import csv
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dsf.training import data
from dsf.random import key

SOLID_COLOUR = (255, 0, 128)
NUM_DIGITS = 5


def digit_images(count: int) -> tuple[list[np.ndarray], list[int]]:
    """The first scikit-learn digits (8×8, values 0..16) as 32×32 uint8 grayscale arrays, and their labels."""
    digits = load_digits()
    images = np.round(digits.images[:count] * 255 / 16).astype(np.uint8)
    return [np.kron(image, np.ones((4, 4), np.uint8)) for image in images], digits.target[:count].tolist()


@pytest.fixture
def folder(tmp_path) -> Path:
    """A dataset folder: five digits and one 48×64 solid-colour image, with metadata.csv/json/jsonl."""
    images, labels = digit_images(NUM_DIGITS)
    images.append(np.full((48, 64, 3), SOLID_COLOUR, np.uint8))
    rows = [{"label": str(label), "index": str(i)} for i, label in enumerate(labels)]
    rows.append({"label": "solid", "index": str(NUM_DIGITS)})
    root = tmp_path / "dataset"
    metadata = data.write_image_folder(root, images, rows)
    csv_rows = list(csv.DictReader(metadata.open()))
    (root / "metadata.json").write_text(json.dumps(csv_rows))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in csv_rows) + "\n")
    return root


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------ metadata


def test_csv_json_and_jsonl_give_the_same_items(folder):
    names = ("metadata.csv", "metadata.json", "metadata.jsonl")
    datasets = [data.FolderDataset(folder, folder / name, division=8) for name in names]
    assert {len(dataset) for dataset in datasets} == {NUM_DIGITS + 1}
    for index in range(NUM_DIGITS + 1):
        reference, *others = [dataset[index] for dataset in datasets]
        assert reference["index"] == str(index)
        for other in others:
            assert other.keys() == reference.keys()
            assert other["label"] == reference["label"]
            assert torch.equal(other["image"], reference["image"])


def test_json_numbers_stay_numbers_and_csv_values_are_strings(folder):
    (folder / "typed.json").write_text(json.dumps([{"image": "images/00000.png", "steps": 3, "scale": 0.5}]))
    item = data.FolderDataset(folder, folder / "typed.json", division=8)[0]
    assert item["steps"] == 3 and item["scale"] == 0.5
    assert data.FolderDataset(folder, folder / "metadata.csv", division=8)[0]["label"] == "0"


def test_repeat_cycles_over_the_rows(folder):
    dataset = data.FolderDataset(folder, folder / "metadata.csv", repeat=3, image_size=(16, 16))
    rows = NUM_DIGITS + 1
    assert len(dataset) == 3 * rows
    assert [dataset[i]["index"] for i in range(len(dataset))] == [str(i % rows) for i in range(3 * rows)]
    assert torch.equal(dataset[rows + 2]["image"], dataset[2]["image"])
    with pytest.raises(IndexError, match="out of range"):
        dataset[3 * rows]


def test_unknown_metadata_extension_is_refused(folder):
    path = folder / "metadata.parquet"
    path.write_text("")
    with pytest.raises(ValueError, match=r"metadata\.parquet.*\.csv, \.json, \.jsonl"):
        data.FolderDataset(folder, path)


def test_missing_column_names_the_column_and_the_columns_found(folder):
    with pytest.raises(ValueError, match=r"no column 'video'.*'image', 'index', 'label'.*data_file_keys"):
        data.FolderDataset(folder, folder / "metadata.csv", data_file_keys=("image", "video"))


def test_empty_or_missing_metadata_and_missing_folder_are_clear_errors(folder, tmp_path):
    (folder / "empty.csv").write_text("image,label\n")
    (folder / "empty.jsonl").write_text("\n")
    for name in ("empty.csv", "empty.jsonl"):
        with pytest.raises(ValueError, match=f"{name} has no rows; add one row per sample"):
            data.FolderDataset(folder, folder / name)
    with pytest.raises(FileNotFoundError, match=r"nope\.csv does not exist"):
        data.FolderDataset(folder, folder / "nope.csv")
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*absent does not exist"):
        data.FolderDataset(tmp_path / "absent", folder / "metadata.csv")


def test_malformed_metadata_names_the_line_or_row(folder):
    (folder / "bad.jsonl").write_text('{"image": "images/00000.png"}\n{"image": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2 is not valid json"):
        data.read_metadata(folder / "bad.jsonl")
    (folder / "object.json").write_text('{"image": "images/00000.png"}')
    with pytest.raises(ValueError, match="must hold a list of objects"):
        data.read_metadata(folder / "object.json")
    (folder / "extra.csv").write_text("image,label\nimages/00000.png,0,surplus\n")
    with pytest.raises(ValueError, match="row 0 has more fields than the header"):
        data.read_metadata(folder / "extra.csv")


# ------------------------------------------------------------------------------------ images


def test_fixed_size_gives_that_shape_and_exact_values(folder):
    dataset = data.FolderDataset(folder, folder / "metadata.csv", image_size=(24, 40))
    for index in range(len(dataset)):
        image = dataset[index]["image"]
        assert image.dtype == torch.float32 and image.shape == (3, 24, 40)
        assert image.min() >= -1.0 and image.max() <= 1.0
    solid = dataset[NUM_DIGITS]["image"]
    expected = torch.tensor([value / 127.5 - 1.0 for value in SOLID_COLOUR])
    assert torch.allclose(solid, expected[:, None, None].expand_as(solid), atol=1e-6)
    digit = dataset[0]["image"]
    assert torch.equal(digit[0], digit[1]) and digit.min() == -1.0 and digit.max() > 0.5


def test_max_pixels_bounds_the_area_keeps_the_aspect_and_floors_to_the_division(folder):
    dataset = data.FolderDataset(folder, folder / "metadata.csv", max_pixels=32 * 32, division=(8, 4))
    solid = dataset[NUM_DIGITS]["image"]
    assert solid.shape == (3, 24, 36)  # 48×64 scaled by sqrt(1024 / 3072) is 27.7×36.9
    digit = dataset[0]["image"]  # already within max_pixels and divisible: loaded unchanged
    images, _ = digit_images(1)
    assert torch.equal(digit, (torch.from_numpy(images[0]).float() / 127.5 - 1.0).expand(3, 32, 32))
    unbounded = data.FolderDataset(folder, folder / "metadata.csv", division=20)
    assert unbounded[NUM_DIGITS]["image"].shape == (3, 40, 60)
    with pytest.raises(ValueError, match="smaller than the division factors"):
        data.FolderDataset(folder, folder / "metadata.csv", division=64)[0]


def test_size_within_max_pixels_never_exceeds_the_budget():
    for height, width, budget in [(1080, 1920, 512 * 512), (1000, 100, 5000), (77, 91, 4096)]:
        out_height, out_width = data.size_within_max_pixels(height, width, budget, 8, 8)
        assert out_height * out_width <= budget and out_height % 8 == 0 and out_width % 8 == 0
        assert abs(out_width / out_height - width / height) < 0.5 * width / height


def test_resize_and_crop_keeps_the_center():
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, :10, 0] = stripes[:, 10:20, 1] = stripes[:, 20:, 2] = 255
    cropped = np.asarray(data.resize_and_crop(Image.fromarray(stripes), 10, 10))
    assert cropped.shape == (10, 10, 3)
    assert (cropped[..., 1] == 255).all() and (cropped[..., [0, 2]] == 0).all()
    halved = np.asarray(data.resize_and_crop(Image.fromarray(stripes), 5, 7))
    assert halved.shape == (5, 7, 3)
    assert (halved[:, 3, 1] == 255).all() and (halved[:, 3, [0, 2]] == 0).all()


def test_image_size_and_max_pixels_together_are_refused(folder):
    with pytest.raises(ValueError, match="give image_size or max_pixels, not both"):
        data.FolderDataset(folder, folder / "metadata.csv", image_size=(16, 16), max_pixels=256)
    with pytest.raises(ValueError, match=r"image_size must be \(height, width\)"):
        data.FolderDataset(folder, folder / "metadata.csv", image_size=(16, 0))


# ------------------------------------------------------------------------------------ paths and file errors


@pytest.mark.parametrize("bad_path", ["../outside.png", "images/../../outside.png", "ABSOLUTE"])
def test_paths_leaving_the_folder_are_refused(folder, bad_path):
    outside = folder.parent / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    bad_path = str(outside) if bad_path == "ABSOLUTE" else bad_path
    rows = [{"image": "images/00000.png"}, {"image": bad_path}]
    metadata = write_csv(folder / "escape.csv", rows)
    with pytest.raises(ValueError, match=r"row 1, column 'image'.*leaves the dataset folder") as error:
        data.FolderDataset(folder, metadata)
    assert repr(bad_path) in str(error.value)


def test_symlinks_resolving_outside_are_refused_and_inside_are_allowed(folder):
    outside = folder.parent / "secret.png"
    Image.new("RGB", (16, 16)).save(outside)
    (folder / "images" / "link_out.png").symlink_to(outside)
    (folder / "images" / "link_in.png").symlink_to(folder / "images" / "00001.png")
    metadata = write_csv(folder / "links.csv", [{"image": "images/link_in.png"}, {"image": "images/link_out.png"}])
    with pytest.raises(ValueError, match=r"row 1, column 'image'.*'images/link_out\.png'.*outside the dataset folder"):
        data.FolderDataset(folder, metadata)
    inside = write_csv(folder / "inside.csv", [{"image": "images/link_in.png"}])
    linked = data.FolderDataset(folder, inside, division=8)[0]["image"]
    assert torch.equal(linked, data.FolderDataset(folder, folder / "metadata.csv", division=8)[1]["image"])


def test_missing_file_error_names_the_row_column_and_full_path(folder):
    metadata = write_csv(folder / "missing.csv", [{"image": "images/00000.png"}, {"image": "images/gone.png"}])
    dataset = data.FolderDataset(folder, metadata, division=8)
    assert dataset[0]["image"].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv, row 1, column 'image'") as error:
        dataset[1]
    assert str((folder / "images" / "gone.png").resolve()) in str(error.value)


def test_corrupt_image_error_names_the_row_and_path(folder):
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    metadata = write_csv(folder / "broken.csv", [{"image": "images/broken.png", "label": "x"}])
    with pytest.raises(OSError, match=r"broken\.csv, row 0, column 'image': cannot read image .*broken\.png"):
        data.FolderDataset(folder, metadata)[0]


def test_empty_data_file_value_is_refused(folder):
    metadata = write_csv(folder / "blank.csv", [{"image": "", "label": "x"}])
    with pytest.raises(ValueError, match=r"row 0, column 'image': expected a file path"):
        data.FolderDataset(folder, metadata)


# ------------------------------------------------------------------------------------ batching


def drawn_indices(dataset, batch_size, random_key, count, start=0, shuffle=True):
    return [
        (position, batch["index"])
        for position, batch in islice(data.batches(dataset, batch_size, random_key, start=start, shuffle=shuffle), count)
    ]


@pytest.fixture
def dataset(folder):
    return data.FolderDataset(folder, folder / "metadata.csv", image_size=(8, 8))


def test_batches_are_deterministic_per_key_and_differ_between_keys(dataset):
    first = drawn_indices(dataset, 2, key(0), 6)
    assert first == drawn_indices(dataset, 2, key(0), 6)
    assert first != drawn_indices(dataset, 2, key(1), 6)
    assert [position for position, _ in first] == [2, 4, 6, 8, 10, 12]


def test_every_epoch_visits_every_sample_once_in_its_own_order(dataset):
    stream = [index for _, batch in drawn_indices(dataset, 4, key(3), 6) for index in batch]
    size = len(dataset)
    epochs = [stream[e * size : (e + 1) * size] for e in range(len(stream) // size)]
    assert len(epochs) == 4
    for epoch, order in enumerate(epochs):
        assert sorted(order) == sorted(str(i) for i in range(size))
        expected = data.epoch_order(key(3), epoch, size)
        assert order == [str(i) for i in expected]
    assert len({tuple(order) for order in epochs}) > 1


def test_resuming_from_a_position_reproduces_the_remaining_batches(dataset):
    uninterrupted = list(islice(data.batches(dataset, 4, key(5)), 5))
    position, _ = uninterrupted[1]
    resumed = list(islice(data.batches(dataset, 4, key(5), start=position), 3))
    for (expected_position, expected), (got_position, got) in zip(uninterrupted[2:], resumed):
        assert got_position == expected_position
        assert got["index"] == expected["index"]
        assert torch.equal(got["image"], expected["image"])


def test_unshuffled_batches_follow_the_rows_and_batches_look_as_documented(dataset):
    (position, batch), = islice(data.batches(dataset, 4, None, shuffle=False, start=4), 1)
    assert position == 8
    assert batch["index"] == ["4", "5", "0", "1"]
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert set(batch) == {"image", "label", "index"}


def test_batches_refuse_bad_arguments_before_iterating(dataset):
    with pytest.raises(ValueError, match="need a random key"):
        data.batches(dataset, 2, None)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.batches(dataset, 0, key(0))
    with pytest.raises(ValueError, match="start must be a non-negative int"):
        data.batches(dataset, 2, key(0), start=-1)


def test_collate_stacks_tensors_keeps_lists_and_explains_shape_mismatches():
    batch = data.collate([{"image": torch.zeros(3, 4, 4), "steps": 1}, {"image": torch.ones(3, 4, 4), "steps": 2}])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["steps"] == [1, 2]
    with pytest.raises(ValueError, match=r"cannot stack 'image': shapes differ.*image_size"):
        data.collate([{"image": torch.zeros(3, 4, 4)}, {"image": torch.zeros(3, 4, 8)}])
    with pytest.raises(ValueError, match="different keys"):
        data.collate([{"image": torch.zeros(1)}, {"label": "a"}])


# ------------------------------------------------------------------------------------ writing folders


def test_write_image_folder_writes_pngs_and_csv_without_leftovers(tmp_path):
    images, labels = digit_images(3)
    metadata = data.write_image_folder(tmp_path / "digits", images, [{"label": label} for label in labels])
    assert metadata == tmp_path / "digits" / "metadata.csv"
    rows = list(csv.DictReader(metadata.open()))
    assert rows == [{"image": f"images/{i:05d}.png", "label": str(label)} for i, label in enumerate(labels)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "digits" / rows[2]["image"])), images[2])
    assert not [path for path in (tmp_path / "digits").rglob("*") if path.name.endswith(".tmp")]


def test_write_image_folder_refuses_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="dtype float64.*uint8"):
        data.write_image_folder(tmp_path, [np.zeros((8, 8))], [{}])
    with pytest.raises(ValueError, match="2 images but 1 rows"):
        data.write_image_folder(tmp_path, [np.zeros((8, 8), np.uint8)] * 2, [{}])
    with pytest.raises(ValueError, match="already has the column 'image'"):
        data.write_image_folder(tmp_path, [np.zeros((8, 8), np.uint8)], [{"image": "x.png"}])
    assert not (tmp_path / "metadata.csv").exists()
