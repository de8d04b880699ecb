"""Pseudo-labels: fold k's next round reads the source's fold-k test predictions only; soft and hard labels; a source
that does not fit is a one-line error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ichpipe.base.config import ConfigError, load_config
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.fitting.pseudo import pseudo_series, read_pseudo_labels
from ichpipe.networks.sequence_models import SliceFeatures
from tests.conftest import write_pseudo_source

L = list(LABELS)


def _meta(root, n_train=6, n_test=3, slices=4):
    rows = []
    for p in range(n_train + n_test):
        test = p >= n_train
        for s in range(slices):
            rows.append({"image_id": f"ID_{p:03d}{s:03d}", "split": "test" if test else "train", "PatientID": f"P{p}",
                         "slice_index": s, **{c: np.nan if test else float(p % 2) for c in L},
                         "fold": pd.NA if test else p % 3})
    meta = pd.DataFrame(rows)
    meta["fold"] = meta.fold.astype("Int64")
    (root / "processed").mkdir(parents=True)
    meta.to_parquet(root / "processed" / "metadata.parquet")
    return meta


def _cfg(root, *overrides):
    return load_config(overrides=[f"data.root={root}", "experiment=round2", "pseudo.source=round1", *overrides])


def test_fold_k_reads_the_source_fold_k_only(tmp_path):
    meta = _meta(tmp_path)
    write_pseudo_source(tmp_path, "round1", meta)
    for k in (0, 1, 2):
        got = read_pseudo_labels(_cfg(tmp_path), k, meta)
        assert sorted(got.labels.index) == sorted(meta.image_id[meta.split == "test"])
        np.testing.assert_allclose(got.labels.to_numpy(), 0.1 + 0.2 * k, rtol=1e-6)  # soft: the probabilities
    before = read_pseudo_labels(_cfg(tmp_path), 1, meta)
    # the source's other folds change (their models saw fold 1's patients): fold 1's labels must not
    write_pseudo_source(tmp_path, "round1", meta, values=lambda k, n: np.full((n, 6), 0.1 + 0.2 * k if k == 1 else 0.9))
    after = read_pseudo_labels(_cfg(tmp_path), 1, meta)
    assert after.digest == before.digest
    pd.testing.assert_frame_equal(after.labels, before.labels)
    # and the check can fail: fold 1's own change is seen
    write_pseudo_source(tmp_path, "round1", meta, values=lambda k, n: np.full((n, 6), 0.4))
    assert read_pseudo_labels(_cfg(tmp_path), 1, meta).digest != before.digest


def test_hard_labels_keep_the_confident_slices_rounded(tmp_path):
    meta = _meta(tmp_path)
    values = np.array([[0.02] * 6, [0.97] * 5 + [0.99], [0.02] * 5 + [0.5]])

    def probs(k, n):  # series 0 (slices 0-3) sure it is clear, series 1 sure it bleeds, slice 8 of series 2 unsure
        return values[np.where(np.arange(n) == 8, 2, np.arange(n) // 4 % 2)]

    write_pseudo_source(tmp_path, "round1", meta, values=probs)
    got = read_pseudo_labels(_cfg(tmp_path, "pseudo.labels=hard", "pseudo.confidence=0.05"), 0, meta)
    test_ids = meta.image_id[meta.split == "test"].to_numpy()
    kept = np.delete(test_ids, 8)  # unsure of "any"
    assert sorted(got.labels.index) == sorted(kept) and got.dropped == len(test_ids) - len(kept)
    assert set(np.unique(got.labels.to_numpy())) == {0.0, 1.0}
    # a series model takes whole series: a series with one unsure slice is left out
    ids = test_ids
    feats = SliceFeatures(ids, np.zeros((len(ids), 2), np.float32), np.zeros((len(ids), 6), np.float32), None,
                          ids, [np.arange(i, i + 4) for i in range(0, len(ids), 4)])
    whole = pseudo_series(feats, got)
    assert whole is not None and all(np.isin(ids[s], kept).all() for s in whole.series)
    assert len(whole.series) == 2 and len(feats.series) == 3


def test_a_source_that_does_not_fit_is_one_line(tmp_path):
    meta = _meta(tmp_path)
    with pytest.raises(InputError, match=r"runs/round1/blend/test_by_fold.parquet: not found; run stage 5 of round1"):
        read_pseudo_labels(_cfg(tmp_path), 0, meta)
    write_pseudo_source(tmp_path, "round1", meta)
    with pytest.raises(InputError, match=r"no model 'lstm' \(has blend\); set pseudo.model"):
        read_pseudo_labels(_cfg(tmp_path, "pseudo.model=lstm"), 0, meta)
    other = meta.assign(fold=(meta.fold + 1) % 3)
    write_pseudo_source(tmp_path, "round1", other)
    with pytest.raises(InputError, match="trained on fold table"):
        read_pseudo_labels(_cfg(tmp_path), 0, meta)
    with pytest.raises(ConfigError, match="pseudo.source=round2: the experiment itself"):
        _cfg(tmp_path, "pseudo.source=round2")
