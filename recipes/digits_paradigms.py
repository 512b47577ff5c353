"""Run a training paradigm on a trained digits model folder (from recipes/train_from_scratch.py).

    M=outputs/digits/model
    # LoRA fine-tuning (--lora_rank 0: full fine-tuning) on a restyled copy of the digits
    python recipes/digits_paradigms.py lora --model $M --dataset thick --prompt_suffix " thick strokes" --keep_plain \\
        --output_path outputs/paradigms/thick_strokes
    # differential LoRA: LoRA 1 on set A, folded into the base; LoRA 2 on set B on top (use LoRA 2 alone)
    python recipes/digits_paradigms.py differential --model $M --dataset_a plain --dataset_b thick \\
        --output_path outputs/paradigms/differential
    # direct distillation: a 4-step CFG-1 student towards the 50-step CFG-3 teacher, targets made on the fly
    python recipes/digits_paradigms.py distill --model $M --output_path outputs/paradigms/distill
    #   ... or from a teacher dataset folder (columns prompt, seed, num_inference_steps, cfg_scale), written if absent
    python recipes/digits_paradigms.py distill --model $M --teacher_data outputs/paradigms/teacher --output_path ...
    # two-stage split training: text states computed once into the --cache folder, then training from it
    python recipes/digits_paradigms.py split --model $M --stage data_process --cache outputs/paradigms/text_cache
    python recipes/digits_paradigms.py split --model $M --stage train --cache outputs/paradigms/text_cache \\
        --output_path outputs/paradigms/split

A LoRA run writes ``lora.safetensors`` (attach it with ``dsf.transforms.load_lora(params["dit"], path)``),
a full run the model folder ``model/``; differential LoRA writes ``lora_1.safetensors`` and
``lora_2.safetensors``. Training from scratch is recipes/train_from_scratch.py, the same machinery.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import dsf
from dsf.training.cache import write_cache
from dsf.models.digits import load_model, prompt_for, save_model
from dsf.models.digits.paradigms import (
    STYLES, distill_items, distill_loss, encode_text_once, full_sft, load_cached, lora_sft, split_loss,
    teacher_cache, with_preset_lora, write_style_folder, write_teacher_folder,
)
from dsf.models.digits.training import data_stream, digits_loss, load_training_set
from dsf.training.paradigm import fit
from dsf.training.train import TrainConfig
from dsf.transforms import save_lora
from dsf.cli.flag_types import finite_float, non_negative_int, positive_int


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a model folder written by train_from_scratch.py")
    parser.add_argument("--output_path", default="outputs/paradigms")
    parser.add_argument("--lora_rank", type=non_negative_int, default=4, help="0 trains every DiT leaf (full fine-tuning)")
    parser.add_argument("--max_steps", type=positive_int, default=200)
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--learning_rate", type=finite_float, default=2e-3)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    return parser


def lora_parser() -> argparse.ArgumentParser:
    parser = common_parser("Fine-tune on a dataset: LoRA, or full with --lora_rank 0.")
    parser.add_argument("--dataset", choices=sorted(STYLES), default="thick", help="the digits restyled")
    parser.add_argument("--prompt_suffix", default=" thick strokes", help="words naming the style in every prompt")
    parser.add_argument("--keep_plain", action="store_true",
                        help="also train on the plain digits under plain prompts, so the style stays bound to its words")
    parser.add_argument("--dataset_metadata_path", help="a dataset folder's csv/json/jsonl (image, prompt); overrides --dataset")
    parser.add_argument("--preset_lora_path", help="a LoRA folded into the base before training (differential LoRA)")
    return parser


def differential_parser() -> argparse.ArgumentParser:
    parser = common_parser("Differential LoRA: LoRA 1 on set A folded into the base, LoRA 2 trained on set B.")
    parser.add_argument("--dataset_a", choices=sorted(STYLES), default="plain")
    parser.add_argument("--dataset_b", choices=sorted(STYLES), default="thick")
    return parser


def distill_parser() -> argparse.ArgumentParser:
    parser = common_parser("Direct distillation: a few-step CFG-1 student towards the many-step CFG teacher.")
    parser.set_defaults(lora_rank=8, batch_size=32, max_steps=100)
    parser.add_argument("--num_inference_steps", type=positive_int, default=4, help="the student's steps")
    parser.add_argument("--teacher_steps", type=positive_int, default=50)
    parser.add_argument("--teacher_cfg_scale", type=finite_float, default=3.0)
    parser.add_argument("--seeds_per_digit", type=positive_int, default=30, help="the prompt-seed pairs the student learns from")
    parser.add_argument("--teacher_data", help="a teacher dataset folder, written first if absent; default: targets on the fly")
    return parser


def split_parser() -> argparse.ArgumentParser:
    parser = common_parser("Two-stage split training: text states computed once, then training without the text encoder.")
    parser.add_argument("--stage", choices=("data_process", "train", "both"), default="both")
    parser.add_argument("--cache", help="the text-state cache folder, a dsf.training.cache (default OUTPUT_PATH/text_cache)")
    parser.add_argument("--dataset", choices=sorted(STYLES), default="plain")
    parser.add_argument("--prompt_suffix", default="")
    return parser


def paradigm(args):
    return full_sft() if args.lora_rank == 0 else lora_sft(args.lora_rank)


def train_config(args) -> TrainConfig:
    return TrainConfig(learning_rate=args.learning_rate, weight_decay=0.0, max_steps=args.max_steps)


def style_items(output: Path, style: str, prompt_suffix: str, image_size: int) -> list[dict]:
    folder = output / "data" / f"{style}{prompt_suffix.replace(' ', '_')}"
    metadata = folder / "metadata.csv"
    if not metadata.exists():
        write_style_folder(folder, style, prompt_suffix, image_size)
    return load_training_set(metadata, image_size)


def save_trained(model, params, args, name: str = "lora.safetensors") -> Path:
    """The LoRA file, or the whole model folder for full fine-tuning."""
    output = Path(args.output_path)
    if args.lora_rank == 0:
        return save_model(dataclasses.replace(model, params=params), output / "model")
    output.mkdir(parents=True, exist_ok=True)
    save_lora(params["dit"], output / name)
    return output / name


def timed_fit(args, loss, params, items, key):
    chosen, started = paradigm(args), time.perf_counter()
    trained = fit(chosen, loss, params, data_stream(items, args.batch_size, dsf.random.fold_in(key, 0)),
                  train_config(args), key=dsf.random.fold_in(key, 1))
    print(f"{chosen.name}: {args.max_steps} steps in {time.perf_counter() - started:.0f} s")
    return trained


def run_lora(args) -> None:
    model = load_model(args.model)
    size = model.config.image_size
    items = (load_training_set(args.dataset_metadata_path, size) if args.dataset_metadata_path
             else style_items(Path(args.output_path), args.dataset, args.prompt_suffix, size))
    if args.keep_plain:
        items += style_items(Path(args.output_path), "plain", "", size)
    base = model.params if args.preset_lora_path is None else with_preset_lora(model.params, args.preset_lora_path)
    trained = timed_fit(args, digits_loss(model), base, items, dsf.random.key(args.seed))
    print(f"wrote {save_trained(model, trained, args)}")


def run_differential(args) -> None:
    if args.lora_rank == 0:
        raise ValueError("differential LoRA trains two LoRAs: give --lora_rank a positive rank")
    model = load_model(args.model)
    output, size, key = Path(args.output_path), model.config.image_size, dsf.random.key(args.seed)
    lora_1 = timed_fit(args, digits_loss(model), model.params, style_items(output, args.dataset_a, "", size), dsf.random.fold_in(key, 1))
    lora_1_path = save_trained(model, lora_1, args, "lora_1.safetensors")
    base = with_preset_lora(model.params, lora_1_path)
    lora_2 = timed_fit(args, digits_loss(model), base, style_items(output, args.dataset_b, "", size), dsf.random.fold_in(key, 2))
    print(f"wrote {lora_1_path} and {save_trained(model, lora_2, args, 'lora_2.safetensors')} (use LoRA 2 alone)")


def run_distill(args) -> None:
    model = load_model(args.model)
    teacher = teacher_cache(model, args.teacher_steps, args.teacher_cfg_scale)
    digits = [d for d in range(10) for _ in range(args.seeds_per_digit)]
    items = distill_items([prompt_for(d) for d in digits], range(len(digits)), args.num_inference_steps)
    if args.teacher_data is None:
        loss = distill_loss(model, teacher)
    else:
        metadata = Path(args.teacher_data) / "metadata.csv"
        if not metadata.exists():
            write_teacher_folder(metadata.parent, items, teacher)
            print(f"wrote the teacher dataset {metadata}")
        items, loss = load_training_set(metadata, model.config.image_size), distill_loss(model)
    trained = timed_fit(args, loss, model.params, items, dsf.random.key(args.seed))
    print(f"wrote {save_trained(model, trained, args)}")


def run_split(args) -> None:
    model = load_model(args.model)
    cache = Path(args.cache or Path(args.output_path) / "text_cache")
    if args.stage != "train":
        items = style_items(Path(args.output_path), args.dataset, args.prompt_suffix, model.config.image_size)
        print(f"stage 1: wrote {write_cache(cache, encode_text_once(model, items)).parent}")
    if args.stage != "data_process":
        dit_only = {"dit": model.params["dit"]}
        trained = timed_fit(args, split_loss(model), dit_only, load_cached(cache), dsf.random.key(args.seed))
        print(f"stage 2: wrote {save_trained(model, {**model.params, **trained}, args)}")


COMMANDS = {
    "lora": (lora_parser, run_lora),
    "differential": (differential_parser, run_differential),
    "distill": (distill_parser, run_distill),
    "split": (split_parser, run_split),
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: digits_paradigms.py {{{','.join(COMMANDS)}}} --model MODEL_FOLDER [options]; "
                         "add --help after a command for its options")
    make_parser, run = COMMANDS[argv[0]]
    run(make_parser().parse_args(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
