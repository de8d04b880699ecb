"""An ensemble's fitted combiners over its members' probabilities, each cross-fitted by the outer folds: fold k's
rows are predicted by a combiner fitted on the other folds' rows only, so its out-of-fold score is not an in-sample
optimum; the test set gets the mean of the fold combiners, and each fold's test view (``by_fold``, what a
pseudo-label round of fold k trains on) its own fold's combiner, on the members' fold-k test predictions.

``fit_weights``
    per-class non-negative weights summing to 1 (scipy's SLSQP on the class's log loss), in probability or logit
    space.
``fit_stacker``
    a second-level model per class (scikit-learn's L2 logistic regression, or HistGradientBoosting) on each
    member's six logits at the slice and its neighbours, and the series' max and mean.
``fit_context``
    the 3rd and 11th places' context stacker: LightGBM per class over every member's six probabilities (as logits)
    at z±1..k, the slice's relative position, the series length and the series' max and mean; it boosts from the
    members' mean (the mean's logit is its initial score, so the trees learn a correction to the mean and none at
    all when nothing helps) and stops early on an inner split of the training patients, whose models it averages.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import neighbour_positions, z_order
from ichpipe.scoring.folds import assign_folds
from ichpipe.scoring.metrics import EPS, log_loss_1d, logit, sigmoid


@dataclass
class Fitted:
    """A combiner's predictions: OOF (N, 6), test (T, 6), and per fold the test view of that fold's combiner."""

    oof: np.ndarray
    test: np.ndarray
    by_fold: dict[int, np.ndarray]


def _combine(members: np.ndarray, w: np.ndarray, space: str) -> np.ndarray:
    """(M, N) probabilities of one class, weights (M,) → (N,) combined probabilities."""
    if space == "logit":
        return sigmoid(np.tensordot(w, logit(np.clip(members, EPS, 1 - EPS)), axes=1))
    return np.tensordot(w, members, axes=1)


def fit_weights(members: np.ndarray, y: np.ndarray, space: str) -> np.ndarray:
    """(M, N, 6) member probabilities, (N, 6) labels → (M, 6) per-class weights, ≥ 0 and summing to 1."""
    m = members.shape[0]
    out = np.empty((m, len(LABELS)))
    for c in range(len(LABELS)):
        start = np.full(m, 1.0 / m)
        result = minimize(lambda w, c=c: log_loss_1d(y[:, c], _combine(members[:, :, c], w, space)), start,
                          method="SLSQP", bounds=[(0.0, 1.0)] * m,
                          constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},))
        w = np.clip(result.x if result.success else start, 0.0, None)
        out[:, c] = w / w.sum()
    return out


def apply_weights(members: np.ndarray, weights: np.ndarray, space: str) -> np.ndarray:
    return np.stack([_combine(members[:, :, c], weights[:, c], space) for c in range(len(LABELS))], axis=1)


def cross_fit_weights(oof: np.ndarray, y: np.ndarray, folds: np.ndarray, space: str, test: np.ndarray,
                      by_fold: dict[int, np.ndarray] | None = None) -> tuple[Fitted, np.ndarray]:
    """Per-class weights cross-fitted: fold k's rows (and its test view) weighted by weights fitted on the other
    folds; the test set by weights fitted on every fold (also returned)."""
    cross = np.empty_like(y)
    views = {}
    for k in np.unique(folds):
        w = fit_weights(oof[:, folds != k], y[folds != k], space)
        cross[folds == k] = apply_weights(oof[:, folds == k], w, space)
        if by_fold is not None:
            views[int(k)] = apply_weights(by_fold[int(k)], w, space)
    weights = fit_weights(oof, y, space)
    return Fitted(cross, apply_weights(test, weights, space), views), weights


def _neighbour_matrix(probs: np.ndarray, rows: pd.DataFrame, offsets: list[int], dtype, extra: int = 0) -> np.ndarray:
    """(N, M x 6 x (3 + 2 len(offsets)) + ``extra``) of ``dtype``: per member, the six logits of the slice, of its
    neighbours at each offset (± along z, the series' edge slice repeated) and the series' max and mean; written
    member by member and block by block (no copy of the whole matrix); the last ``extra`` columns left to fill."""
    members, n = probs.shape[0], probs.shape[1]
    width = 6 * (3 + 2 * len(offsets))
    out = np.empty((n, members * width + extra), dtype)
    sorted_rows, first, last = z_order(rows)
    starts = np.unique(first)
    ends = np.r_[starts[1:], n]
    for j in range(members):
        lg = logit(np.clip(probs[j], EPS, 1 - EPS))[sorted_rows]  # (N in z order, 6)
        blocks = [lg]
        for d in offsets:
            blocks += [lg[neighbour_positions(n, -d, first, last)], lg[neighbour_positions(n, d, first, last)]]
        blocks += [np.repeat(np.maximum.reduceat(lg, starts, axis=0), ends - starts, axis=0),
                   np.repeat(np.add.reduceat(lg, starts, axis=0) / (ends - starts)[:, None], ends - starts, axis=0)]
        for b, values in enumerate(blocks):
            out[sorted_rows, j * width + 6 * b: j * width + 6 * (b + 1)] = values
    return out


def neighbour_features(probs: np.ndarray, rows: pd.DataFrame, offsets: list[int]) -> np.ndarray:
    """Stacker features of each row: per member, the six logits of the slice, of its neighbours at each
    offset (± along z, the series' edge slice repeated) and the series' max and mean.

    ``probs``: (M, N, 6); ``rows``: N metadata rows (series keys, ``slice_index``) in the same order.
    """
    return _neighbour_matrix(probs, rows, offsets, logit(np.clip(probs[:0], EPS, 1 - EPS)).dtype)


def position_features(rows: pd.DataFrame) -> np.ndarray:
    """(N, 2): each slice's relative position in its series (0 first, 1 last; 0.5 alone) and the series length."""
    sorted_rows, first, last = z_order(rows)
    length = (last - first + 1).astype(np.float32)
    position = np.where(length > 1, (np.arange(len(sorted_rows)) - first) / np.maximum(length - 1, 1), 0.5)
    out = np.empty((len(rows), 2), np.float32)
    out[sorted_rows] = np.stack([position, length], axis=1)
    return out


def context_features(probs: np.ndarray, rows: pd.DataFrame, k: int) -> np.ndarray:
    """The context stacker's features, float32: :func:`neighbour_features` at z±1..k (the same columns), then
    :func:`position_features`. Written block by block into one array: at the real size (750k slices, two members,
    k = 20: 1.6 GB) no float64 copy of the whole matrix is made."""
    out = _neighbour_matrix(probs, rows, list(range(1, k + 1)), np.float32, extra=2)
    out[:, -2:] = position_features(rows)
    return out


def _stacker(cfg, seed: int):
    """``cfg``: the ensemble's StackerConfig."""
    if cfg.model == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=2000))
    if cfg.model == "hgb":
        return HistGradientBoostingClassifier(max_iter=cfg.max_iter, learning_rate=cfg.learning_rate,
                                              max_leaf_nodes=cfg.max_leaf_nodes, min_samples_leaf=cfg.min_samples_leaf,
                                              l2_regularization=cfg.l2_regularization, early_stopping=False,
                                              random_state=seed)
    raise InputError(f"ensemble.stacker.model={cfg.model!r}: logistic or hgb")


