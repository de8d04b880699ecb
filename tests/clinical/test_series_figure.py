"""predict's series figure: at most six slices, the most probable, saying when more were flagged; the Grad-CAM on
one scale for every slice (a slice at p = 0.03 is not drawn as hot as one at 0.99); the flagging points visible."""

from __future__ import annotations

import types

import numpy as np
from matplotlib.figure import Figure

from ichpipe.base.labels import LABELS
from ichpipe.clinical.predictor import SeriesResult
from ichpipe.clinical.series_figure import series_figure
from ichpipe.clinical.studies import Series
from ichpipe.networks.bundle_format import OperatingThreshold


def test_the_figure_shows_the_six_most_probable_flagged_slices_on_one_scale(tmp_path, monkeypatch):
    n = 12
    p_any = np.array([0.03, 0.99, 0.5, 0.4, 0.2, 0.1, 0.9, 0.8, 0.7, 0.6, 0.05, 0.01])
    probs = np.tile(p_any[:, None], (1, len(LABELS))) * 0.5
    probs[:, -1] = p_any  # any
    thresholds = {c: OperatingThreshold(threshold=0.004 if c == "any" else 0.3, recall=0.95) for c in LABELS}
    flags = np.stack([probs[:, k] >= thresholds[c].threshold for k, c in enumerate(LABELS)], 1)
    result = SeriesResult(np.zeros((n, 32, 32, 3), np.uint8), probs, flags, [], {})
    predictor = types.SimpleNamespace(info=types.SimpleNamespace(thresholds=thresholds),
                                      grad_cam=lambda images: np.ones((len(images), 32, 32)))  # every map peak 1
    drawn = {}

    def savefig(fig, path, **kwargs):
        drawn["title"] = fig._suptitle.get_text()
        drawn["heat"] = [im.get_array() for ax in fig.axes for im in ax.get_images()[1:]]
        drawn["lines"] = [line.get_ydata()[0] for ax in fig.axes for line in ax.get_lines() if line.get_linestyle()
                          == "--"]
        drawn["yscale"] = [ax.get_yscale() for ax in fig.axes if ax.get_lines()]

    monkeypatch.setattr(Figure, "savefig", savefig)
    s = Series("1.2", "1.2.3", "p", ids=[f"s{i}" for i in range(n)], z=list(np.arange(n) * 5.0))
    shown = series_figure(tmp_path / "f.png", s, result, predictor)
    assert shown == [1, 2, 6, 7, 8, 9]  # all 12 flagged at 0.004: the six most probable, in z order
    assert drawn["title"].startswith("12 flagged slice(s) (any), the 6 most probable shown")
    peaks = [float(np.max(h)) for h in drawn["heat"]]
    np.testing.assert_allclose(peaks, p_any[shown])  # maps of peak 1 drawn at the slice's probability: one scale
    assert sorted(drawn["lines"]) == sorted(t.threshold for t in thresholds.values())
    assert drawn["yscale"] == ["logit"]  # a flagging point of 0.004 sits a decade above 0.001, not on the axis


def test_with_nothing_flagged_the_three_most_probable_are_shown(tmp_path, monkeypatch):
    probs = np.full((5, len(LABELS)), 0.001)
    probs[:, -1] = [0.01, 0.02, 0.005, 0.03, 0.001]
    thresholds = {c: OperatingThreshold(threshold=0.5, recall=0.95) for c in LABELS}
    result = SeriesResult(np.zeros((5, 16, 16, 3), np.uint8), probs, probs >= 0.5, [], {})
    predictor = types.SimpleNamespace(info=types.SimpleNamespace(thresholds=thresholds),
                                      grad_cam=lambda images: np.ones((len(images), 16, 16)))
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: titles.append(fig._suptitle.get_text()))
    s = Series("1.2", "1.2.3", "p", ids=[f"s{i}" for i in range(5)], z=[0.0, 5, 10, 15, 20])
    assert series_figure(tmp_path / "f.png", s, result, predictor) == [0, 1, 3]
    assert titles[0].startswith("no slice flagged; the three most probable (any)")
