"""The entry points as a user runs them: outputs, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_preprocess_on_an_empty_root_is_a_one_line_error(tmp_path):
    res = _run(REPO / "scripts/01_preprocess.py", f"data.root={tmp_path}")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith(f"error: {tmp_path}: no stage_2_train/*.dcm")


def test_bad_override_and_bad_shard_are_one_line_errors(tmp_path):
    res = _run(REPO / "scripts/01_preprocess.py", "preprocess.sise=256")
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: preprocess.sise: unknown key (known: chunk_size, fold_seed, max_bad_fraction, mode, n_folds, name, "
        "png_filter, png_level, png_strategy, replace_folds, size, windows)")
    res = _run(REPO / "scripts/01_preprocess.py", "--shard", "3/2", f"data.root={tmp_path}")
    assert res.returncode == 2 and res.stderr.strip() == "error: --shard: need 0 <= I < N, got '3/2'"


def test_eda_writes_figures_and_summary(processed):
    root, _, meta = processed
    res = _run(REPO / "eda/01_dataset_overview.py", f"data.root={root}")
    assert res.returncode == 0, res.stderr
    out = root / "eda"
    for name in ("prevalence.png", "cooccurrence.png", "slices_per_series.png", "examples.png"):
        assert (out / name).stat().st_size > 5000, name
    summary = (out / "summary.md").read_text()
    train = meta[meta.split == "train"]
    assert f"| any | {100 * train['any'].mean():.2f} |" in summary
    assert f"| 12-bit files fixed (PixelRepresentation 0, intercept > -100) | {int(meta.fixed_12bit.sum())} |" in summary
    assert "| unusable files (bad_files.csv) | 1 |" in summary


def test_eda_without_metadata_is_a_one_line_error(tmp_path):
    res = _run(REPO / "eda/01_dataset_overview.py", f"data.root={tmp_path}")
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path}/processed/metadata.parquet: not found; run `make preprocess` first"


def test_synthetic_script_writes_the_layout(tmp_path):
    args = [REPO / "scripts/00_make_synthetic.py", f"data.root={tmp_path}", "synthetic.n_patients=2",
            "synthetic.slices_min=3", "synthetic.slices_max=4", "synthetic.size=64", "data.workers=1"]
    res = _run(*args)
    assert res.returncode == 0, res.stderr
    assert "train prevalence:" in res.stdout
    assert len(pd.read_csv(tmp_path / "stage_2_train.csv")) % 6 == 0
    assert (tmp_path / "synthetic_config.yaml").exists()
    again = _run(*args)  # the same config: kept, not written again
    assert again.returncode == 0 and "already there" in again.stdout
    # the YAML alone does not make a set finished: a lost file is noticed and the set written again
    lost = next((tmp_path / "stage_2_train").glob("*.dcm"))
    lost.unlink()
    again = _run(*args)
    assert again.returncode == 0 and f"incomplete (1 files missing, e.g. {lost})" in again.stdout
    assert lost.exists() and "train prevalence:" in again.stdout
    changed = _run(*args, "synthetic.seed=3")
    assert changed.returncode == 0 and "train prevalence:" in changed.stdout


def test_make_train_stops_on_a_config_it_cannot_read(tmp_path):
    # the fold loop used to fall back to five folds when the config failed to load
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "train", f"PY={sys.executable}",
                          f"DATA_DIR={tmp_path}", "CONFIG=configs/cnn/nope.yaml"], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert res.stderr.splitlines()[0] == f"error: {REPO}/configs/cnn/nope.yaml: config file not found"
    assert "Traceback" not in res.stderr and "fold=0" not in res.stderr
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "train", f"PY={sys.executable}",
                          f"DATA_DIR={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and "metadata.parquet: not found; run `make preprocess` first" in res.stderr