def fit_stacker(cfg, seed: int, x: np.ndarray, y: np.ndarray, folds: np.ndarray, x_test: np.ndarray,
                x_by_fold: dict[int, np.ndarray] | None = None) -> Fitted:
    """Cross-fitted OOF (each fold from stackers trained on the others), test (their mean) and each fold's test
    view probabilities of the StackerConfig ``cfg``'s model."""
    oof = np.full(y.shape, np.nan)
    test = np.zeros((len(x_test), len(LABELS)))
    views = {int(k): np.zeros((len(v), len(LABELS))) for k, v in (x_by_fold or {}).items()}
    fold_values = np.unique(folds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for c in range(len(LABELS)):
            for k in fold_values:
                train = folds != k
                model = None
                if y[train, c].min() != y[train, c].max():  # one class only: the training prevalence
                    model = _stacker(cfg, seed + int(k)).fit(x[train], y[train, c])
                prevalence = y[train, c].mean()

                def predict(a: np.ndarray, model=model, prevalence=prevalence) -> np.ndarray:
                    return np.full(len(a), prevalence) if model is None else model.predict_proba(a)[:, 1]

                oof[folds == k, c] = predict(x[folds == k])
                test[:, c] += predict(x_test) / len(fold_values)
                if int(k) in views:
                    views[int(k)][:, c] = predict(x_by_fold[int(k)])
    return Fitted(oof, test, views)


def lgb_params(cfg, seed: int, threads: int) -> dict:
    """LightGBM's parameters from the ensemble's ContextConfig ``cfg``: small regularised trees, deterministic."""
    return {"objective": "binary", "learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves,
            "min_data_in_leaf": cfg.min_data_in_leaf, "feature_fraction": cfg.feature_fraction,
            "bagging_fraction": cfg.bagging_fraction, "bagging_freq": 1 if cfg.bagging_fraction < 1 else 0,
            "lambda_l2": cfg.lambda_l2, "max_bin": 63, "seed": seed, "deterministic": True, "force_row_wise": True,
            "num_threads": threads, "verbose": -1}


def _boosted(cfg, seed: int, threads: int, x: np.ndarray, base: np.ndarray, y: np.ndarray, groups: np.ndarray):
    """One class's inner models (one per inner group: trained on the other groups, stopped early on its own);
    returns a function of (features, base logits) → probabilities, their mean, and the rounds each kept."""
    import lightgbm as lgb  # imported when a context stacker is fitted, not with the ensemble stage

    boosters = []
    for j in np.unique(groups):
        fit, stop = groups != j, groups == j
        if y[fit].min() == y[fit].max():
            continue  # nothing to learn from: this inner model is the mean
        train = lgb.Dataset(x[fit], y[fit], init_score=base[fit], free_raw_data=True)
        valid = lgb.Dataset(x[stop], y[stop], init_score=base[stop], reference=train)
        boosters.append(lgb.train(lgb_params(cfg, seed + int(j), threads), train, cfg.max_rounds, valid_sets=[valid],
                                  callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)]))

    def predict(a: np.ndarray, a_base: np.ndarray) -> np.ndarray:
        if not boosters:
            return sigmoid(a_base)
        return np.mean([sigmoid(a_base + b.predict(a, raw_score=True, num_iteration=b.best_iteration))
                        for b in boosters], axis=0)

    return predict, [int(b.best_iteration) for b in boosters]


