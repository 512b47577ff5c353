"""The training paradigms on the digits model, each a transform stack over the loss and the sampler.

A :class:`dsf.training.paradigm.Paradigm` is data: the transform stack that wraps the loss and the
leaves it trains; :func:`dsf.training.paradigm.fit` initializes the stack on the params and trains
``stack(loss)``. The paradigms differ only in the stack, the loss and the params they start from:

- training from scratch, full fine-tuning: :func:`from_scratch`, :func:`full_sft` (the DiT's leaves);
- LoRA fine-tuning: :func:`lora_sft` (the LoRA factors only);
- differential LoRA: :func:`with_preset_lora` folds LoRA 1 into the base, then :func:`lora_sft`
  trains LoRA 2, which alone is used at inference;
- direct distillation: :func:`distill_loss` differentiates through the few-step sampler towards the
  teacher's many-step guided images, from a dataset (:func:`write_teacher_folder`) or a
  :class:`dsf.diffusion.distill.TeacherCache` filled on the fly (:func:`teacher_cache`);
- two-stage split training: :func:`encode_text_once` runs the text encoder once (stage 1, stored
  with :func:`dsf.training.cache.write_cache`), :func:`split_loss` trains from its output without the text
  encoder (stage 2);
- preference optimization: :func:`dpo_loss` (Diffusion-DPO against a frozen reference, e.g. the base
  model) on :func:`preference_pairs`, under any stack such as :func:`lora_sft`, trained with ``has_aux=True``.

:func:`write_style_folder` writes the digits restyled (inverted colors, thick strokes) as dataset
folders for the LoRA paradigms.

Example:
    >>> import torch, dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> from dsf.models.digits.training import digits_loss
    >>> from dsf.training.paradigm import fit
    >>> from dsf.training.train import TrainConfig
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "prompt": ["a handwritten digit one"] * 4}
    >>> def data(position):
    ...     while True:
    ...         yield position + 1, batch
    >>> config = TrainConfig(learning_rate=1e-2, max_steps=2, progress=False)
    >>> params = fit(lora_sft(rank=2), digits_loss(model), model.params, data, config, key=dsf.random.key(1))
    >>> sorted(dsf.tree.select(params, lora_trainable))[0]
    'dit/blocks/0/mlp_down/weight/adapt/adapters/lora/down'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import dsf
from dsf.training.cache import CachedDataset
from dsf.training.data import write_image_folder
from dsf.diffusion.distill import TeacherCache, direct_distill_loss
from dsf.files.io import Source
from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.preference import diffusion_dpo_loss
from dsf.models.digits.config import DigitsConfig
from dsf.models.digits.pipeline import SCHEDULE, DigitsModel
from dsf.models.digits.text import prompt_for
from dsf.models.digits.training import digit_images
from dsf.diffusion.sampling import sample
from dsf.training.paradigm import Paradigm
from dsf.transform import Transform, chain
from dsf.transforms import checkpoint, load_lora, lora, lora_trainable, merge_lora

LORA_TARGETS = "qkv,out,mlp_up,mlp_down,modulation,proj_out"  # attention, MLP and adaLN of each block, and the output


# ----------------------------------------------------------------------------- paradigms as data


def from_scratch(*transforms: Transform) -> Paradigm:
    """Every DiT leaf of a fresh model, under ``chain(*transforms)`` (none, or e.g. ``checkpoint()``, ``shard()``).

    >>> from_scratch(checkpoint()).transforms.name
    'chain(checkpoint(offload_activations=False))'
    """
    return Paradigm("from scratch", chain(*transforms), r"^dit/")


def full_sft() -> Paradigm:
    """Full fine-tuning: every DiT leaf, blocks recomputed in backward: ``chain(checkpoint())``.

    >>> full_sft().transforms.name
    'chain(checkpoint(offload_activations=False))'
    """
    return Paradigm("full fine-tuning", chain(checkpoint()), r"^dit/")


def lora_sft(rank: int = 4, targets: str | None = LORA_TARGETS) -> Paradigm:
    """LoRA fine-tuning: new factors of ``rank`` on the DiT's ``targets`` (``None``: every linear
    weight), the only leaves trained: ``chain(lora(rank, targets=...), checkpoint())``.

    >>> lora_sft(rank=8).where == lora_trainable
    True
    """
    return Paradigm(f"LoRA rank {rank}", chain(lora(rank, where=r"^dit/", targets=targets), checkpoint()), lora_trainable)


def with_preset_lora(params, source: Source, scale: float = 1.0):
    """``params`` with the LoRA ``source`` folded into the DiT for good: differential LoRA's base.

    >>> import torch
    >>> params = {"dit": {"q": {"weight": torch.zeros(2, 2)}}}
    >>> lora_file = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.ones(2, 1)}
    >>> with_preset_lora(params, lora_file)["dit"]["q"]["weight"].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return {**params, "dit": merge_lora(load_lora(params["dit"], source, scale))}


