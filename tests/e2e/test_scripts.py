"""The entry points as a user runs them: outputs, and one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from ichpipe.base.config import load_config
from ichpipe.stages.preprocess import run_preprocess
from ichpipe.stages.train import train_fold

REPO = Path(__file__).resolve().parents[2]


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
    res = _run(REPO / "eda/01_dataset_overview.py", "--config", REPO / "configs/default.yaml", f"data.root={root}")
    assert res.returncode == 0, res.stderr
    out = root / "eda"
    for name in ("prevalence.png", "cooccurrence.png", "slices_per_series.png", "examples.png"):
        assert (out / name).stat().st_size > 5000, name
    summary = (out / "summary.md").read_text()
    train = meta[meta.split == "train"]
    assert f"| any | {100 * train['any'].mean():.2f} |" in summary
    fixed = int(meta.fixed_12bit.sum())
    assert f"| 12-bit files fixed (PixelRepresentation 0, intercept > -100) | {fixed} |" in summary
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
    res = subprocess.run(["make", "--no-print-directory", "SKIP_SETUP=1", "train", f"PY={sys.executable}",
                          f"DATA_DIR={tmp_path}", "CONFIG=configs/demo/nope.yaml"], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert res.stderr.splitlines()[0] == f"error: {REPO}/configs/demo/nope.yaml: config file not found"
    assert "Traceback" not in res.stderr and "fold=0" not in res.stderr
    res = subprocess.run(["make", "--no-print-directory", "SKIP_SETUP=1", "train", f"PY={sys.executable}",
                          f"DATA_DIR={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and "metadata.parquet: not found; run `make preprocess` first" in res.stderr


def test_a_config_directory_and_a_data_dir_with_spaces_are_one_line_errors(tmp_path):
    res = _run(REPO / "scripts/01_preprocess.py", "--config", REPO / "configs")
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: {REPO}/configs: not a file; --config takes a YAML file such as configs/demo/cpu_small.yaml")
    spaced = tmp_path / "my data"
    spaced.mkdir()
    res = subprocess.run(["make", "--no-print-directory", "SKIP_SETUP=1", "preprocess", f"PY={sys.executable}",
                          f"DATA_DIR={spaced}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0  # was "error: data: overrides are key=value"
    assert res.stderr.splitlines()[0].startswith(f"error: {spaced}: no stage_2_train/*.dcm")
    assert not list(spaced.iterdir())  # nothing created there


def test_an_error_from_a_loader_worker_is_one_line():
    import torch

    from ichpipe.base.errors import InputError, first_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise InputError("/data/x.png: missing or unreadable PNG (run `make preprocess`)")

    try:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    except InputError as exc:
        assert "Traceback" in str(exc)  # what PyTorch re-raises: the worker's whole traceback
        assert first_line(exc) == "/data/x.png: missing or unreadable PNG (run `make preprocess`)"
    else:
        raise AssertionError("the worker's error was not re-raised")


def test_an_unwritable_or_full_disk_is_one_line(capsys):
    import errno

    from ichpipe.base.cli import stage_main

    def read_only(cfg, args):
        raise OSError(errno.EROFS, "Read-only file system", "/kaggle/input/rsna/processed")

    assert stage_main("", read_only, argv=[]) == 2
    assert capsys.readouterr().err == ("error: /kaggle/input/rsna/processed: Read-only file system; write the outputs "
                                       "elsewhere with data.work_dir=PATH\n")

    def full(cfg, args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/last.pt")

    assert stage_main("", full, argv=[]) == 2
    assert "error: /data/runs/x/last.pt: No space left on device" in capsys.readouterr().err


def test_work_dir_takes_every_output_and_the_data_root_is_only_read(processed, tmp_path):
    root, _, _ = processed
    data, work = tmp_path / "input", tmp_path / "work"
    data.mkdir()
    for name in ("stage_2_train", "stage_2_test", "stage_2_train.csv", "stage_2_sample_submission.csv"):
        os.symlink(root / name, data / name)
    before = sorted(p.name for p in data.iterdir())
    args = [f"data.root={data}", f"data.work_dir={work}", "preprocess.size=32", "data.workers=2"]
    run_preprocess(load_config(overrides=args), progress=False)
    train_fold(load_config(overrides=[*args, "model.backbone=test_resnet", "model.pretrained=false",
                                      "train.image_size=32", "train.epochs=1", "train.loader_workers=0",
                                      "experiment=w"]), progress=False)
    assert _run(REPO / "eda/01_dataset_overview.py", *args).returncode == 0
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written beside the competition files
    assert (work / "processed" / "metadata.parquet").exists() and (work / "processed" / "32").is_dir()
    assert list((work / "runs" / "w" / "fold0" / "checkpoints").glob("*.pt")) and (work / "eda" / "summary.md").exists()


def test_shortcut_rule_and_real_vs_synthetic_figure(processed):
    """eda/02 scores every readable train DICOM and reports the rule's AUC per label; eda/03 draws the figure."""
    root, _, meta = processed
    res = _run(REPO / "eda/02_shortcut_rule.py", f"data.root={root}", "data.workers=2")
    assert res.returncode == 0, res.stderr
    scores = pd.read_csv(root / "eda" / "shortcut_rule.csv")
    train = meta[meta.split == "train"]
    assert set(scores.image_id) == set(train.image_id)  # the truncated file is skipped, nothing else
    assert scores.score.between(0, 0.2).all()
    table = pd.read_csv(root / "synthetic_slices.csv").set_index("image_id")
    # the same function on the pixels read back from the DICOMs as on those the generator wrote
    assert (scores.set_index("image_id").score - table.loc[scores.image_id, "shortcut_score"]).abs().max() < 2e-3
    report = (root / "eda" / "shortcut_rule.md").read_text()
    assert f"| any | {int(train['any'].sum())} |" in report
    res = _run(REPO / "eda/03_real_vs_synthetic.py", f"data.root={root}")
    assert res.returncode == 0, res.stderr
    assert (root / "eda" / "real_vs_synthetic.png").stat().st_size > 50_000


def test_make_bench_preprocess_has_its_own_count():
    """`make bench-preprocess` runs its 300 files, whatever make judge's N says (its `N ?= 6` once shadowed it, and
    the target was then lost)."""
    for extra in ([], ["N=6"]):
        res = subprocess.run(["make", "--no-print-directory", "-n", "bench-preprocess", *extra], capture_output=True,
                             text=True, cwd=REPO)
        assert res.returncode == 0 and res.stdout.strip().splitlines()[-1].endswith(
            "benchmarks/bench_preprocess.py --n 300"), res.stdout + res.stderr
    res = subprocess.run(["make", "--no-print-directory", "-n", "bench-preprocess", "BENCH_N=20"], capture_output=True,
                         text=True, cwd=REPO)
    assert res.stdout.strip().endswith("--n 20")
