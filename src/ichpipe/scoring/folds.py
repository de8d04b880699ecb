"""K folds grouped by patient and stratified on the labels, with the rare epidural balanced first."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.base.errors import InputError
from ichpipe.base.files import write_text_atomic
from ichpipe.base.labels import LABELS


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
    n_patients = labelled.PatientID.nunique()
    if n_folds > n_patients:
        raise InputError(f"preprocess.n_folds={n_folds}: the training set has {n_patients} patients; "
                         f"folds are groups of patients, so at most {n_patients}")
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


FOLD_RECORD = "folds.json"  # in each run folder: the identity of the fold table the run was trained on


def fold_table_id(meta: pd.DataFrame) -> str:
    """A short hash of the PatientID → fold map of the labelled rows: equal ids, equal folds."""
    pairs = meta.loc[meta["fold"].notna(), ["PatientID", "fold"]].drop_duplicates()
    text = "\n".join(sorted(f"{p}\t{int(f)}" for p, f in zip(pairs.PatientID, pairs.fold, strict=True)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe(meta: pd.DataFrame) -> dict:
    labelled = meta[meta["fold"].notna()]
    return {"fold_table": fold_table_id(meta), "n_folds": int(labelled.fold.nunique()),
            "patients": int(labelled.PatientID.nunique())}


def record_fold_table(run_folder: str | os.PathLike, meta: pd.DataFrame) -> None:
    """Write the fold table's identity into a run folder (stage 2, before the first epoch)."""
    write_text_atomic(Path(run_folder) / FOLD_RECORD, json.dumps(_describe(meta)) + "\n")


def recorded_fold_table(run_folder: str | os.PathLike) -> dict | None:
    path = Path(run_folder) / FOLD_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def check_fold_table(run_folders: str | os.PathLike | list, meta: pd.DataFrame) -> None:
    """Refuse runs trained on other folds than the metadata's today (their OOF rows would not be out-of-fold).

    ``run_folders``: one run folder or several (the table's hash is computed once for all).
    """
    now = _describe(meta)
    for run_folder in run_folders if isinstance(run_folders, list) else [run_folders]:
        _check_one(run_folder, now)


def _check_one(run_folder: str | os.PathLike, now: dict) -> None:
    saved = recorded_fold_table(run_folder)
    if saved is None:
        raise InputError(f"{run_folder}: no {FOLD_RECORD}, so which folds it was trained on is unknown; "
                         f"train the fold again (`make train fold=...`)")
    if saved["fold_table"] != now["fold_table"]:
        raise InputError(f"{run_folder}: trained on fold table {saved['fold_table']} ({saved['n_folds']} folds, "
                         f"{saved['patients']} patients) but the metadata now has {now['fold_table']} "
                         f"({now['n_folds']} folds, {now['patients']} patients); preprocess with the run's "
                         f"preprocess.n_folds/fold_seed again, or train under a new experiment name")


def runs_on_fold_table(root: str | os.PathLike, table_id: str) -> list[Path]:
    """Run folders under ``<root>/runs`` trained on the fold table ``table_id``."""
    return sorted(p.parent for p in Path(root).glob(f"runs/*/fold*/{FOLD_RECORD}")
                  if json.loads(p.read_text()).get("fold_table") == table_id)
