"""bench/device_suite.py: the CPU mode runs every row in order (so the GPU run's code never rots), and a row
that fails, does not fit or runs past its budget is reported while the suite goes on."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import device_suite  # noqa: E402

ROW_IDS = ["a", "b1", "b5", "b2", "b3", "c", "d1", "d2", "e", "f", "b4", "g", "h"]


def test_small_cpu_run_measures_every_row_in_order(tmp_path, capsys):
    out = tmp_path / "suite.json"
    device_suite.main(["--device", "cpu", "--small", "--out", str(out)])
    document = json.loads(out.read_text())
    rows = {row["id"]: row for row in document["rows"]}
    assert [row["id"] for row in document["rows"]] == ROW_IDS and document["small"] is True
    expected_skips = set() if importlib.util.find_spec("diffusers") else {"a"}
    assert {i for i, row in rows.items() if row["status"] != "ok"} == expected_skips, [r["reason"] for r in rows.values()]
    if "a" not in expected_skips:
        assert rows["a"]["values"]["max_relative_difference"] < 1e-4
    assert rows["b1"]["values"]["tflop_per_step"] >= 0 and rows["b2"]["values"]["gib_moved_per_step"] >= 0
    assert rows["c"]["values"]["components_in_order"] == ["t5", "clip", "dit", "vae"]
    assert rows["d1"]["values"]["lora_gradient_devices"] == rows["d2"]["values"]["lora_gradient_devices"] == ["cpu"]
    assert set(rows["h"]["values"]) >= {"FLUX DiT (dsf)", "Wan DiT (dsf)"}
    printed = capsys.readouterr().out
    assert all(f"\n{i} " in printed for i in ROW_IDS)


def test_a_failing_or_oversized_row_is_reported_and_the_suite_goes_on():
    suite = device_suite.Suite(torch.device("cpu"), small=True)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    suite.run("x", "raises", 10, lambda: 1 / 0)
    suite.run("y", "too big", 10, out_of_memory)
    suite.run("z", "fine", 10, lambda: {"value": 1})
    assert [(r.status, r.reason.split(":")[0]) for r in suite.rows] == [
        ("failed", "ZeroDivisionError"), ("skipped", "does not fit"), ("ok", "")]
    assert suite.rows[2].values == {"value": 1}


def test_a_row_past_its_budget_is_stopped():
    with pytest.raises(device_suite.OverBudget):
        with device_suite.time_limit(0.05):
            time.sleep(2)
