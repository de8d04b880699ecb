"""The sequence model's training rows (random windows, series read backward) and the several-CNN features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ichpipe.base.config import LstmConfig
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.fitting.sequence_fit import member_features, training_rows
from ichpipe.networks.sequence_models import SliceFeatures


def _feats(lengths=(30, 5, 12)):
    n = sum(lengths)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    return SliceFeatures(np.arange(n).astype(str), np.zeros((n, 2), np.float32), np.zeros((n, 6), np.float32),
                         np.zeros((n, 6), np.float32), np.zeros(n).astype(str),
                         [np.arange(s, s + k) for s, k in zip(starts, lengths, strict=True)])


def test_windows_are_contiguous_cuts_and_reversal_reads_backward():
    feats = _feats()
    rng = np.random.default_rng(0)
    starts, reversed_ = set(), 0
    for _ in range(200):
        rows = training_rows(feats, [0, 1, 2], LstmConfig(window=8, reverse=0.5), rng)
        for r, whole in zip(rows, feats.series, strict=True):
            assert len(r) == min(8, len(whole)) and set(r) <= set(whole)
            forward = r if r[0] < r[-1] or len(r) == 1 else r[::-1]
            assert (np.diff(forward) == 1).all()  # contiguous
            reversed_ += len(r) > 1 and r[0] > r[-1]
        starts.add(int(min(rows[0])))
    assert len(starts) > 15  # the 30-slice series: windows start anywhere in 0..22
    assert 200 < reversed_ < 400  # about half of 600 series read backward
    plain = training_rows(feats, [2, 0], LstmConfig(), rng)
    assert [list(r) for r in plain] == [list(feats.series[2]), list(feats.series[0])]


def _folder(root, name, ids, emb, logits):
    root.mkdir(parents=True)
    pd.DataFrame({"image_id": ids}).to_csv(root / f"{name}_ids.csv", index=False)
    np.save(root / f"{name}_emb.npy", emb)
    np.save(root / f"{name}_logits.npy", logits)
    return root


def test_member_features_align_the_cnns_by_image_id(tmp_path):
    ids = np.array([f"ID_{i}" for i in range(6)])
    meta = pd.DataFrame({"image_id": ids, "PatientID": ["a"] * 3 + ["b"] * 3, "StudyInstanceUID": ["s"] * 6,
                         "SeriesInstanceUID": ["r"] * 3 + ["q"] * 3, "slice_index": [0, 1, 2] * 2,
                         **{c: 0.0 for c in LABELS}})
    rng = np.random.default_rng(0)
    e1, l1 = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 6)).astype(np.float32)
    order = np.array([5, 3, 1, 0, 2, 4])  # the second CNN wrote its rows in another order
    e2, l2 = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 6)).astype(np.float32)
    a = _folder(tmp_path / "a", "oof", ids, e1, l1)
    b = _folder(tmp_path / "b", "oof", ids[order], e2[order], l2[order])
    feats = member_features([a, b], "oof", meta)
    assert feats.blocks == (4, 3, 12) and feats.emb.shape == (6, 19)
    np.testing.assert_allclose(feats.emb[np.arange(6)], np.hstack([e1, e2, l1, l2]), rtol=1e-6)
    np.testing.assert_allclose(feats.logits, (l1 + l2) / 2, rtol=1e-6)  # the base: the CNNs' mean logits
    c = _folder(tmp_path / "c", "oof", ids[:5], e2[:5], l2[:5])
    with pytest.raises(InputError, match=r"c: its oof slices \(5\) are not those of .*a \(6\)"):
        member_features([a, c], "oof", meta)