def with_merged_lora(model: DigitsModel, params=None) -> DigitsModel:
    """``model`` with the LoRAs of ``params`` (default: its own) folded into its DiT, for fast sampling.

    >>> import dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> adapted = lora_sft(rank=2).transforms.init(model.params, dsf.random.key(1))
    >>> type(with_merged_lora(model, adapted).params["dit"]["blocks"][0]["qkv"]["weight"]).__name__
    'Tensor'
    """
    params = model.params if params is None else params
    return dataclasses.replace(model, params={**params, "dit": merge_lora(params["dit"])})


# ----------------------------------------------------------------------------- styled datasets


def inverted(image: np.ndarray) -> np.ndarray:
    """Dark strokes on a light background.

    >>> inverted(np.array([[0, 255]], np.uint8)).tolist()
    [[255, 0]]
    """
    return 255 - image


def thickened(image: np.ndarray) -> np.ndarray:
    """Strokes dilated by one pixel on every side (a 3×3 maximum filter).

    >>> int(thickened(np.pad(np.full((1, 1), 255, np.uint8), 2)).astype(bool).sum())
    9
    """
    return np.asarray(Image.fromarray(image).filter(ImageFilter.MaxFilter(3)))


STYLES = {"plain": lambda image: image, "inverted": inverted, "thick": thickened}


def write_style_folder(folder: str | os.PathLike, style: str, prompt_suffix: str = "", image_size: int = 16,
                       limit: int | None = None) -> Path:
    """The digits changed by ``STYLES[style]`` as a dataset folder (PNG files, ``metadata.csv`` with
    prompt and label), each prompt followed by ``prompt_suffix``; returns the csv path.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_style_folder(folder, "thick", " thick strokes", limit=1).read_text().splitlines()[1]
    'images/00000.png,a handwritten digit zero thick strokes,0'
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    images, labels = digit_images(image_size)
    images, labels = images[:limit], labels[:limit]
    rows = [{"prompt": prompt_for(int(label)) + prompt_suffix, "label": int(label)} for label in labels]
    return write_image_folder(folder, [STYLES[style](image) for image in images], rows)


# ----------------------------------------------------------------------------- direct distillation


def seeded_noise(config: DigitsConfig, seeds: Sequence[int]) -> torch.Tensor:
    """One noise image per seed: the noise :func:`generate_tensors` starts ``[prompt]`` from with that seed.

    >>> from dsf.models.digits import DigitsConfig
    >>> noise = seeded_noise(DigitsConfig(), [0, 1, 0])
    >>> noise.shape, torch.equal(noise[0], noise[2]), torch.equal(noise[0], noise[1])
    (torch.Size([3, 3, 16, 16]), True, False)
    """
    shape = (config.channels, config.image_size, config.image_size)
    return torch.stack([dsf.random.normal(dsf.random.fold_in(dsf.random.key(int(seed)), 0), shape) for seed in seeds])


@torch.no_grad()
def seeded_images(model: DigitsModel, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int,
                  cfg_scale: float, params=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], image ``i`` from ``prompts[i]`` and the noise of ``seeds[i]``;
    ``params`` default to the model's.

    >>> import dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> seeded_images(model, ["a handwritten digit two"] * 2, [0, 1], 2, 3.0).shape
    torch.Size([2, 3, 16, 16])
    """
    params = model.params if params is None else params
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    cond = {"text_embeds": model.text_embeds(params, prompts)}
    negative = {"text_embeds": model.text_embeds(params, [""] * len(prompts))}
    images = sample(model.velocity, params, seeded_noise(model.config, seeds), SCHEDULE.sigmas(num_inference_steps), cond,
                    negative_cond=negative, cfg_scale=cfg_scale, progress=False)
    return images.clamp(-1, 1)


def distill_items(prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 4, cfg_scale: float = 1.0) -> list[dict]:
    """Rows of a distillation set: prompt, seed and the student's num_inference_steps and cfg_scale.

    >>> distill_items(["a digit one"], [5])
    [{'prompt': 'a digit one', 'seed': 5, 'num_inference_steps': 4, 'cfg_scale': 1.0}]
    """
    return [{"prompt": p, "seed": int(s), "num_inference_steps": num_inference_steps, "cfg_scale": cfg_scale}
            for p, s in zip(prompts, seeds, strict=True)]


