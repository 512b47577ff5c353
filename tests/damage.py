"""Ways to damage a checkpoint written by dsf.training.checkpoint, as a disk, a kill or a careless hand would."""

import shutil
from pathlib import Path


def array_data_files(step_folder: Path) -> list[Path]:
    """The files holding a checkpoint's array bytes (orbax's OCDBT data files), largest first."""
    files = [path for path in (Path(step_folder) / "arrays").glob("ocdbt.process_*/d/*") if path.is_file()]
    return sorted(files, key=lambda path: -path.stat().st_size)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def flip_a_byte_in_the_arrays(step_folder: Path) -> None:
    """One bit flipped in the middle of the largest array data file: orbax itself reads it without complaint."""
    flip_a_byte(array_data_files(step_folder)[0])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


DAMAGES = {
    "truncated arrays": lambda step: [truncate(path) for path in array_data_files(step)],
    "zeroed arrays": lambda step: [zero(path) for path in array_data_files(step)],
    "a flipped byte in the array data": flip_a_byte_in_the_arrays,
    "zeroed structure": lambda step: zero(Path(step) / "structure" / "metadata"),
    "no structure/": lambda step: shutil.rmtree(Path(step) / "structure"),
    "an empty step folder": lambda step: [shutil.rmtree(step), Path(step).mkdir()],
}


def flip_a_stored_byte_of(step_folder: Path, tensor) -> None:
    """One bit flipped inside the stored bytes of ``tensor`` (small arrays are stored uncompressed), in every array file
    that holds them; an error if none does."""
    raw = tensor.detach().contiguous().numpy().tobytes()
    found = False
    for path in (Path(step_folder) / "arrays").rglob("*"):
        data = bytearray(path.read_bytes()) if path.is_file() else bytearray()
        at = data.find(raw)
        if at >= 0:
            data[at + len(raw) // 2] ^= 0x10
            path.write_bytes(bytes(data))
            found = True
    assert found, f"the bytes of the tensor are stored in no file of {step_folder}"
