"""``kill -9`` during training, again and again: does ``resume`` give the run an uninterrupted one gives?

Two workloads, each trained once uninterrupted (the reference) and once in a child process killed with SIGKILL
``--kills`` times in all (split between them), each time resumed from the checkpoints it left:

- digits: the digits DiT trained from scratch (a small config), then its model folder written;
- flux_lora: a rank-4 LoRA on a tiny random FLUX.1 DiT, its step files saved in the diffusers LoRA layout.

Every other kill is aimed at a checkpoint or step-file write: the child is killed the moment orbax's staging folder
(``<step>.orbax-checkpoint-tmp-*``) or a temporary step file (``.step-N.safetensors.*.tmp``) appears; the others
come after a random step. After the kills, the newest checkpoint of the digits run is damaged on purpose
(its largest array file truncated), and the last resume must fall back to the checkpoint before it.

Printed: kills done, resumes identical (runs whose log rows, step files and model equal the reference byte for
byte), checkpoints lost (moved aside as damaged, beyond the one damaged on purpose), leftovers (temporary files
and staging folders, and checkpoints beyond keep_last, still there at the end).

    python bench/crash_resume.py                # 20 kills
    python bench/crash_resume.py --kills 3
"""

from __future__ import annotations

import argparse
import csv
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

CHECKPOINT_EVERY, KEEP_LAST = 2, 2
STAGING = re.compile(r"(\d+\.orbax-checkpoint-tmp(-\d+)?|\.step-\d+\.safetensors\.\w{8}\.tmp)$")


def train_workload(workload: str, output: Path, max_steps: int, report=None) -> None:
    """Train ``workload`` into ``output`` up to ``max_steps``, resuming from its checkpoints; ``report(line)`` hears
    ``start N`` and then ``step N`` after each step (its saves done)."""
    import dsf
    from dsf.training.train import TrainConfig

    torch.set_num_threads(1)
    report = report or (lambda line: None)
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.0, max_steps=max_steps, output_path=str(output),
                         save_steps=CHECKPOINT_EVERY, checkpoint_steps=CHECKPOINT_EVERY, keep_last=KEEP_LAST,
                         resume=True, progress=False, run_settings={"workload": workload})
    checkpoints = output / "checkpoints"
    from dsf.training import checkpoint

    report(f"start {checkpoint.latest_step(checkpoints) or 0}")
    callback = lambda step, params, loss: report(f"step {step}")  # noqa: E731
    (_train_digits if workload == "digits" else _train_flux_lora)(output, config, callback, dsf)


def _train_digits(output: Path, config, callback, dsf) -> None:
    from dsf.models.digits import DigitsConfig, new_model, save_model
    from dsf.models.digits.paradigms import from_scratch
    from dsf.models.digits.training import data_stream, digits_loss, load_training_set, write_digits_folder
    from dsf.training.train import train

    metadata = output / "data" / "metadata.csv"
    if not metadata.exists():
        write_digits_folder(metadata.parent, image_size=16, limit=32)
    items = load_training_set(metadata, 16)
    model = new_model(DigitsConfig(dim=32, depth=1, heads=2, text_dim=8, text_layers=1), dsf.random.key(0))
    paradigm = from_scratch()
    params = paradigm.transforms.init(model.params, dsf.random.key(1))
    trained = train(paradigm.transforms(digits_loss(model)), params, data_stream(items, 8, dsf.random.key(2)), config,
                    where=paradigm.where, key=dsf.random.key(3), callback=callback)
    save_model(type(model)(model.config, trained, model.encode_text, model.tokenizer), output / "model")


def _train_flux_lora(output: Path, config, callback, dsf) -> None:
    from dsf.diffusion.losses import flow_matching_loss
    from dsf.models.flux.tiny import tiny_pipeline
    from dsf.training.train import train
    from dsf.transforms import lora, lora_trainable, save_lora

    pipe = tiny_pipeline()
    stack = dsf.chain(lora(rank=4, targets="to_q,to_k,to_v,to_out.0"))
    params = stack.init(pipe.params, dsf.random.key(0))
    with torch.no_grad():
        cond = {**pipe.encode_prompts(params, ["a cat", "a dog"]), "guidance": torch.full((2,), 3.5)}
    latents = dsf.random.normal(dsf.random.key(1), (8, 16, 4, 4))

    def batches(position):
        while True:
            position += 1
            yield position, position % 4

    def loss(params, pair, key):
        x = latents[2 * pair : 2 * pair + 2]
        return flow_matching_loss(pipe.velocity, params, x, key, cond)

    def save(path, trained):
        save_lora(trained["dit"], path, layout="diffusers")

    train(stack(loss), params, batches, config, where=lora_trainable, key=dsf.random.key(2), callback=callback, save=save)


# ----------------------------------------------------------------------------- the child and its kills


def start_child(workload: str, output: Path, max_steps: int) -> tuple[subprocess.Popen, queue.Queue]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", workload, str(output), str(max_steps)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    lines: queue.Queue = queue.Queue()

    def read():
        for line in child.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return child, lines