def teacher_cache(model: DigitsModel, num_inference_steps: int = 50, cfg_scale: float = 3.0) -> TeacherCache:
    """The teacher's images keyed by ``(prompt, seed)``, generated on first use with the model's
    current params (captured now) and kept in memory.

    >>> import dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> teacher = teacher_cache(model, num_inference_steps=2)
    >>> teacher([("a handwritten digit one", 0)] * 2).shape, teacher.computed
    (torch.Size([2, 3, 16, 16]), 1)
    """
    params = model.params

    def compute(keys):
        prompts, seeds = zip(*keys)
        return seeded_images(model, prompts, seeds, num_inference_steps, cfg_scale, params)

    return TeacherCache(compute)


def write_teacher_folder(folder: str | os.PathLike, items: Sequence[dict], teacher: TeacherCache) -> Path:
    """A distillation dataset folder: the teacher's image of each item (PNG) and the item's columns; returns the csv path.

    >>> import tempfile, dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     csv = write_teacher_folder(folder, distill_items(["a digit one"], [3]), teacher_cache(model, 2))
    ...     csv.read_text().splitlines()
    ['image,prompt,seed,num_inference_steps,cfg_scale', 'images/00000.png,a digit one,3,4,1.0']
    """
    images = teacher([(item["prompt"], int(item["seed"])) for item in items])
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return write_image_folder(folder, list(pixels), items)


def distill_loss(model: DigitsModel, teacher: TeacherCache | None = None):
    """``loss(params, batch, key)``: :func:`dsf.diffusion.distill.direct_distill_loss` of the student on the batch.

    Batches hold the columns ``prompt``, ``seed``, ``num_inference_steps`` and ``cfg_scale`` (the
    student's, one value per batch; as numbers or as csv strings) and, without ``teacher``, the
    teacher's ``image``; with ``teacher`` the targets come from it by ``(prompt, seed)``.

    >>> import dsf
    >>> from dsf.training.data import collate
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> batch = collate(distill_items(["a handwritten digit one"], [0], num_inference_steps=2))
    >>> distill_loss(model, teacher_cache(model, 2))(model.params, batch, dsf.random.key(0)).shape
    torch.Size([])
    """

    def loss(params, batch, key):
        prompts, seeds = list(batch["prompt"]), [int(s) for s in batch["seed"]]
        steps, cfg_scale = int(_one_value(batch, "num_inference_steps")), float(_one_value(batch, "cfg_scale"))
        target = batch["image"] if teacher is None else teacher(list(zip(prompts, seeds)))
        cond = {"text_embeds": model.text_embeds(params, prompts)}
        negative = None if cfg_scale == 1.0 else {"text_embeds": model.text_embeds(params, [""] * len(prompts))}
        return direct_distill_loss(model.velocity, params, seeded_noise(model.config, seeds), SCHEDULE.sigmas(steps),
                                   target, cond, negative_cond=negative, cfg_scale=cfg_scale)

    return loss


def _one_value(batch: dict, column: str):
    if column not in batch:
        raise ValueError(f"a distillation batch needs the column {column!r}; it has {sorted(batch)}")
    values = set(map(str, batch[column]))
    if len(values) != 1:
        raise ValueError(f"column {column!r} holds several values {sorted(values)} in one batch; the student runs one schedule per batch")
    return batch[column][0]


# ----------------------------------------------------------------------------- two-stage split training


@torch.no_grad()
def encode_text_once(model: DigitsModel, items: Sequence[dict], batch_size: int = 512) -> list[dict]:
    """Stage 1 of split training: each item's ``image`` with the text states of its prompt
    (``text_embeds``) and of the empty prompt (``empty_text_embeds``, for prompt dropout).

    >>> import torch, dsf
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> cached = encode_text_once(model, [{"image": torch.zeros(3, 16, 16), "prompt": "a digit one"}])
    >>> sorted(cached[0]), tuple(cached[0]["text_embeds"].shape)
    (['empty_text_embeds', 'image', 'text_embeds'], (6, 8))
    """
    empty = model.text_embeds(model.params, [""])[0]
    cached = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        states = model.text_embeds(model.params, [item["prompt"] for item in chunk])
        cached += [{"image": item["image"], "text_embeds": s.clone(), "empty_text_embeds": empty.clone()}  # own storage, as safetensors needs
                   for item, s in zip(chunk, states)]
    return cached


