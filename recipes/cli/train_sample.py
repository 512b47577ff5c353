"""The command line of the train-from-scratch recipes: training by default (or after ``train``),
``sample`` to draw pictures from a trained model folder.

Example:
    >>> called = []
    >>> run_command(["sample", "--num", "2"], train=called.append, sample=lambda argv: called.append(("sample", argv)))
    >>> run_command(["train", "--max_steps", "1"], train=called.append, sample=print)
    >>> run_command([], train=called.append, sample=print)
    >>> called
    [('sample', ['--num', '2']), ['--max_steps', '1'], []]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from dsf.cli.flag_types import finite_float, non_negative_int, positive_int


def run_command(argv: list[str], *, train: Callable[[list[str]], object], sample: Callable[[list[str]], object]) -> None:
    """``sample(rest)`` for ``["sample", *rest]``, else ``train`` of the arguments after an optional ``train``."""
    if argv[:1] == ["sample"]:
        sample(argv[1:])
    else:
        train(argv[1:] if argv[:1] == ["train"] else argv)


def sample_parser(description: str, prompt_example: str, cfg_scale: float) -> argparse.ArgumentParser:
    """The ``sample`` command line: a model folder, a prompt, how many, the seed, the output folder, the sampler.

    >>> args = sample_parser("Sample.", "a digit one", 3.0).parse_args(["--model", "m", "--prompt", "a digit one", "--out", "o"])
    >>> args.num, args.cfg_scale, args.num_inference_steps
    (4, 3.0, 20)
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a model folder written by training (OUTPUT_PATH/model)")
    parser.add_argument("--prompt", required=True, help=f'e.g. "{prompt_example}"')
    parser.add_argument("--num", type=positive_int, default=4)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cfg_scale", type=finite_float, default=cfg_scale)
    parser.add_argument("--num_inference_steps", type=positive_int, default=20)
    return parser


def save_numbered(images: Sequence[Image.Image], out: str | Path, what: str = "images") -> None:
    """Save ``images`` as ``out/0000.png``, ``out/0001.png``, ... and say how many went where.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "samples"
    >>> save_numbered([Image.new("L", (2, 2))] * 2, folder)
    wrote 2 images to ...
    >>> sorted(p.name for p in folder.iterdir())
    ['0000.png', '0001.png']
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:04d}.png")
    print(f"wrote {len(images)} {what} to {out}")
