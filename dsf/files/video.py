"""Video files through PyAV (FFmpeg): write frames as an H.264 mp4, read a video's frames back.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "gray.mp4"
    >>> write_mp4([Image.new("RGB", (32, 16), (v, v, v)) for v in range(0, 250, 50)], path, fps=16)
    >>> frames = read_video(path)
    >>> len(frames), frames[0].size
    (5, (32, 16))
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

Frame = Image.Image | np.ndarray  # a PIL image, or a uint8 array (H, W, 3)


def _rgb_array(frame: Frame, index: int) -> np.ndarray:
    array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"frame {index} is a {array.dtype} array of shape {array.shape}; write_mp4 takes PIL images or uint8 "
            "arrays (H, W, 3)"
        )
    return array


def _check_frames(arrays: Sequence[np.ndarray]) -> tuple[int, int]:
    if not arrays:
        raise ValueError("no frames to write; pass at least one frame")
    sizes = {array.shape[:2] for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"frames differ in size {sorted(sizes)} (height, width); give every frame one size")
    height, width = sizes.pop()
    if height % 2 or width % 2:
        raise ValueError(
            f"frames are {width}x{height}; H.264's yuv420p needs even sides: crop or resize to "
            f"{width - width % 2}x{height - height % 2}"
        )
    return height, width


def write_mp4(frames: Sequence[Frame], path: str | os.PathLike, fps: int = 16, crf: int = 18) -> None:
    """Write ``frames`` (PIL images or uint8 arrays (H, W, 3), even sides) as an H.264 mp4 at ``fps``.

    ``crf`` is x264's quality (0 lossless, 18 visually lossless, 23 its default). The file is
    written under a temporary name in the same folder, then renamed, so ``path`` never holds half
    a video.

    >>> import tempfile, numpy as np
    >>> write_mp4([np.zeros((8, 7, 3), np.uint8)], Path(tempfile.mkdtemp()) / "odd.mp4")
    Traceback (most recent call last):
    ...
    ValueError: frames are 7x8; H.264's yuv420p needs even sides: crop or resize to 6x8
    """
    import av

    arrays = [_rgb_array(frame, i) for i, frame in enumerate(frames)]
    height, width = _check_frames(arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with av.open(temporary, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for array in arrays:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> list[Image.Image]:
    """The frames of a video file as RGB PIL images, at most ``max_frames`` from the start.

    >>> read_video("/nonexistent.mp4")
    Traceback (most recent call last):
    ...
    FileNotFoundError: video file /nonexistent.mp4 does not exist
    """
    import av

    if not Path(path).is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(frame.to_image())
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return frames
