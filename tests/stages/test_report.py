"""The report: the numbers behind each figure on small known sets, and the files `make report` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from torch.utils.tensorboard import SummaryWriter

from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.scoring.metrics import threshold_for_recall
from ichpipe.stages.blend import run_blend
from ichpipe.stages.report import (
    bar_colour_position,
    best_epoch,
    calibration_bins,
    column_accuracy,
    indicator_values,
    read_scalars,
    run_report,
)
from tests.stages.test_blend import _experiment


def test_threshold_reaches_the_target_recall():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.5, 0.1, 0.25])
    op = threshold_for_recall(y, p, 0.75)  # 3 of 4 positives: the third-highest positive score
    assert op.threshold == 0.3
    assert (op.tp, op.fn, op.fp, op.tn) == (3, 1, 1, 2)
    assert op.recall == 0.75 and op.precision == 0.75 and op.specificity == pytest.approx(2 / 3)
    assert threshold_for_recall(y, p, 1.0).threshold == 0.2
    assert threshold_for_recall(y, p, 0.95).fn == 0  # 0.95 x 4 = 3.8: all four are needed
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_recall(np.zeros(3), p[:3], 0.9)


def test_figure1_indicator_values():
    # two subdural images and one control; the prior says 10% for every label
    y = np.zeros((3, 6))
    y[0, [4, 5]] = 1
    y[1, [4, 5]] = 1
    p = np.full((3, 6), 0.1)
    p[0, 4], p[0, 5] = 0.9, 0.8  # confident and right
    p[1, 4], p[1, 5] = 0.3, 0.6  # subdural missed at 0.5
    p[2, 5] = 0.4  # control: 60% sure there is no bleed
    prior = np.full(6, 0.1)
    v = indicator_values(y[:2], p[:2], prior, "subdural")
    np.testing.assert_allclose(v["own"], [0.9, 0.3])
    np.testing.assert_allclose(v["own_baseline"], [0.1, 0.1])
    np.testing.assert_allclose(v["all"], [(0.9 + 0.8 + 4 * 0.9) / 6, (0.3 + 0.6 + 4 * 0.9) / 6])
    np.testing.assert_allclose(v["all_baseline"], [(2 * 0.1 + 4 * 0.9) / 6] * 2)
    c = indicator_values(y[2:], p[2:], prior, "control")
    np.testing.assert_allclose(c["own"], [0.6])
    np.testing.assert_allclose(c["own_baseline"], [0.9])
    # colour: baseline (or worse) is 0 (red), 100% is 1 (green), linear between
    np.testing.assert_allclose(bar_colour_position(np.array([0.1, 0.55, 1.0, 0.05]), np.full(4, 0.1)),
                               [0.0, 0.5, 1.0, 0.0])
    assert column_accuracy(y, p, "subdural") == 0.5
    assert column_accuracy(y, p, "control") == 1.0
    assert np.isnan(column_accuracy(y, p, "epidural"))


def test_calibration_bins():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.91, 0.5])
    bins = calibration_bins(y, p, n_bins=10)
    assert bins.bin.tolist() == [0, 1, 4, 9]  # scikit-learn's bins are closed on the right: 0.5 is in (0.4, 0.5]
    assert bins["count"].tolist() == [1, 2, 1, 2]
    np.testing.assert_allclose(bins.observed, [0, 0.5, 0, 1])
    np.testing.assert_allclose(bins.mean_predicted, [0.05, 0.135, 0.5, 0.93])


def test_tensorboard_scalars_and_best_epoch(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, loss in ((10, 0.30), (20, 0.21), (30, 0.24)):
        writer.add_scalar("val/loss", loss, step)
    writer.add_scalar("train/loss", 0.5, 5)
    writer.close()
    frame = read_scalars(tmp_path)
    val = frame[frame.tag == "val/loss"]
    assert val.step.tolist() == [10, 20, 30]
    assert best_epoch(val) == (1, 20, pytest.approx(0.21))


def test_report_writes_every_figure_and_the_page(tmp_path):
    root = tmp_path / "root"
    cfg, meta, _, _ = _experiment(root, np.random.default_rng(4))
    run_blend(cfg)
    png_dir = root / "processed" / "512"
    png_dir.mkdir()
    for image_id in meta.image_id:
        cv2.imwrite(str(png_dir / f"{image_id}.png"), np.full((16, 16, 3), 80, np.uint8))
    for k in (0, 1):
        writer = SummaryWriter(str(root / "runs" / "exp" / f"fold{k}" / "tb"))
        for step in range(1, 7):
            writer.add_scalar("train/loss", 0.5 / step, step)
        for step, loss in ((3, 0.2 + k), (6, 0.25 + k)):
            writer.add_scalar("val/loss", loss, step)
            writer.add_scalar("val/prior_loss", 0.3, step)
        writer.close()
    cfg.report.target_recall = {"any": 0.8}
    result = run_report(cfg)

    out = root / "runs" / "exp" / "report"
    for name in ("figure1.png", "pr_curves.png", "calibration.png", "training_curves.png"):
        assert (out / name).stat().st_size > 10_000, name
    cv = json.loads((root / "runs" / "exp" / "blend" / "cv.json").read_text())
    assert result.table.attrs["weighted_log_loss"] == pytest.approx(cv["oof"]["blend"]["weighted"], rel=1e-5)
    oof = pd.read_parquet(root / "runs" / "exp" / "blend" / "oof_predictions.parquet").query("model == 'blend'")
    y = meta.set_index("image_id").loc[oof.image_id, list(LABELS)].to_numpy()
    p = oof[list(LABELS)].to_numpy()
    assert result.figure1["subdural"]["accuracy"] == column_accuracy(y, p, "subdural")
    assert result.figure1["control"]["images"] == int((y.sum(axis=1) == 0).sum())
    any_op = result.operating_points["any"]
    assert any_op == threshold_for_recall(y[:, 5], p[:, 5], 0.8) and any_op.recall >= 0.8
    assert result.best_epochs == {0: (0, 3, pytest.approx(0.2)), 1: (0, 3, pytest.approx(1.2))}
    page = (out / "report.md").read_text()
    assert "![Figure 1](figure1.png)" in page and f"any: {any_op.fn} of {any_op.tp + any_op.fn} slices" in page
    assert "fold 1: epoch 1 (1.2000)" in page
    assert "Not measured: no bleed masks in" in page and result.pointing_game is None  # no answer key's masks

    cfg.report.model = "gbm"
    with pytest.raises(InputError, match="report.model='gbm'"):
        run_report(cfg)


def test_importing_the_package_leaves_the_callers_matplotlib_backend_alone():
    """report.py called matplotlib.use("Agg") when imported (bundle imports it): a notebook's backend changed."""
    code = ("import matplotlib, ichpipe.stages.report, ichpipe.stages.bundle, ichpipe.stages.predict; "
            "print(matplotlib.rcParams['backend'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "svg"})
    assert res.returncode == 0 and res.stdout.strip() == "svg", res.stderr[-2000:]
