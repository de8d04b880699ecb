import numpy as np
import pandas as pd
import pytest

from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.scoring.folds import assign_folds, fold_summary


@pytest.fixture()
def meta():
    """300 patients of 10-40 slices; 4% of patients carry epidural, 35% some bleed; 20 test patients."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(320):
        n = int(rng.integers(10, 40))
        bleed = rng.random() < 0.35
        epi = rng.random() < 0.04
        lab = np.zeros((n, 6))
        if bleed:
            lab[n // 3: n // 2, 4] = 1
        if epi:
            lab[n // 2: n // 2 + 3, 0] = 1
        lab[:, 5] = lab[:, :5].max(axis=1)
        if p >= 300:
            lab[:] = np.nan
        rows.append(pd.DataFrame(lab, columns=list(LABELS)).assign(PatientID=f"P{p}"))
    return pd.concat(rows, ignore_index=True)


def test_no_patient_in_two_folds_and_test_rows_have_none(meta):
    meta["fold"] = assign_folds(meta, 5, seed=1)
    train = meta[meta["any"].notna()]
    assert train.fold.notna().all() and set(train.fold) == {0, 1, 2, 3, 4}
    assert (train.groupby("PatientID").fold.nunique() == 1).all()
    assert meta.loc[meta["any"].isna(), "fold"].isna().all()


def test_rare_epidural_and_slices_are_balanced(meta):
    meta["fold"] = assign_folds(meta, 5, seed=1)
    train = meta[meta["any"].notna()]
    epi_patients = train[train.epidural == 1].groupby("fold").PatientID.nunique()
    assert len(epi_patients) == 5 and epi_patients.max() - epi_patients.min() <= 1
    summary = fold_summary(meta)
    assert summary.slices.max() / summary.slices.min() < 1.1
    assert summary["any"].max() - summary["any"].min() < 2.0  # percentage points


def test_folds_are_seeded(meta):
    a, b, c = (assign_folds(meta, 5, seed=s) for s in (1, 1, 2))
    assert a.equals(b) and not a.equals(c)


def test_more_folds_than_patients_is_an_error():
    meta = pd.DataFrame({"PatientID": ["a", "a", "b", "c"], **{c: [0.0, 1.0, 0.0, 0.0] for c in LABELS}})
    with pytest.raises(InputError, match=r"preprocess.n_folds=4: the training set has 3 patients"):
        assign_folds(meta, 4, seed=0)
    assert sorted(assign_folds(meta, 3, seed=0).unique()) == [0, 1, 2]


def test_neighbour_positions_stay_in_their_series_with_the_ends_repeated():
    from ichpipe.base.paths import neighbour_positions

    assert neighbour_positions(4, -1).tolist() == [0, 0, 1, 2]
    assert neighbour_positions(4, 2).tolist() == [2, 3, 3, 3]
    first, last = np.array([0, 0, 0, 3, 3]), np.array([2, 2, 2, 4, 4])  # two series: positions 0-2 and 3-4
    assert neighbour_positions(5, -1, first, last).tolist() == [0, 0, 1, 3, 3]
    assert neighbour_positions(5, 1, first, last).tolist() == [1, 2, 2, 4, 4]
