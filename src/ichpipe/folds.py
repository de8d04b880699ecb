"""K folds grouped by patient and stratified on the labels, with the rare epidural balanced first."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichpipe.labels import LABELS


def assign_folds(meta: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Fold number of each labelled row of ``meta`` (``PatientID`` and label columns).

    Every patient is one unit. Patients are put in strata by their rarest finding (epidural, then any
    bleed, then none); within a stratum, in a seeded random order, each patient goes to the fold
    that holds the fewest slices of that stratum so far (ties: fewest slices overall). So epidural
    patients are spread first and evenly, then bleeding patients, then controls, and no patient is
    ever in two folds. Rows without labels (the test set) get <NA>.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    labelled = meta[meta["any"].notna()]
    per_patient = labelled.groupby("PatientID").agg(
        n=("any", "size"), epidural=("epidural", "sum"), any=("any", "sum"))
    strata = np.where(per_patient.epidural > 0, 0, np.where(per_patient["any"] > 0, 1, 2))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(per_patient))
    stratum_load = np.zeros((3, n_folds))
    total_load = np.zeros(n_folds)
    fold_of: dict[str, int] = {}
    for stratum in (0, 1, 2):
        for i in order[strata[order] == stratum]:
            size = per_patient.n.iloc[i]
            fold = int(np.lexsort((total_load, stratum_load[stratum]))[0])
            fold_of[per_patient.index[i]] = fold
            stratum_load[stratum, fold] += size
            total_load[fold] += size
    folds = meta["PatientID"].map(fold_of).astype("Int64")
    folds[meta["any"].isna()] = pd.NA
    return folds


def fold_summary(meta: pd.DataFrame) -> pd.DataFrame:
    """Patients, slices and per-label prevalence (%) per fold."""
    labelled = meta[meta["fold"].notna()]
    summary = labelled.groupby("fold").agg(patients=("PatientID", "nunique"), slices=("any", "size"))
    return summary.join(labelled.groupby("fold")[list(LABELS)].mean().mul(100).round(2))
