"""`make gpu-check` in its tiny mode: the same script as on a GPU, on the CPU with a tiny model, every part ok."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ["Machine", "Synthetic set", "Training throughput per GPU config", "Killed and resumed", "train.compile=true",
         "Stages 3 and 4", "bench-scale, small"]


def test_gpu_check_runs_every_part_in_its_tiny_mode_and_records_them(tmp_path):
    record = tmp_path / "BENCH.md"
    record.write_text("# Benchmarks\n\nbefore\n\n<!-- gpu-check:start -->\nold figures\n<!-- gpu-check:end "
                      "-->\n\nafter\n")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out"),
                          "--record", str(record)], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "GPU_CHECK_TINY": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [p["title"] for p in parts] == PARTS and all(p["ok"] for p in parts), [p["body"] for p in parts]
    figures = {p["title"]: p["figures"] for p in parts}
    # the killed run resumed to the uninterrupted run's weights (on the CPU: exactly)
    assert figures["Killed and resumed"]["max_weight_diff"] == 0.0
    assert figures["Killed and resumed"]["max_val_loss_gap"] == 0.0
    assert {r["stage"].split(":")[0] for r in figures["Stages 3 and 4"]["rows"]} == {"3", "4"}
    assert figures["Training throughput per GPU config"]["rows"][0]["device_img_s"] > 0
    text = record.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("\n\nafter\n")
    assert "old figures" not in text and text.count("<!-- gpu-check:start -->") == 1
    assert "(tiny mode): 7 of 7 parts ok" in text and "| convnext_small_384_modern | 32 | 4 | fp32 |" in text
    assert not (tmp_path / "out" / "work").exists()  # its synthetic set and runs are removed
