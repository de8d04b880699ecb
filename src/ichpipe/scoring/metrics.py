"""The competition metric: weighted multi-label log loss (``any`` weight 2, subtypes 1).

Score any predictions file against a labels file::

    python -m ichpipe score PRED.csv --labels data/stage_2_train.csv [--json]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit
from scipy.special import logit as scipy_logit
from sklearn.metrics import roc_auc_score

from ichpipe.base.errors import InputError
from ichpipe.base.label_csv import read_long_csv
from ichpipe.base.labels import LABEL_WEIGHTS, LABELS, WEIGHTS

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] before the log


def _bce(y_true: np.ndarray, y_pred: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(np.asarray(y_pred, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(y_true, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def log_loss_1d(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> float:
    """Mean binary log loss of one label's (N,) arrays, predictions clipped to [eps, 1 - eps]."""
    return float(_bce(y_true, y_pred, eps).mean())


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, in float64 (scipy's ``expit``)."""
    return expit(np.asarray(logits, dtype=np.float64))


def logit(probs: np.ndarray) -> np.ndarray:
    """Logits from probabilities, in float64 (scipy's ``logit``); 0 and 1 give -inf and inf."""
    return scipy_logit(np.asarray(probs, dtype=np.float64))


def prior(labels: np.ndarray | pd.DataFrame) -> np.ndarray:
    """The prevalence of each label column: the prior-only prediction every model is compared with."""
    return np.asarray(labels, dtype=np.float64).mean(axis=0)


def auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of one label; NaN where the labels hold one class only (AUC is undefined there)."""
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> float:
    """Σ w·BCE / Σ w over every (image, label) pair of (N, 6) arrays in Kaggle's label order."""
    y_true = np.asarray(y_true)
    if y_true.ndim != 2 or y_true.shape[1] != len(LABELS) or y_true.shape != np.shape(y_pred):
        raise ValueError(f"expected two (N, {len(LABELS)}) arrays, got {y_true.shape} and {np.shape(y_pred)}")
    losses = _bce(y_true, y_pred, eps)
    return float((losses * WEIGHTS).sum() / (WEIGHTS.sum() * len(y_true)))


def per_class_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> dict[str, float]:
    """Mean (unweighted) log loss of each label column, keyed by label name."""
    losses = _bce(y_true, y_pred, eps)
    return {name: float(losses[:, i].mean()) for i, name in enumerate(LABELS)}


def score_long(pred_ids, pred_values, label_of: dict[str, float], eps: float = EPS) -> dict:
    """Score long-form predictions; every row id must have a label."""
    labels = np.array([label_of[i] for i in pred_ids], dtype=np.float64)
    names = np.array([i.rpartition("_")[2] for i in pred_ids])
    w = np.array([LABEL_WEIGHTS[n] for n in names])
    losses = _bce(labels, pred_values, eps)
    per_class = {n: float(losses[names == n].mean()) for n in LABELS if (names == n).any()}
    return {"weighted_log_loss": float((w * losses).sum() / w.sum()), "per_class": per_class,
            "n_rows": len(losses)}


def score_files(pred_path: str, labels_path: str, eps: float = EPS) -> dict:
    """Score an ``ID,Label`` predictions file against an ``ID,Label`` labels file."""
    pred = read_long_csv(pred_path)
    truth = read_long_csv(labels_path)
    bad = ~truth["Label"].isin([0.0, 1.0])
    if bad.any():
        raise InputError(f"{labels_path}: {int(bad.sum())} labels are not 0 or 1, e.g. "
                         f"{truth.loc[bad, 'ID'].iloc[0]}={truth.loc[bad, 'Label'].iloc[0]:g}")
    if pred["Label"].isna().any():
        raise InputError(f"{pred_path}: non-numeric or empty Label, e.g. "
                         f"{pred.loc[pred['Label'].isna(), 'ID'].head(5).tolist()}")
    label_of = dict(zip(truth["ID"], truth["Label"], strict=True))
    missing = ~pred["ID"].isin(label_of.keys())
    if missing.any():
        raise InputError(f"{pred_path}: {int(missing.sum())} predicted IDs have no label in {labels_path}, "
                         f"e.g. {pred.loc[missing, 'ID'].head(5).tolist()}")
    result = score_long(pred["ID"].tolist(), pred["Label"].to_numpy(), label_of, eps)
    result["n_images"] = int(pred["image_id"].nunique())
    return result


def format_scores(result: dict) -> str:
    lines = [f"weighted log loss: {result['weighted_log_loss']:.5f}  ({result['n_images']} images, {result['n_rows']} "
             "rows)"]
    lines += [f"  {name:<17} {loss:.5f}" for name, loss in result["per_class"].items()]
    return "\n".join(lines)


@dataclass
class OperatingPoint:
    threshold: float
    recall: float
    precision: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int


def threshold_for_recall(y: np.ndarray, p: np.ndarray, target: float) -> OperatingPoint:
    """The highest threshold (predict positive when p >= t) whose recall reaches ``target``."""
    y = np.asarray(y) > 0.5
    positives = np.sort(p[y])[::-1]
    if not len(positives):
        raise ValueError("no positive examples: recall is undefined")
    k = max(1, math.ceil(target * len(positives) - 1e-9))
    t = float(positives[k - 1])
    tp, fp, tn, fn = confusion(y, p >= t)
    return OperatingPoint(t, tp / (tp + fn), tp / max(tp + fp, 1), tn / max(tn + fp, 1), tp, fp, tn, fn)


def confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) of 0/1 (or boolean) predictions ``pred`` against labels ``y``."""
    y, pred = np.asarray(y) > 0.5, np.asarray(pred, bool)
    return int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & ~y).sum()), int((~pred & y).sum())

