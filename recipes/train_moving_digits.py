"""Train a tiny Wan video DiT from scratch on moving digits (a scikit-learn digit sliding left, right,
up or down 2 pixels a frame across 5 frames of 16×16 pixels), then sample it.

    python recipes/train_moving_digits.py                     # train, save, write a sample strip
    python recipes/train_moving_digits.py sample --model outputs/moving_digits/model \\
        --prompt "a handwritten digit seven moving left" --num 4 --seed 0 --out outputs/sevens

Training writes under --output_path: ``log.csv``, resumable checkpoints (``checkpoints/``), the
finished model (``model/``) and ``samples.png`` (a row per digit, a video per direction: left,
right, up, down, each its frames left to right). ``--resume`` continues a killed run from its last
checkpoint. Videos are drawn on the fly from the seed (no dataset folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import dsf
from dsf.models.digits.training import digit_images
from dsf.models.moving_digits import (
    DIRECTIONS, MovingDigitsConfig, generate_tensors, load_model, moving_digits_loss, new_model, prompt_for, save_image,
    save_model, video_stream, video_strip,
)
from dsf.cli.train_sample import run_command, sample_parser, save_numbered
from dsf.training.train import TrainConfig, train
from dsf.transforms import checkpoint
from dsf.cli.flag_types import finite_float, non_negative_int, positive_int


def train_parser() -> argparse.ArgumentParser:
    """The training command line.

    >>> train_parser().parse_args([]).output_path
    'outputs/moving_digits'
    """
    parser = argparse.ArgumentParser(description="Train the moving-digits video model from scratch.")
    parser.add_argument("--output_path", default="outputs/moving_digits")
    parser.add_argument("--max_steps", type=positive_int, default=4000)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--learning_rate", type=finite_float, default=2e-3)
    parser.add_argument("--warmup_steps", type=non_negative_int, default=50)
    parser.add_argument("--checkpoint_steps", type=positive_int, default=500)
    parser.add_argument("--use_gradient_checkpointing", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--cfg_scale", type=finite_float, default=4.0)
    parser.add_argument("--num_inference_steps", type=positive_int, default=20)
    parser.add_argument("--num_layers", type=positive_int, default=MovingDigitsConfig.num_layers, help="number of Wan blocks")
    parser.add_argument("--num_heads", type=positive_int, default=MovingDigitsConfig.num_heads, help="Wan width = heads × 32")
    return parser


def sample_strip(model, seed: int, cfg_scale: float, steps: int):
    """One row per digit 0–9, one video per direction (left, right, up, down), upscaled ×4.

    >>> cfg = MovingDigitsConfig(num_heads=1, num_layers=1, ffn_dim=8, text_dim=8, text_layers=1)
    >>> sample_strip(new_model(cfg, dsf.random.key(0)), seed=0, cfg_scale=3.0, steps=1).size
    (1392, 676)
    """
    prompts = [prompt_for(digit, direction) for digit in range(10) for direction in DIRECTIONS]
    videos = generate_tensors(model, prompts, seed=seed, cfg_scale=cfg_scale, num_inference_steps=steps)
    return video_strip(videos, per_row=len(DIRECTIONS))


def run_training(args) -> Path:
    """Train with the parsed ``args``, save the model and the sample strip; the model folder (see :func:`main`)."""
    output = Path(args.output_path)
    model_key, data_key, train_key = dsf.random.split(dsf.random.key(args.seed), 3)
    config = MovingDigitsConfig(num_layers=args.num_layers, num_heads=args.num_heads)
    model = new_model(config, model_key)
    sprites, labels = digit_images(config.digit_size)

    transforms = dsf.chain(*([checkpoint()] if args.use_gradient_checkpointing else []))
    train_config = TrainConfig(
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        output_path=str(output),
        checkpoint_steps=args.checkpoint_steps,
        resume=args.resume,
        run_settings={"batch_size": args.batch_size},
    )
    started = time.perf_counter()
    params = train(transforms(moving_digits_loss(model)), transforms.init(model.params),
                   video_stream(sprites, labels, args.batch_size, data_key, config), train_config,
                   where=r"^dit/", key=train_key)
    print(f"trained to step {args.max_steps} ({time.perf_counter() - started:.0f} s in this run)")

    trained = dataclasses.replace(model, params=params)
    model_folder = save_model(trained, output / "model")
    strip = sample_strip(trained, args.seed, args.cfg_scale, args.num_inference_steps)
    save_image(strip, output / "samples.png")
    print(f"model: {model_folder}\nsample strip: {output / 'samples.png'}")
    return model_folder


def run_sampling(argv: list[str]) -> None:
    """Write ``--num`` videos of ``--prompt`` as PNG strips (frames left to right) under ``--out`` (see :func:`main`)."""
    args = sample_parser("Sample a trained moving-digits model.", "a handwritten digit seven moving left",
                         cfg_scale=4.0).parse_args(argv)
    model = load_model(args.model)
    videos = generate_tensors(model, [args.prompt] * args.num, seed=args.seed, cfg_scale=args.cfg_scale,
                              num_inference_steps=args.num_inference_steps)
    save_numbered([video_strip(video[None], per_row=1) for video in videos], args.out, "videos (frames left to right)")


def main(argv: list[str]) -> None:
    """Train (``[train] --flags``) or sample (``sample --flags``); ``tests/test_moving_digits.py`` runs both.

    >>> main(["sample", "--model", "/no/such/model", "--prompt", "a digit one moving up", "--out", "/tmp/unused"])
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/model/config.json not found: the model must be a folder written by recipes/train_moving_digits.py
    """
    run_command(argv, train=lambda rest: run_training(train_parser().parse_args(rest)), sample=run_sampling)


if __name__ == "__main__":
    main(sys.argv[1:])