def fit_context(cfg, seed: int, threads: int, x: np.ndarray, base: np.ndarray, y: np.ndarray, folds: np.ndarray,
                patients: np.ndarray, x_test: np.ndarray, base_test: np.ndarray,
                by_fold: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[Fitted, dict]:
    """The context stacker, cross-fitted by the outer folds (``folds``): per fold k and class, LightGBM boosted from
    ``base`` (the members' mean logits, (N, 6)) on the other folds' rows, stopped early on ``cfg.inner_folds`` inner
    patient groups of them (their models averaged). Returns the predictions and, per class, the boosting rounds
    kept (a class whose trees stop at once is the mean)."""
    oof = np.full(y.shape, np.nan)
    test = np.zeros((len(x_test), len(LABELS)))
    views = {int(k): np.zeros((len(v[0]), len(LABELS))) for k, v in (by_fold or {}).items()}
    rounds: dict[str, list[int]] = {c: [] for c in LABELS}
    fold_values = np.unique(folds)
    for k in fold_values:
        train = folds != k
        frame = pd.DataFrame(y[train], columns=list(LABELS)).assign(PatientID=patients[train])
        groups = assign_folds(frame, min(cfg.inner_folds, frame.PatientID.nunique()), seed + int(k)).to_numpy()
        for c, name in enumerate(LABELS):
            predict, kept = _boosted(cfg, seed + 100 * int(k) + 10 * c, threads, x[train], base[train, c],
                                     y[train, c], groups)
            rounds[name] += kept
            oof[folds == k, c] = predict(x[folds == k], base[folds == k, c])
            test[:, c] += predict(x_test, base_test[:, c]) / len(fold_values)
            if int(k) in views:
                views[int(k)][:, c] = predict(by_fold[int(k)][0], by_fold[int(k)][1][:, c])
    return Fitted(oof, test, views), rounds
