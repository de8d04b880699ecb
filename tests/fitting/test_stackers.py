"""The ensemble's fitted combiners: cross-fitted by the outer folds (fold k never sees fold k's labels), the context
stacker's features and its start from the members' mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ichpipe.base.config import load_config
from ichpipe.base.labels import LABELS
from ichpipe.fitting.stackers import (
    context_features,
    cross_fit_weights,
    fit_context,
    fit_stacker,
    position_features,
)
from ichpipe.scoring.metrics import logit, weighted_log_loss

L = list(LABELS)


def _series(n_patients=36, slices=10, seed=0):
    """Metadata rows (one series per patient, rows shuffled), labels with runs of bleeding slices, three folds, and
    two members' probabilities: one right one slice late, one noisy."""
    rng = np.random.default_rng(seed)
    rows, y = [], []
    for p in range(n_patients):
        start, length = rng.integers(0, slices - 3), rng.integers(0, 5)
        for s in range(slices):
            bleeding = start <= s < start + length
            y.append([float(bleeding and rng.random() < 0.6) for _ in L[:-1]] + [float(bleeding)])
            rows.append({"PatientID": f"P{p}", "StudyInstanceUID": f"S{p}", "SeriesInstanceUID": f"R{p}",
                         "slice_index": s, "fold": p % 3})
    rows, y = pd.DataFrame(rows), np.array(y)
    late = np.r_[y[1:], y[-1:]]  # the next slice's labels (across series ends: a little noise more)
    members = np.stack([1 / (1 + np.exp(-(3 * (2 * late - 1) + rng.normal(0, 1, y.shape)))),
                        1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 2, y.shape))))])
    order = rng.permutation(len(rows))
    return rows.iloc[order].reset_index(drop=True), y[order], members[:, order]


def _context_cfg(*overrides):
    return load_config(overrides=["ensemble.context.min_data_in_leaf=10", "ensemble.context.max_rounds=60",
                                  *overrides]).ensemble.context


def _fit(combiner: str, rows, y, members, test, views):
    folds = rows.fold.to_numpy()
    if combiner.startswith("weights"):
        return cross_fit_weights(members, y, folds, combiner.split("_")[1], test, views)[0]
    if combiner.startswith("stacker"):
        cfg = load_config(overrides=[f"ensemble.stacker.model={combiner.split('_')[1]}",
                                     "ensemble.stacker.min_samples_leaf=10"]).ensemble.stacker
        from ichpipe.fitting.stackers import neighbour_features

        return fit_stacker(cfg, 0, neighbour_features(members, rows, [1, 2]), y, folds,
                           neighbour_features(test, rows, [1, 2]),
                           {k: neighbour_features(v, rows, [1, 2]) for k, v in views.items()})
    base = logit(np.clip(members.mean(axis=0), 1e-6, 1 - 1e-6))
    x = context_features(members, rows, 3)
    fitted, _ = fit_context(_context_cfg(), 0, 2, x, base, y, folds, rows.PatientID.to_numpy(),
                            context_features(test, rows, 3), logit(np.clip(test.mean(axis=0), 1e-6, 1 - 1e-6)),
                            {k: (context_features(v, rows, 3), logit(np.clip(v.mean(axis=0), 1e-6, 1 - 1e-6)))
                             for k, v in views.items()})
    return fitted


@pytest.mark.parametrize("combiner", ["weights_prob", "weights_logit", "stacker_logistic", "stacker_hgb", "context"])
def test_fold_k_is_predicted_without_fold_k_labels(combiner):
    rows, y, members = _series()
    views = {k: members for k in range(3)}  # each fold's test view (here: the same slices, for the comparison)
    before = _fit(combiner, rows, y, members, members, views)
    flipped = y.copy()
    flipped[rows.fold == 0] = 1 - flipped[rows.fold == 0]  # fold 0's labels reversed: its own predictions must not move
    after = _fit(combiner, rows, flipped, members, members, views)
    fold0 = (rows.fold == 0).to_numpy()
    np.testing.assert_array_equal(after.oof[fold0], before.oof[fold0])
    np.testing.assert_array_equal(after.by_fold[0], before.by_fold[0])
    # the check can fail: the folds whose combiners trained on fold 0's labels did move
    assert np.abs(after.oof[~fold0] - before.oof[~fold0]).max() > 1e-3
    assert np.abs(after.by_fold[1] - before.by_fold[1]).max() > 1e-3


def test_the_context_stacker_beats_the_mean_when_the_neighbours_tell():
    rows, y, members = _series(n_patients=60)
    fitted = _fit("context", rows, y, members, members, {})
    mean = weighted_log_loss(y, members.mean(axis=0))
    assert weighted_log_loss(y, fitted.oof) < 0.7 * mean  # member 0 is right one slice late: z+1 undoes it


def test_the_context_stacker_starts_from_the_members_mean():
    # learning rate ~0: the trees add nothing, so every prediction is the members' mean (its logit the initial score);
    # boosting from the prior instead would predict the training prevalence
    rows, y, members = _series()
    folds = rows.fold.to_numpy()
    base = logit(np.clip(members.mean(axis=0), 1e-6, 1 - 1e-6))
    x = context_features(members, rows, 2)
    fitted, rounds = fit_context(_context_cfg("ensemble.context.learning_rate=1e-9"), 0, 2, x, base, y, folds,
                                 rows.PatientID.to_numpy(), x, base)
    np.testing.assert_allclose(fitted.oof, members.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(fitted.test, members.mean(axis=0), rtol=1e-6)
    assert set(rounds) == set(L)


def test_position_features_follow_z_order():
    rows = pd.DataFrame({"PatientID": ["a", "a", "a", "b"], "StudyInstanceUID": ["s", "s", "s", "t"],
                         "SeriesInstanceUID": ["r", "r", "r", "q"], "slice_index": [2, 0, 1, 0]})
    np.testing.assert_allclose(position_features(rows), [[1.0, 3], [0.0, 3], [0.5, 3], [0.5, 1]])
    probs = np.full((2, 4, 6), 0.5)
    # per member: slice, 2 x k neighbours, max, mean = (3 + 2k) blocks of 6; then position and length
    assert context_features(probs, rows, 4).shape == (4, 2 * 6 * (3 + 2 * 4) + 2)


def test_context_features_are_the_neighbour_features_at_every_offset_then_the_position():
    from ichpipe.fitting.stackers import neighbour_features

    rows, _, members = _series(n_patients=5)
    got = context_features(members, rows, 3)
    want = np.concatenate([neighbour_features(members, rows, [1, 2, 3]), position_features(rows)], axis=1)
    np.testing.assert_array_equal(got, want.astype(np.float32))