def kill_once(workload: str, output: Path, max_steps: int, aimed: bool, rng: random.Random) -> str | None:
    """Start the child, kill it (``aimed``: as a checkpoint or step file is being written; else after a random step);
    what the kill hit, or None when the child ended first."""
    child, lines = start_child(workload, output, max_steps)
    started = None
    while started is None:
        line = lines.get()
        if line is None:
            return None
        if line.startswith("start "):
            started = int(line.split()[1])
    next_write = started + CHECKPOINT_EVERY - started % CHECKPOINT_EVERY
    target = min(next_write if aimed else started + rng.randint(1, 3), max_steps - 1)
    if target <= started:
        child.kill()
        child.wait()
        return None
    watched = [output / "checkpoints", output]
    hit = None
    while hit is None:
        if aimed:
            staging = [name for folder in watched if folder.is_dir() for name in os.listdir(folder) if STAGING.match(name)]
            if staging:
                hit = f"writing {staging[0]}"
                break
        try:
            line = lines.get(timeout=0.0005 if aimed else 5)
        except queue.Empty:
            continue
        if line is None:
            return None
        if line == f"step {target}":
            hit = f"after step {target}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return hit


def ensure_two_checkpoints(workload: str, output: Path, max_steps: int) -> None:
    """Train on (without kills) until ``output`` holds two checkpoints, so that damaging the newest leaves one."""
    from dsf.training import checkpoint

    steps = checkpoint.all_steps(output / "checkpoints")
    if len(steps) < 2:
        train_workload(workload, output, min(max_steps, (steps[-1] if steps else 0) + 2 * CHECKPOINT_EVERY))


def damage_newest_checkpoint(output: Path) -> int:
    """Truncate the largest array file of the newest checkpoint; return its step."""
    from dsf.training import checkpoint

    step = checkpoint.latest_step(output / "checkpoints")
    files = [p for p in (output / "checkpoints" / str(step) / "arrays").glob("ocdbt.process_*/d/*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return step


# ----------------------------------------------------------------------------- comparing runs


def log_rows(output: Path) -> list[tuple]:
    with open(output / "log.csv", newline="") as file:
        return [(row["step"], row["loss"], row["lr"], row["grad_norm"]) for row in csv.DictReader(file)]


def result_files(output: Path) -> dict[str, bytes]:
    """The step files and the model folder's files, by relative path."""
    files = {p.name: p.read_bytes() for p in output.glob("step-*.safetensors")}
    model = output / "model"
    if model.is_dir():
        files |= {str(p.relative_to(output)): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    return files


def leftovers(output: Path) -> list[str]:
    from dsf.training import checkpoint

    found = [str(p.relative_to(output)) for p in output.rglob("*") if STAGING.match(p.name) or p.name.startswith(".model.")]
    steps = checkpoint.all_steps(output / "checkpoints")
    return found + [f"checkpoints beyond keep_last: {steps}"] * (len(steps) > KEEP_LAST)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_path", help="default: a temporary folder, removed after")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills must be positive, got {args.kills}")
    rng = random.Random(args.seed)
    root = Path(args.output_path or tempfile.mkdtemp(prefix="crash_resume_"))
    kills_of = {"digits": (args.kills + 1) // 2, "flux_lora": args.kills // 2}
    results = {"kills": 0, "runs": 0, "identical": 0, "lost": 0, "leftovers": []}
    started = time.perf_counter()
    try:
        for workload, kills in kills_of.items():
            if not kills:
                continue
            max_steps = 3 * kills + 4
            reference, killed = root / workload / "reference", root / workload / "killed"
            train_workload(workload, reference, max_steps)
            done = 0
            while done < kills:
                hit = kill_once(workload, killed, max_steps, aimed=(results["kills"] + done) % 2 == 0, rng=rng)
                if hit is None:
                    break
                done += 1
                print(f"{workload}: kill {done}: {hit}", flush=True)
            deliberate = 0
            if workload == "digits":
                ensure_two_checkpoints(workload, killed, max_steps)
                print(f"{workload}: damaged checkpoint {damage_newest_checkpoint(killed)} on purpose", flush=True)
                deliberate = 1
            train_workload(workload, killed, max_steps)
            same = log_rows(killed) == log_rows(reference) and result_files(killed) == result_files(reference)
            damaged = [p for p in (killed / "checkpoints").iterdir() if ".damaged" in p.name]
            results["kills"] += done
            results["runs"] += 1
            results["identical"] += same
            results["lost"] += len(damaged) - deliberate
            results["leftovers"] += [f"{workload}/{name}" for name in leftovers(killed)]
    finally:
        if args.output_path is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"kills done: {results['kills']} of {args.kills}")
    print(f"resumes identical: {results['identical']} of {results['runs']} runs (log rows, step files, model, byte for byte)")
    print(f"checkpoints lost: {results['lost']} (beyond the one damaged on purpose)")
    print(f"leftovers: {results['leftovers'] or 'none'}")
    print(f"{time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        workload, output, max_steps = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        train_workload(workload, output, max_steps, report=lambda line: print(line, flush=True))
    else:
        main()
