"""DiffSynth-Studio's training flags, shared by the fine-tuning recipes: the argparse groups, the
:class:`dsf.training.train.TrainConfig` they describe (counted in epochs, as DiffSynth counts them), and the
batch stream of a dataset.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> groups = add_training_flags(parser, output_path="outputs/x", lora_targets="to_q", lora_layouts=("diffusers",))
    >>> sorted(groups)
    ['LoRA', 'output', 'training']
    >>> config = train_config(parser.parse_args(["--num_epochs", "2", "--batch_size", "2"]), dataset_size=10)
    >>> config.max_steps, config.save_steps, config.checkpoint_steps
    (10, 5, 5)
    >>> args = parser.parse_args(["--validation_prompts", "a cat", "a dog", "--validation_steps", "2"])
    >>> options = validation_options(args, config, lambda params, prompts: [f"{params}: {p}" for p in prompts])
    >>> options["validate"]("trained"), options["validate_every"]
    (['trained: a cat', 'trained: a dog'], 2)
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from dsf.training.data import batches, collate
from dsf.random import Key
from dsf.training.train import TrainConfig
from dsf.cli.flag_types import finite_float, non_negative_int, positive_int


def add_dataset_flags(parser: argparse.ArgumentParser, columns: str, height: int | None = None, width: int | None = None):
    """Add the ``data`` group (--dataset_base_path, --dataset_metadata_path naming its ``columns``, --dataset_repeat,
    --height, --width) and return it, for a recipe to add its own data flags to.

    >>> parser = argparse.ArgumentParser()
    >>> _ = add_dataset_flags(parser, "image and prompt")
    >>> parser.parse_args(["--dataset_base_path", "data"]).dataset_repeat
    1
    """
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_base_path", required=True, help="the dataset folder (sft:train: the cache folder)")
    data.add_argument("--dataset_metadata_path", help=f"csv, json or jsonl with {columns} columns")
    data.add_argument("--dataset_repeat", type=positive_int, default=1)
    data.add_argument("--height", type=positive_int, default=height)
    data.add_argument("--width", type=positive_int, default=width)
    return data


def add_training_flags(
    parser: argparse.ArgumentParser,
    *,
    output_path: str,
    lora_targets: str,
    lora_layouts: Sequence[str],
    lora_layout: str = "diffusers",
) -> dict[str, argparse._ArgumentGroup]:
    """Add the ``training``, ``LoRA`` and ``output`` flag groups to ``parser`` and return them by name,
    for a recipe to add its own flags to; see the module example."""
    training = parser.add_argument_group("training")
    training.add_argument("--learning_rate", type=finite_float, default=1e-4)
    training.add_argument("--weight_decay", type=finite_float, default=0.01)
    training.add_argument("--num_epochs", type=positive_int, default=1)
    training.add_argument("--max_steps", type=positive_int, help="optimizer steps (default: --num_epochs over the dataset)")
    training.add_argument("--batch_size", type=positive_int, default=1)
    training.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    training.add_argument("--use_gradient_checkpointing", action="store_true")
    training.add_argument("--use_gradient_checkpointing_offload", action="store_true", help="also keep activations on the CPU")
    training.add_argument("--seed", type=non_negative_int, default=0)
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_target_modules", default=lora_targets)
    lora.add_argument("--lora_rank", type=positive_int, default=32)
    lora.add_argument("--lora_alpha", type=finite_float, help="default: the rank (scale 1)")
    lora.add_argument("--lora_checkpoint", help="a LoRA file to continue training")
    lora.add_argument("--lora_layout", default=lora_layout, choices=lora_layouts, help="key layout of the saved LoRA files")
    output = parser.add_argument_group("output")
    output.add_argument("--output_path", default=output_path)
    output.add_argument("--save_steps", type=positive_int, help="default: once per epoch")
    output.add_argument("--checkpoint_steps", type=positive_int, help="resumable state every N steps (default: --save_steps)")
    output.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_path")
    add_validation_flags(output)
    return {"training": training, "LoRA": lora, "output": output}


def add_validation_flags(group, num_inference_steps: int = 20) -> None:
    """Add --validation_prompts, --validation_steps and --validation_num_inference_steps to ``group`` (a parser or
    an argument group); :func:`validation_options` reads them.

    >>> parser = argparse.ArgumentParser()
    >>> add_validation_flags(parser)
    >>> parser.parse_args(["--validation_prompts", "a cat", "a dog"]).validation_prompts
    ['a cat', 'a dog']
    """
    group.add_argument("--validation_prompts", nargs="+", default=[],
                       help="preview images of these prompts while training, in OUTPUT/validation/step-N/ (seeded by --seed)")
    group.add_argument("--validation_steps", type=positive_int, help="previews every N steps (default: --save_steps)")
    group.add_argument("--validation_num_inference_steps", type=positive_int, default=num_inference_steps,
                       help="sampling steps of a preview")


def validation_options(args: argparse.Namespace, config: TrainConfig,
                       generate: Callable[[Any, list[str]], list]) -> dict[str, Any]:
    """The ``validate=``/``validate_every=`` options of :func:`dsf.training.train.train` for --validation_prompts:
    ``generate(params, prompts)`` (PIL images, seeded alike at every call) every --validation_steps steps
    (default: the config's ``save_steps``); none without prompts. See the module example."""
    if not args.validation_prompts:
        if args.validation_steps is not None:
            raise ValueError("--validation_steps says how often to preview --validation_prompts; pass the prompts too")
        return {}
    prompts = list(args.validation_prompts)
    return {"validate": lambda params: generate(params, prompts),
            "validate_every": args.validation_steps or config.save_steps or config.max_steps}


def train_config(args: argparse.Namespace, dataset_size: int, processes: int = 1) -> TrainConfig:
    """The :class:`TrainConfig` of the parsed flags: an epoch is ``dataset_size`` items over
    ``processes`` processes, each taking ``--batch_size`` × ``--gradient_accumulation_steps`` per step;
    ``--max_steps`` defaults to ``--num_epochs`` epochs, ``--save_steps`` to one epoch, and
    ``--checkpoint_steps`` to ``--save_steps``; ``--batch_size`` is a run setting a resumed run must share; see the
    module example."""
    steps_per_epoch = max(1, dataset_size // (args.batch_size * args.gradient_accumulation_steps * processes))
    save_steps = steps_per_epoch if args.save_steps is None else args.save_steps
    return TrainConfig(
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        max_steps=args.num_epochs * steps_per_epoch if args.max_steps is None else args.max_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        output_path=args.output_path,
        save_steps=save_steps,
        checkpoint_steps=save_steps if args.checkpoint_steps is None else args.checkpoint_steps,
        resume=args.resume,
        run_settings={"batch_size": args.batch_size},
    )


def batch_stream(dataset, batch_size: int, key: Key, encode: Callable | None = None) -> Callable:
    """``data(start)`` for :func:`dsf.training.train.train`: shuffled batches of ``dataset`` from position
    ``start``, each item through ``encode`` (the gradient-free steps, run as items are drawn) when given.

    >>> import torch, dsf
    >>> items = [{"x": torch.tensor(float(i))} for i in range(4)]
    >>> data = batch_stream(items, 2, dsf.random.key(0), encode=lambda item: {"x": 10 * item["x"]})
    >>> position, batch = next(data(0))
    >>> position, batch["x"].tolist()
    (2, [10.0, 30.0])
    """
    def encoded_batch(items):
        return collate([encode(item) for item in items])

    def data(start: int):
        return batches(dataset, batch_size, key, start=start, collate_fn=collate if encode is None else encoded_batch)

    return data
