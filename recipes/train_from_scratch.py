"""Train a small text-to-image DiT from scratch on scikit-learn's handwritten digits, then sample it.

    python recipes/train_from_scratch.py                      # train, save, write a sample grid
    python recipes/train_from_scratch.py sample --model outputs/digits/model \\
        --prompt "a handwritten digit seven" --num 4 --seed 0 --out outputs/sevens

Training writes under --output_path: the dataset folder (``data/``: PNG files and metadata.csv),
``log.csv``, resumable checkpoints (``checkpoints/``), the finished model (``model/``) and
``samples.png`` (a row per digit). ``--resume`` continues a killed run from its last checkpoint.
``--validation_prompts "a handwritten digit seven" ...`` adds previews while training, every
``--validation_steps`` steps (default: --checkpoint_steps): ``validation/step-N/<index>.png``, at
--seed and --cfg_scale.

    torchrun --nproc_per_node 4 recipes/train_from_scratch.py --shard   # 4 processes, DiT sharded

Under torchrun each process trains on its share of the batches (the digits model runs on CPUs, over
gloo); ``--shard`` splits the DiT's parameters and optimizer state over the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from PIL import Image

import dsf
from dsf.training import distributed
from dsf.models.digits import DigitsConfig, generate, load_model, new_model, prompt_for, save_model
from dsf.models.digits.paradigms import from_scratch
from dsf.training.paradigm import fit
from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
from dsf.cli.train_sample import run_command, sample_parser, save_numbered
from dsf.cli.training_flags import add_validation_flags, validation_options
from dsf.training.train import TrainConfig
from dsf.transforms import checkpoint
from dsf.transforms.shard import shard, unshard
from dsf.cli.flag_types import finite_float, non_negative_int, positive_int


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the digits model from scratch.")
    parser.add_argument("--output_path", default="outputs/digits")
    parser.add_argument("--image_size", type=int, default=16, choices=(16, 32))
    parser.add_argument("--max_steps", type=positive_int, default=1500)
    parser.add_argument("--batch_size", type=positive_int, default=128)
    parser.add_argument("--learning_rate", type=finite_float, default=1e-3)
    parser.add_argument("--warmup_steps", type=non_negative_int, default=100)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--checkpoint_steps", type=positive_int, default=500)
    parser.add_argument("--save_steps", type=positive_int, default=None)
    parser.add_argument("--use_gradient_checkpointing", action="store_true")
    parser.add_argument("--shard", action="store_true", help="under torchrun: split the DiT's parameters over the processes")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--samples_per_digit", type=positive_int, default=8)
    parser.add_argument("--cfg_scale", type=finite_float, default=3.0)
    parser.add_argument("--num_inference_steps", type=positive_int, default=20)
    parser.add_argument("--dim", type=positive_int, default=DigitsConfig.dim, help="DiT width (smaller trains faster)")
    parser.add_argument("--depth", type=positive_int, default=DigitsConfig.depth, help="number of DiT blocks")
    add_validation_flags(parser)
    return parser


def sample_grid(model, samples_per_digit: int, seed: int, cfg_scale: float, steps: int) -> Image.Image:
    """One row per digit 0–9, ``samples_per_digit`` columns with a 1-pixel gap, upscaled ×4 for viewing."""
    prompts = [prompt_for(d) for d in range(10) for _ in range(samples_per_digit)]
    images = generate(model, prompts, seed=seed, cfg_scale=cfg_scale, num_inference_steps=steps)
    cell = model.config.image_size + 1
    grid = Image.new("RGB", (cell * samples_per_digit - 1, cell * 10 - 1), (96, 96, 96))
    for i, image in enumerate(images):
        grid.paste(image, ((i % samples_per_digit) * cell, (i // samples_per_digit) * cell))
    return grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)


def run_training(args) -> Path:
    world = distributed.init(backend="gloo")
    output = Path(args.output_path)
    metadata = output / "data" / "metadata.csv"
    if world.rank == 0 and not metadata.exists():
        write_digits_folder(metadata.parent, image_size=args.image_size)
    distributed.barrier()
    items = load_training_set(metadata, args.image_size)

    key = dsf.random.key(args.seed)
    model_key, data_key, train_key = dsf.random.split(key, 3)
    config = DigitsConfig(image_size=args.image_size, dim=args.dim, depth=args.depth)
    model = new_model(config, model_key)

    paradigm = from_scratch(
        *([checkpoint()] if args.use_gradient_checkpointing else []),
        *([shard(where=r"^dit/")] if args.shard else []),
    )
    train_config = TrainConfig(
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        output_path=str(output),
        save_steps=args.save_steps,
        checkpoint_steps=args.checkpoint_steps,
        resume=args.resume,
        run_settings={"batch_size": args.batch_size},
    )
    def preview(params, prompts):
        return generate(dataclasses.replace(model, params=params), prompts, seed=args.seed, cfg_scale=args.cfg_scale,
                        num_inference_steps=args.validation_num_inference_steps, progress=False)

    previews = validation_options(args, dataclasses.replace(train_config, save_steps=args.checkpoint_steps),
                                  paradigm.transforms(preview))
    started = time.perf_counter()
    params = fit(paradigm, digits_loss(model), model.params, data_stream(items, args.batch_size, data_key), train_config,
                 key=train_key, **previews)
    trained = dataclasses.replace(model, params=unshard(params))
    if world.rank != 0:
        return output / "model"
    print(f"trained to step {args.max_steps} ({time.perf_counter() - started:.0f} s in this run)")

    model_folder = save_model(trained, output / "model")
    grid = sample_grid(trained, args.samples_per_digit, args.seed, args.cfg_scale, args.num_inference_steps)
    grid.save(output / "samples.png")
    print(f"model: {model_folder}\nsample grid: {output / 'samples.png'}")
    return model_folder


def run_sampling(argv: list[str]) -> None:
    args = sample_parser("Sample a trained digits model.", "a handwritten digit seven", cfg_scale=3.0).parse_args(argv)
    model = load_model(args.model)
    save_numbered(generate(model, [args.prompt] * args.num, seed=args.seed, cfg_scale=args.cfg_scale,
                           num_inference_steps=args.num_inference_steps), args.out)


def main(argv: list[str]) -> None:
    run_command(argv, train=lambda rest: run_training(train_parser().parse_args(rest)), sample=run_sampling)


if __name__ == "__main__":
    main(sys.argv[1:])