def load_cached(folder: str | os.PathLike) -> list[dict]:
    """Every sample of a :mod:`dsf.training.cache` folder (e.g. :func:`encode_text_once`'s output written by
    :func:`dsf.training.cache.write_cache`), read once into memory.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dsf.training.cache import write_cache
    >>> folder = Path(tempfile.mkdtemp()) / "cache"
    >>> load_cached(write_cache(folder, [{"text_embeds": torch.ones(6, 8)}]).parent)[0]["text_embeds"].shape
    torch.Size([6, 8])
    """
    dataset = CachedDataset(folder)
    return [dataset[i] for i in range(len(dataset))]


def split_loss(model: DigitsModel, prompt_dropout: float = 0.1):
    """``loss(params, batch, key)``: stage 2 of split training, the loss of
    :func:`dsf.models.digits.training.digits_loss` on cached text states; ``params`` need only ``"dit"``.

    The same key drops the same prompts and draws the same noise as ``digits_loss``, so both give
    the same loss and gradients.

    >>> import torch, dsf
    >>> from dsf.training.data import collate
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> batch = collate(encode_text_once(model, [{"image": torch.zeros(3, 16, 16), "prompt": "a digit one"}]))
    >>> split_loss(model)({"dit": model.params["dit"]}, batch, dsf.random.key(1)).shape
    torch.Size([])
    """

    def loss(params, batch, key):
        drop_key, loss_key = dsf.random.split(key)
        dropped = dsf.random.uniform(drop_key, (len(batch["image"]),)) < prompt_dropout
        text = torch.where(dropped[:, None, None], batch["empty_text_embeds"], batch["text_embeds"])
        return flow_matching_loss(model.velocity, params, batch["image"], loss_key, {"text_embeds": text}, schedule=SCHEDULE)

    return loss


# ----------------------------------------------------------------------------- preference optimization (Diffusion-DPO)


def preference_pairs(preferred: Sequence[dict], rejected: Sequence[dict]) -> list[dict]:
    """Items ``{"preferred", "rejected", "prompt"}`` from two item lists of the same prompts, pair by pair
    (e.g. the thick and the plain digits of :func:`write_style_folder`).

    >>> import torch
    >>> pairs = preference_pairs([{"image": torch.ones(1), "prompt": "a digit one"}],
    ...                          [{"image": torch.zeros(1), "prompt": "a digit one"}])
    >>> sorted(pairs[0]), pairs[0]["preferred"].tolist()
    (['preferred', 'prompt', 'rejected'], [1.0])
    """
    if len(preferred) != len(rejected):
        raise ValueError(f"got {len(preferred)} preferred but {len(rejected)} rejected items; give one of each per pair")
    pairs = []
    for index, (better, worse) in enumerate(zip(preferred, rejected)):
        if better["prompt"] != worse["prompt"]:
            raise ValueError(f"pair {index} has two prompts, {better['prompt']!r} and {worse['prompt']!r}; "
                             "a preference compares two samples of one prompt")
        pairs.append({"preferred": better["image"], "rejected": worse["image"], "prompt": better["prompt"]})
    return pairs


def dpo_loss(model: DigitsModel, reference_params, beta: float = 1000.0):
    """``loss(params, batch, key) -> (loss, metrics)``: :func:`dsf.diffusion.preference.diffusion_dpo_loss`
    of the model at ``params`` against ``reference_params`` (frozen, e.g. ``model.params``) on batches of
    :func:`preference_pairs`; the metrics (reward margin, preference accuracy) are logged with ``has_aux=True``.

    >>> import torch, dsf
    >>> from dsf.training.data import collate
    >>> from dsf.models.digits import DigitsConfig, new_model
    >>> model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    >>> batch = collate(preference_pairs([{"image": torch.ones(3, 16, 16), "prompt": "a digit one"}],
    ...                                  [{"image": -torch.ones(3, 16, 16), "prompt": "a digit one"}]))
    >>> loss, metrics = dpo_loss(model, model.params)(model.params, batch, dsf.random.key(1))
    >>> round(loss.item(), 4), metrics["reward_margin"].item()  # the policy is still the reference
    (0.6931, 0.0)
    """

    def loss(params, batch, key):
        prompts = list(batch["prompt"])
        cond = {"text_embeds": model.text_embeds(params, prompts)}
        with torch.no_grad():
            reference_cond = {"text_embeds": model.text_embeds(reference_params, prompts)}
        return diffusion_dpo_loss(model.velocity, params, reference_params, batch["preferred"], batch["rejected"], key,
                                  cond, beta=beta, reference_cond=reference_cond, schedule=SCHEDULE)

    return loss
