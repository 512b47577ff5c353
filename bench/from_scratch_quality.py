"""Does the from-scratch digits model really learn? Conditional accuracy of its samples.

Trains the digits model with the recipe's defaults (or loads --model), generates --per_digit
samples for each digit prompt, and classifies them with an SVM trained on real digits. Prints the
conditional accuracy (goal >= 90%) beside the classifier's accuracy on held-out real digits, and
the training time.

    python bench/from_scratch_quality.py                    # train (about 5-10 min on 2 cores), then measure
    python bench/from_scratch_quality.py --model outputs/digits/model
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dsf.models.digits import generate_tensors, gray, load_model, prompt_for, real_digit_classifier

ROOT = Path(__file__).resolve().parents[1]


def sample_features(model, per_digit: int, seed: int, cfg_scale: float, steps: int, batch: int = 250):
    """Generated images as classifier features (grayscale in [0, 1]) and their prompted digits."""
    prompts = [prompt_for(d) for d in range(10) for _ in range(per_digit)]
    chunks = []
    for start in range(0, len(prompts), batch):
        images = generate_tensors(model, prompts[start : start + batch], seed=seed + start, cfg_scale=cfg_scale,
                                  num_inference_steps=steps, progress=False)
        chunks.append(gray(images).flatten(1))
    return torch.cat(chunks).numpy(), np.repeat(np.arange(10), per_digit)


def trained_model(model: str | None, recipe: str, output_path: str) -> tuple[str, float | None]:
    """``(model, None)`` for a given model folder; else the folder a run of ``recipes/<recipe>`` with its
    defaults writes under ``output_path``, and the run's wall seconds."""
    if model is not None:
        return model, None
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "recipes" / recipe), "--output_path", output_path], check=True)
    return str(Path(output_path) / "model"), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder; trains one with the recipe defaults when absent")
    parser.add_argument("--output_path", default="outputs/digits_bench")
    parser.add_argument("--per_digit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cfg_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    args = parser.parse_args()

    model_folder, training_seconds = trained_model(args.model, "train_from_scratch.py", args.output_path)

    model = load_model(model_folder)
    classifier, real_accuracy = real_digit_classifier(model.config.image_size)
    features, prompted = sample_features(model, args.per_digit, args.seed, args.cfg_scale, args.num_inference_steps)
    predicted = classifier.predict(features)
    accuracy = float((predicted == prompted).mean())
    per_digit = [float((predicted[prompted == d] == d).mean()) for d in range(10)]

    print(f"classifier accuracy on held-out real digits: {real_accuracy:.1%}")
    print(f"conditional accuracy of generated digits ({args.per_digit} per digit, cfg {args.cfg_scale}, "
          f"{args.num_inference_steps} steps): {accuracy:.1%}  (goal >= 90%)")
    print("per digit: " + "  ".join(f"{d}:{a:.0%}" for d, a in enumerate(per_digit)))
    if training_seconds is not None:
        print(f"training time (recipe defaults, {torch.get_num_threads()} threads): {training_seconds:.0f} s  (goal <= 600 s)")


if __name__ == "__main__":
    main()
