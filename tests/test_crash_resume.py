"""bench/crash_resume.py with 3 kills: every kill -9 (one aimed at a checkpoint write) and a damaged newest checkpoint
resume to the uninterrupted run, byte for byte, losing no checkpoint and leaving nothing behind."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "crash_resume.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("crash_resume", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_kills_resume_to_the_uninterrupted_runs(tmp_path, capsys):
    results = load_bench().main(["--kills", "3", "--output_path", str(tmp_path)])
    printed = capsys.readouterr().out
    assert results == {"kills": 3, "runs": 2, "identical": 2, "lost": 0, "leftovers": []}, printed
    assert ": writing " in printed  # a kill aimed at a checkpoint or step-file write hit one in progress
    assert "damaged checkpoint" in printed
