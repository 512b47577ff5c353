"""Does a LoRA keep Z-Image-Turbo's 8-step sampling? A measurement on a tiny model (CPU, a minute or two).

Z-Image-Turbo is the base model step-distilled to 8 steps; users report that a plain LoRA trained on Turbo
breaks 8-step sampling. This builds the situation in miniature and measures it:

1. a *teacher* (the base model): a tiny random Z-Image DiT sampled in 50 steps;
2. a *Turbo* student: the teacher distilled so that its 8-step samples match the teacher's 50-step samples
   from the same noise (gradients through the sampler);
3. a LoRA fine-tune (flow matching on a few target latents under their prompts), trained two ways:
   * **plain**: on Turbo;
   * **base**: on the teacher, then applied to Turbo (equivalently, a differential LoRA whose preset adapter
     turns Turbo back into the base exactly).

The gap of a model pair is the mean squared difference between Turbo's 8-step samples and the teacher's
50-step samples from held-out noises, both with the same LoRA applied (or neither). A LoRA that keeps the
distillation leaves the gap where it was without the LoRA.

    python bench/z_image_turbo_lora.py [--distill_steps 200] [--lora_steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import zlib
from pathlib import Path

import torch

import dsf
from dsf.diffusion.losses import flow_matching_loss
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import ZIMAGE
from dsf.models import z_image
from dsf.models.z_image.pipeline import TURBO_SCHEDULER_CONFIG, pipeline_schedule
from dsf.models.z_image.training import LORA_TARGETS
from dsf.training.optim import adamw
from dsf.transforms import load_lora, lora, lora_trainable, save_lora

CONFIG = z_image.ZImageConfig(hidden_size=64, num_heads=2, num_layers=3, num_refiner_layers=1, cap_feat_dim=16,
                              axes_dims=(8, 12, 12))
LATENT, TEXT_LEN, PROMPTS = 4, 8, 4  # latents 16×4×4, caption states 8×16, prompts in the fine-tune set
TEACHER_STEPS, TURBO_STEPS = 50, 8
SCHEDULE = pipeline_schedule(TURBO_SCHEDULER_CONFIG)


def teacher_params(key) -> dict:
    """A tiny random DiT whose velocity field is far from zero: weights N(0, 1/fan_in), norm scales about 1."""

    def scaled(path, x):
        noise = dsf.random.normal(dsf.random.fold_in(key, zlib.crc32(path.encode())), tuple(x.shape))
        if x.ndim == 2:
            return noise / x.shape[-1] ** 0.5
        return 1 + 0.2 * noise if path.endswith("weight") else 0.2 * noise

    return dsf.tree.map_with_path(scaled, z_image.init_dit(CONFIG, key))


def samples(params, noise, cond, steps: int) -> torch.Tensor:
    """Samples of ``steps`` Euler steps on the Z-Image grid (differentiable in ``params``)."""
    def velocity(p, x, sigma, text_embeds, text_mask):
        return z_image.apply(p, x, sigma, text_embeds, text_mask, config=CONFIG)

    return sample(velocity, params, noise, SCHEDULE.sigmas(steps), cond, progress=False)


def trained(loss_fn, params, where, steps: int, learning_rate: float) -> dict:
    """``params`` after ``steps`` AdamW updates of the leaves ``where`` selects, minimizing ``loss_fn(params, step)``."""
    optimizer = adamw(learning_rate, weight_decay=0.0)
    trainable = dsf.tree.select(params, where)
    state = optimizer.init(trainable)
    loss_and_grads = dsf.value_and_grad(loss_fn, where=where)
    for step in range(steps):
        _, grads = loss_and_grads(params, step)
        trainable, state = optimizer.update(dsf.tree.select(grads, where), state, trainable)
        params = dsf.tree.map_with_path(lambda path, x: trainable.get(path, x), params)
    return params


def gap(turbo, teacher, noise, cond) -> float:
    with torch.no_grad():
        return float((samples(turbo, noise, cond, TURBO_STEPS) - samples(teacher, noise, cond, TEACHER_STEPS)).square().mean())


def with_lora_of(adapted, base, folder: Path, name: str) -> dict:
    """``base`` with the LoRA trained in ``adapted``, through a LoRA file (as a user applies it)."""
    path = folder / f"{name}.safetensors"
    save_lora(adapted, path, "diffusers")
    return load_lora(base, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill_steps", type=int, default=200)
    parser.add_argument("--distill_lr", type=float, default=3e-4)
    parser.add_argument("--lora_steps", type=int, default=150)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = dsf.random.split(dsf.random.key(args.seed), 8)

    normal = dsf.random.normal

    def conditions(key, batch):
        return {"text_embeds": normal(key, (batch, TEXT_LEN, CONFIG.cap_feat_dim)),
                "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool)}

    teacher = teacher_params(keys[0])
    train_noise, eval_noise = normal(keys[1], (16, 16, LATENT, LATENT)), normal(keys[2], (16, 16, LATENT, LATENT))
    train_cond, eval_cond = conditions(keys[3], 16), conditions(keys[4], 16)

    # 1-2. Turbo: the teacher distilled to 8 steps.
    with torch.no_grad():
        targets = samples(teacher, train_noise, train_cond, TEACHER_STEPS)
    distill = lambda p, step: (samples(p, train_noise, train_cond, TURBO_STEPS) - targets).square().mean()
    undistilled = gap(teacher, teacher, eval_noise, eval_cond)
    turbo = trained(distill, teacher, None, args.distill_steps, args.distill_lr)
    turbo_gap = gap(turbo, teacher, eval_noise, eval_cond)
    train_gaps = gap(teacher, teacher, train_noise, train_cond), gap(turbo, teacher, train_noise, train_cond)

    # 3. The fine-tune set: a few target latents under their own prompts, and the held-out noises under those prompts.
    data_cond = conditions(keys[5], PROMPTS)
    latents = normal(keys[6], (PROMPTS, 16, LATENT, LATENT)).cumsum(-1) / 2  # smooth-ish targets
    fine_tune_cond = {k: v.repeat(4, *([1] * (v.ndim - 1))) for k, v in data_cond.items()}

    def sft(p, step):
        return flow_matching_loss(lambda q, x, s, **c: z_image.apply(q, x, s, **c, config=CONFIG), p, latents,
                                  dsf.random.fold_in(keys[7], step), data_cond, schedule=ZIMAGE)

    adapter = lora(args.lora_rank, targets=LORA_TARGETS)
    rows = [("no LoRA", turbo_gap, undistilled, gap(turbo, teacher, eval_noise, fine_tune_cond))]
    with tempfile.TemporaryDirectory() as folder:
        for name, trained_on in (("plain (trained on Turbo)", turbo), ("base (trained on the teacher)", teacher)):
            adapted = trained(sft, adapter.init(trained_on, keys[7]), lora_trainable, args.lora_steps, 1e-2)
            turbo_lora, teacher_lora = with_lora_of(adapted, turbo, Path(folder), "t"), with_lora_of(adapted, teacher, Path(folder), "b")
            rows.append((name, gap(turbo_lora, teacher_lora, eval_noise, eval_cond), gap(teacher_lora, teacher_lora, eval_noise, eval_cond),
                         gap(turbo_lora, teacher_lora, eval_noise, fine_tune_cond)))

    print(f"tiny Z-Image DiT ({dsf.tree.num_params(teacher):,} parameters), latents 16×{LATENT}×{LATENT}; distilled "
          f"{args.distill_steps} steps (lr {args.distill_lr}), LoRA rank {args.lora_rank}, {args.lora_steps} steps")
    print(f"the teacher's own 8-step samples against its 50-step samples: MSE {undistilled:.5f} on held-out noises; on the "
          f"distillation set {train_gaps[0]:.5f}, and Turbo's {train_gaps[1]:.5f} after distilling")
    print("MSE of Turbo's 8-step samples against the teacher's 50-step samples, both with the LoRA; 'kept' = that MSE over the "
          "undistilled teacher's own 8-step MSE with the LoRA (Turbo's advantage kept: well below 1; lost: about 1 or more)")
    print(f"{'LoRA':32} {'MSE, held-out prompts':>22} {'kept':>7} {'MSE, its prompts':>17}")
    for name, distilled, undistilled_gap, own in rows:
        print(f"{name:32} {distilled:22.5f} {distilled / undistilled_gap:7.3f} {own:17.5f}")


if __name__ == "__main__":
    main()
