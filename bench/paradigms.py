"""Every training paradigm on the digits model, measured on real data, in one table.

Trains the base digits model with the recipe defaults (or loads --model), runs each paradigm as a
short run, and measures what it should change, with the SVM classifier on real digits of
bench/from_scratch_quality.py:

- LoRA fine-tuning teaches a style named by new prompt words: "... thick strokes" on dilated digits
  (mixed with the plain digits under their plain prompts, so the style stays bound to its words);
- direct distillation: the 4-step CFG-1 student against the 50-step CFG-3 teacher, on held-out seeds;
- differential LoRA: LoRA 1 on plain digits folded into the base, LoRA 2 on the same digits dilated;
  LoRA 2 alone on the base should thicken the strokes of plain prompts;
- two-stage split training: seconds per step from cached text states against the unsplit run;
- Diffusion-DPO: a LoRA trained to prefer the thick over the plain stroke of each digit (plain
  prompts, the frozen base as the reference) should raise the ink fraction of plain prompts while
  the digits stay readable;
- training from scratch: the base model itself.

    python bench/paradigms.py                          # trains the base first (about 4 min on 2 idle cores)
    python bench/paradigms.py --model outputs/digits/model
    python bench/paradigms.py --model outputs/digits/model --rows dpo   # one row
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dsf
from dsf.training.cache import write_cache
from dsf.models.digits import digit_accuracy, ink_fraction, load_model, prompt_for, real_digit_classifier
from dsf.models.digits.paradigms import (
    LORA_TARGETS, distill_items, distill_loss, dpo_loss, encode_text_once, full_sft, load_cached, lora_sft,
    preference_pairs, seeded_images, split_loss, teacher_cache, with_merged_lora, with_preset_lora, write_style_folder,
)
from dsf.models.digits.training import data_stream, digits_loss, load_training_set
from dsf.training.paradigm import fit
from dsf.training.train import TrainConfig
from dsf.transforms import save_lora

ROOT = Path(__file__).resolve().parents[1]
STYLE_WORDS = " thick strokes"
ROWS = ("scratch", "lora", "differential", "distill", "split", "dpo")


# ----------------------------------------------------------------------------- measures


def eval_set(per_digit: int, prompt_suffix: str = "", first_seed: int = 10**6):
    """``(digits, prompts, seeds)``: ``per_digit`` prompts per digit with seeds no training run uses."""
    digits = np.repeat(np.arange(10), per_digit)
    return digits, [prompt_for(int(d)) + prompt_suffix for d in digits], [first_seed + i for i in range(len(digits))]


def samples(model, prompts, seeds, steps: int = 20, cfg_scale: float = 3.0) -> torch.Tensor:
    return seeded_images(model, prompts, seeds, steps, cfg_scale)


# ----------------------------------------------------------------------------- runs


def short_run(max_steps: int, learning_rate: float) -> TrainConfig:
    return TrainConfig(learning_rate=learning_rate, weight_decay=0.0, max_steps=max_steps, progress=False)


def timed(run):
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def style_items(workdir: Path, style: str, prompt_suffix: str = "") -> list[dict]:
    folder = workdir / f"{style}{prompt_suffix.replace(' ', '_')}"
    metadata = folder / "metadata.csv"
    return load_training_set(metadata if metadata.exists() else write_style_folder(folder, style, prompt_suffix), 16)


def lora_style_rows(model, classifier, args, workdir: Path) -> list[tuple]:
    items = style_items(workdir, "thick", STYLE_WORDS) + style_items(workdir, "plain")
    trained, seconds = timed(lambda: fit(
        lora_sft(args.lora_rank), digits_loss(model), model.params, data_stream(items, 64, dsf.random.key(1)),
        short_run(args.lora_steps, args.learning_rate), key=dsf.random.key(2)))
    adapted = with_merged_lora(model, trained)
    digits, styled, seeds = eval_set(args.per_digit, STYLE_WORDS)
    _, plain, _ = eval_set(args.per_digit)
    before, after = samples(model, styled, seeds), samples(adapted, styled, seeds)
    plain_before, plain_after = samples(model, plain, seeds), samples(adapted, plain, seeds)
    data_ink = (ink_fraction(torch.stack([i["image"] for i in items[: len(items) // 2]])),
                ink_fraction(torch.stack([i["image"] for i in items[len(items) // 2 :]])))
    name = f"LoRA r{args.lora_rank}, {args.lora_steps} steps, {seconds:.0f} s"
    stack = f"chain(lora({args.lora_rank}, targets={LORA_TARGETS!r}), checkpoint())"
    return [
        (name, stack, f"ink fraction, '...{STYLE_WORDS}' prompts (data: {data_ink[0]:.2f} thick)", ink_fraction(before), ink_fraction(after)),
        ("", "", "digit accuracy, same samples", digit_accuracy(classifier, before, digits), digit_accuracy(classifier, after, digits)),
        ("", "", f"ink fraction, plain prompts (data: {data_ink[1]:.2f})", ink_fraction(plain_before), ink_fraction(plain_after)),
        ("", "", "digit accuracy, plain prompts", digit_accuracy(classifier, plain_before, digits), digit_accuracy(classifier, plain_after, digits)),
    ]


def distill_rows(model, classifier, args) -> list[tuple]:
    teacher = teacher_cache(model, num_inference_steps=50, cfg_scale=3.0)
    pool = [d for d in range(10) for _ in range(args.distill_seeds_per_digit)]
    items = distill_items([prompt_for(d) for d in pool], range(len(pool)), num_inference_steps=4, cfg_scale=1.0)
    digits, prompts, seeds = eval_set(args.per_digit)
    target = teacher(list(zip(prompts, seeds)))
    trained, seconds = timed(lambda: fit(
        lora_sft(args.distill_rank), distill_loss(model, teacher), model.params, data_stream(items, 32, dsf.random.key(3)),
        short_run(args.distill_steps, args.learning_rate), key=dsf.random.key(4)))
    before, after = samples(model, prompts, seeds, 4, 1.0), samples(with_merged_lora(model, trained), prompts, seeds, 4, 1.0)
    name = f"direct distillation, LoRA r{args.distill_rank}, {args.distill_steps} steps, {seconds:.0f} s (teacher runs included)"
    return [
        (name, "loss differentiates through the 4-step sampler",
         f"4-step CFG-1 digit accuracy (teacher, 50 steps CFG 3: {digit_accuracy(classifier, target, digits):.3f})",
         digit_accuracy(classifier, before, digits), digit_accuracy(classifier, after, digits)),
        ("", "", "mean squared distance to the teacher's image", float((before - target).square().mean()),
         float((after - target).square().mean())),
    ]


def differential_rows(model, classifier, args, workdir: Path) -> list[tuple]:
    plain, thick = style_items(workdir, "plain"), style_items(workdir, "thick")
    config = short_run(args.lora_steps, args.learning_rate)
    lora_1 = fit(lora_sft(args.lora_rank), digits_loss(model), model.params, data_stream(plain, 64, dsf.random.key(5)), config,
                 key=dsf.random.key(6))
    save_lora(lora_1["dit"], workdir / "lora_1.safetensors")
    preset = with_preset_lora(model.params, workdir / "lora_1.safetensors")
    lora_2 = fit(lora_sft(args.lora_rank), digits_loss(model), preset, data_stream(thick, 64, dsf.random.key(7)), config,
                 key=dsf.random.key(8))
    save_lora(lora_2["dit"], workdir / "lora_2.safetensors")
    alone = with_preset_lora(model.params, workdir / "lora_2.safetensors")
    digits, prompts, seeds = eval_set(args.per_digit)
    base_images = samples(model, prompts, seeds)
    alone_images = samples(with_merged_lora(model, alone), prompts, seeds)
    both_images = samples(with_merged_lora(model, lora_2), prompts, seeds)
    data_ink = ink_fraction(torch.stack([i["image"] for i in plain])), ink_fraction(torch.stack([i["image"] for i in thick]))
    stack = "merge_lora(load_lora(params, lora_1)), then chain(lora(...), checkpoint())"
    return [
        (f"differential LoRA r{args.lora_rank}, 2 x {args.lora_steps} steps", stack,
         f"ink fraction, base -> LoRA 2 alone (data: A {data_ink[0]:.2f}, B {data_ink[1]:.2f})",
         ink_fraction(base_images), ink_fraction(alone_images)),
        ("", "", "ink fraction, base -> LoRA 1 merged + LoRA 2", ink_fraction(base_images), ink_fraction(both_images)),
        ("", "", "digit accuracy, base -> LoRA 2 alone", digit_accuracy(classifier, base_images, digits),
         digit_accuracy(classifier, alone_images, digits)),
    ]


def split_rows(model, args, workdir: Path) -> list[tuple]:
    items = style_items(workdir, "plain")
    cache = workdir / "text_cache"
    shutil.rmtree(cache, ignore_errors=True)
    _, encode_seconds = timed(lambda: write_cache(cache, encode_text_once(model, items)))
    cached = load_cached(cache)
    runs = {"unsplit": (digits_loss(model), model.params, items), "split": (split_loss(model), {"dit": model.params["dit"]}, cached)}
    per_step = {name: [] for name in runs}
    for _ in range(args.split_rounds):
        for name, (loss, params, data) in runs.items():
            started = time.perf_counter()
            fit(full_sft(), loss, params, data_stream(data, 128, dsf.random.key(9)), short_run(args.split_steps, 1e-4),
                key=dsf.random.key(10))
            per_step[name].append((time.perf_counter() - started) / args.split_steps)
    unsplit, split = statistics.median(per_step["unsplit"]), statistics.median(per_step["split"])
    return [("two-stage split training, full fine-tuning, batch 128", "text encoder run once (dsf.training.cache), then chain(checkpoint())",
             f"seconds per step, unsplit -> split (split/unsplit {split / unsplit:.2f}; stage 1: {encode_seconds:.1f} s)",
             unsplit, split)]


def dpo_rows(model, classifier, args, workdir: Path) -> list[tuple]:
    pairs = preference_pairs(style_items(workdir, "thick"), style_items(workdir, "plain"))
    trained, seconds = timed(lambda: fit(
        lora_sft(args.lora_rank), dpo_loss(model, model.params, args.dpo_beta), model.params,
        data_stream(pairs, 64, dsf.random.key(11)), short_run(args.dpo_steps, args.learning_rate), key=dsf.random.key(12),
        has_aux=True))
    digits, prompts, seeds = eval_set(args.per_digit)
    before, after = samples(model, prompts, seeds), samples(with_merged_lora(model, trained), prompts, seeds)
    data_ink = (ink_fraction(torch.stack([pair["preferred"] for pair in pairs])),
                ink_fraction(torch.stack([pair["rejected"] for pair in pairs])))
    name = f"Diffusion-DPO beta {args.dpo_beta:g}, LoRA r{args.lora_rank}, {args.dpo_steps} steps, {seconds:.0f} s"
    return [
        (name, f"chain(lora({args.lora_rank}, ...), checkpoint()); reference: the frozen base",
         f"ink fraction, plain prompts (data: preferred {data_ink[0]:.2f}, rejected {data_ink[1]:.2f})",
         ink_fraction(before), ink_fraction(after)),
        ("", "", "digit accuracy, same samples", digit_accuracy(classifier, before, digits),
         digit_accuracy(classifier, after, digits)),
    ]


def scratch_rows(model, classifier, args, training_seconds) -> list[tuple]:
    digits, prompts, seeds = eval_set(args.per_digit)
    trained = "" if training_seconds is None else f", trained here in {training_seconds:.0f} s"
    return [(f"training from scratch (recipe defaults{trained})", "chain()", "digit accuracy, 20 steps CFG 3", None,
             digit_accuracy(classifier, samples(model, prompts, seeds), digits))]


def print_table(rows: list[tuple]) -> None:
    header = ("paradigm", "transform stack", "measure", "before", "after")
    cells = [header] + [(a, b, c, "" if d is None else f"{d:.4g}", f"{e:.4g}") for a, b, c, d, e in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    for i, row in enumerate(cells):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * width for width in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder; trains one with the recipe defaults when absent")
    parser.add_argument("--output_path", default="outputs/paradigms_bench")
    parser.add_argument("--per_digit", type=int, default=20, help="evaluation samples per digit")
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--lora_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--distill_rank", type=int, default=8)
    parser.add_argument("--distill_steps", type=int, default=100)
    parser.add_argument("--distill_seeds_per_digit", type=int, default=30)
    parser.add_argument("--split_steps", type=int, default=10)
    parser.add_argument("--split_rounds", type=int, default=3)
    parser.add_argument("--dpo_steps", type=int, default=200)
    parser.add_argument("--dpo_beta", type=float, default=1000.0)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"the rows to measure, comma-separated from {','.join(ROWS)}")
    args = parser.parse_args()
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    output = Path(args.output_path)
    training_seconds, model_folder = None, args.model
    if model_folder is None:
        _, training_seconds = timed(lambda: subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "train_from_scratch.py"), "--output_path", str(output / "base")], check=True))
        model_folder = output / "base" / "model"
    model = load_model(model_folder)
    classifier, real_accuracy = real_digit_classifier(model.config.image_size)
    workdir = output / "runs"
    workdir.mkdir(parents=True, exist_ok=True)

    measures = {
        "scratch": lambda: scratch_rows(model, classifier, args, training_seconds),
        "lora": lambda: lora_style_rows(model, classifier, args, workdir),
        "differential": lambda: differential_rows(model, classifier, args, workdir),
        "distill": lambda: distill_rows(model, classifier, args),
        "split": lambda: split_rows(model, args, workdir),
        "dpo": lambda: dpo_rows(model, classifier, args, workdir),
    }
    rows, started = [], time.perf_counter()
    for name in ROWS:
        if name in args.rows.split(","):
            rows += measures[name]()
    print(f"\nSVM accuracy on held-out real digits: {real_accuracy:.3f}; {args.per_digit} samples per digit, seeds unseen in "
          f"training; {torch.get_num_threads()} threads; paradigms took {time.perf_counter() - started:.0f} s\n")
    print_table(rows)


if __name__ == "__main__":
    main()
