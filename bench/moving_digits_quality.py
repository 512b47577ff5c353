"""Does the tiny Wan video DiT really learn moving digits? Digit accuracy and motion of its videos.

Trains the moving-digits model with the recipe's defaults (or loads --model), generates --per_prompt
videos for each (digit, direction) prompt, and measures on every video:

- per-frame digit accuracy: each frame's digit-sized window around its center of mass, classified
  by the SVM on real digits of ``bench/from_scratch_quality.py``, against the prompted digit;
- motion: the fraction whose center of mass moves (first to last frame) in the prompted direction:
  at least half the prompted travel that way, and more that way than any other.

The same numbers on real training videos (the same count per prompt) are printed beside them, with
the classifier's accuracy on held-out real digits and the training time.

    python bench/moving_digits_quality.py                    # train (about 15 minutes on 2 cores), then measure
    python bench/moving_digits_quality.py --model outputs/moving_digits/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import dsf
from dsf.models.digits import real_digit_classifier
from dsf.models.digits.training import digit_images
from dsf.models.moving_digits import (
    DIRECTIONS, MovingDigitsConfig, digit_crops, generate_tensors, load_model, motion_direction, prompt_for, render_video,
    start_range, to_gray,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from from_scratch_quality import trained_model  # noqa: E402

PROMPTS = [(digit, direction) for digit in range(10) for direction in DIRECTIONS]


def real_videos(config: MovingDigitsConfig, per_prompt: int, key: dsf.random.Key) -> torch.Tensor:
    """``per_prompt`` training videos (N, channels, frames, H, W) for each (digit, direction) of ``PROMPTS``:
    a random sprite of the digit from a random start.

    >>> real_videos(MovingDigitsConfig(), 1, dsf.random.key(0)).shape
    torch.Size([40, 3, 5, 16, 16])
    """
    sprites, labels = digit_images(config.digit_size)
    videos = []
    for i, (digit, direction) in enumerate(PROMPTS):
        candidates = np.flatnonzero(labels == digit)
        for j in range(per_prompt):
            pick_key, row_key, col_key = dsf.random.split(dsf.random.fold_in(dsf.random.fold_in(key, i), j), 3)
            (low_row, high_row), (low_col, high_col) = start_range(config, direction)
            start = int(dsf.random.randint(row_key, low_row, high_row + 1)), int(dsf.random.randint(col_key, low_col, high_col + 1))
            sprite = sprites[candidates[int(dsf.random.randint(pick_key, 0, len(candidates)))]]
            videos.append(render_video(sprite, direction, start, config))
    return torch.stack(videos)


def generated_videos(model, per_prompt: int, seed: int, cfg_scale: float, steps: int, batch: int = 200) -> torch.Tensor:
    """``per_prompt`` generated videos for each (digit, direction) of ``PROMPTS``, in that order.

    >>> from dsf.models.moving_digits import new_model
    >>> cfg = MovingDigitsConfig(num_heads=1, num_layers=1, ffn_dim=8, text_dim=8, text_layers=1)
    >>> generated_videos(new_model(cfg, dsf.random.key(0)), 1, seed=0, cfg_scale=1.0, steps=1).shape
    torch.Size([40, 3, 5, 16, 16])
    """
    prompts = [prompt_for(digit, direction) for digit, direction in PROMPTS for _ in range(per_prompt)]
    return torch.cat([
        generate_tensors(model, prompts[start : start + batch], seed=seed + start, cfg_scale=cfg_scale,
                         num_inference_steps=steps, progress=False)
        for start in range(0, len(prompts), batch)
    ])


def measure(videos: torch.Tensor, per_prompt: int, classifier, config: MovingDigitsConfig) -> dict:
    """Per-frame digit accuracy and the fraction moving in the prompted direction (at least half the
    prompted travel, and more that way than any other), overall and per direction, of videos ordered
    as ``PROMPTS`` with ``per_prompt`` each.

    >>> from sklearn.dummy import DummyClassifier
    >>> always_zero = DummyClassifier(strategy="constant", constant=0).fit(np.zeros((1, 100)), [0])
    >>> result = measure(real_videos(MovingDigitsConfig(), 1, dsf.random.key(0)), 1, always_zero, MovingDigitsConfig())
    >>> result["frame_accuracy"], result["moving"]
    (0.1, 1.0)
    """
    gray = to_gray(videos)  # (N, frames, H, W)
    digits = np.repeat([digit for digit, _ in PROMPTS], per_prompt)
    directions = np.repeat([direction for _, direction in PROMPTS], per_prompt)
    crops = torch.cat([digit_crops(video, config.digit_size) for video in gray])  # (N·frames, D, D)
    predicted = classifier.predict(crops.flatten(1).numpy()).reshape(len(gray), -1)
    correct = predicted == digits[:, None]
    moving = np.array([motion_direction(video, config.travel / 2) == direction for video, direction in zip(gray, directions)])
    return {
        "frame_accuracy": float(correct.mean()),
        "moving": float(moving.mean()),
        "per_direction": {d: (float(correct[directions == d].mean()), float(moving[directions == d].mean())) for d in DIRECTIONS},
        "per_digit": [float(correct[digits == d].mean()) for d in range(10)],
    }


def main() -> None:
    """Train or load the model, measure generated and real videos, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder; trains one with the recipe defaults when absent")
    parser.add_argument("--output_path", default="outputs/moving_digits_bench")
    parser.add_argument("--per_prompt", type=int, default=10, help="videos per (digit, direction) prompt")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cfg_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    args = parser.parse_args()

    model_folder, training_seconds = trained_model(args.model, "train_moving_digits.py", args.output_path)

    model = load_model(model_folder)
    size = model.config.digit_size
    classifier, held_out_accuracy = real_digit_classifier(size)
    real = measure(real_videos(model.config, args.per_prompt, dsf.random.key(args.seed)), args.per_prompt, classifier,
                   model.config)
    generated = measure(generated_videos(model, args.per_prompt, args.seed, args.cfg_scale, args.num_inference_steps),
                        args.per_prompt, classifier, model.config)

    print(f"classifier accuracy on held-out real digits ({size}x{size}): {held_out_accuracy:.1%}")
    print(f"{args.per_prompt} videos per prompt (10 digits x {len(DIRECTIONS)} directions), cfg {args.cfg_scale}, "
          f"{args.num_inference_steps} steps")
    print(f"{'':24} {'frame digit accuracy':>21} {'moving as prompted':>19}")
    for name, result in (("real training videos", real), ("generated videos", generated)):
        print(f"{name:24} {result['frame_accuracy']:21.1%} {result['moving']:19.1%}")
    print("generated, per direction (accuracy / moving): "
          + "  ".join(f"{d}: {a:.0%} / {m:.0%}" for d, (a, m) in generated["per_direction"].items()))
    print("generated, per digit (accuracy): " + "  ".join(f"{d}:{a:.0%}" for d, a in enumerate(generated["per_digit"])))
    log = Path(model_folder).parent / "log.csv"
    if log.is_file():
        last = log.read_text().splitlines()[-1].split(",")
        print(f"training time: {float(last[4]):.0f} s for {last[0]} steps ({torch.get_num_threads()} threads; from {log})")
    if training_seconds is not None:
        print(f"recipe wall time (imports, training, saving, sample strip): {training_seconds:.0f} s")


if __name__ == "__main__":
    main()
