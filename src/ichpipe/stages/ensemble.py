"""Ensembles of experiments: several model families, one submission (``scripts/06_ensemble.py``).

Each member is an experiment whose stage 5 has run: ``runs/<member>/blend/oof_predictions.parquet`` and
``test_predictions.parquet`` hold its models' probabilities (``ensemble.member_model`` picks which,
``blend`` by default). Members must have been trained on the fold table of today's metadata (every
fold's ``folds.json``; refused otherwise: their OOF rows would not be out-of-fold for each other),
and must hold a prediction for every labelled image (aligned by image id, never by row order).

Combiners, each scored out of fold on the same folds:

``mean``
    the members' probabilities averaged.
``weights``
    per-class non-negative weights summing to 1 (scipy's SLSQP on the class's log loss), in
    probability or logit space. Cross-fitted: fold k's predictions use weights fitted on the other
    folds only, so its CV is not the in-sample optimum. The space is picked by that CV; the test set
    uses weights fitted on every fold.
``stacker``
    a second-level model per class (``ensemble.stacker.model``: scikit-learn's L2 logistic regression,
    the default, or ``HistGradientBoostingClassifier`` for large sets) on each member's six logits for the slice,
    for its neighbours at z±1 and z±2 in the series (the edge slice repeated), and the series' max and mean. Fold
    k's predictions come from a stacker trained on the other folds; the test set gets the mean of those fold
    stackers.

The final model is ``ensemble.final`` (``auto``: the lowest OOF loss among the combiners and the
members, so an ensemble never submits something worse out of fold than its best member). Writes::

    runs/<ensemble.name>/blend/             replaced as one folder: cv.md, cv.json (the CV table: every member,
                                             every combiner, the final), oof_ and test_predictions.parquet,
                                             submissions.json, config.yaml
    submissions/<date>_<ensemble.name>_cv<oof>.csv.gz   validated; the YAML beside it names the
                                             members, their weights and the combiner
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ichpipe.base.config import Config, to_dict
from ichpipe.base.errors import InputError
from ichpipe.base.files import writer_lock
from ichpipe.base.label_csv import long_to_wide, read_long_csv
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import blend_dir, data_paths, neighbour_positions, read_metadata, work_dir_id, z_order
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.metrics import EPS, log_loss_1d, logit, sigmoid
from ichpipe.scoring.metrics import prior as prior_of
from ichpipe.scoring.results import PREDICTION_FILES, Scores, format_table, git_state, score, write_results
from ichpipe.scoring.submission import fill_missing, sample_image_ids, submissions_dir, sweep_leftovers, write_checked


def load_member(cfg: Config, member: str, model: str, where: str) -> pd.DataFrame:
    """One member's probabilities of ``model`` on ``where`` (oof | test): image_id index, six columns."""
    path = blend_dir(cfg, member) / PREDICTION_FILES[where]
    if not path.exists():
        raise InputError(f"{path}: not found; run `make submission experiment={member}` (stage 5) for that member")
    table = pd.read_parquet(path)
    if model not in set(table.model):
        raise InputError(f"{path}: no model {model!r} (has {', '.join(sorted(set(table.model)))}); "
                         f"set ensemble.member_model")
    frame = table[table.model == model].set_index("image_id")[list(LABELS)].astype(np.float64)
    if frame.index.has_duplicates:
        raise InputError(f"{path}: image {frame.index[frame.index.duplicated()][0]} appears twice for {model}")
    return frame


def aligned(frames: dict[str, pd.DataFrame], index: pd.Index, where: str) -> np.ndarray:
    """(members, N, 6) probabilities in the row order of ``index``; a member missing an image is an error."""
    out = []
    for name, frame in frames.items():
        missing = index.difference(frame.index)
        if len(missing):
            raise InputError(f"member {name}: no {where} prediction for {len(missing)} of {len(index)} images "
                             f"(e.g. {missing[0]}); its stage 5 ran on other metadata: run it again")
        out.append(frame.loc[index].to_numpy())
    return np.stack(out)


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


def neighbour_features(probs: np.ndarray, rows: pd.DataFrame, offsets: list[int]) -> np.ndarray:
    """Stacker features of each row: per member, the six logits of the slice, of its neighbours at each
    offset (± along z, the series' edge slice repeated) and the series' max and mean.

    ``probs``: (M, N, 6); ``rows``: N metadata rows (series keys, ``slice_index``) in the same order.
    """
    lg = logit(np.clip(probs, EPS, 1 - EPS))  # (M, N, 6)
    sorted_rows, first, last = z_order(rows)
    starts = np.unique(first)
    ends = np.r_[starts[1:], len(sorted_rows)]
    blocks = [lg[:, sorted_rows]]
    for d in offsets:
        for s in (-d, d):
            blocks.append(lg[:, sorted_rows[neighbour_positions(len(sorted_rows), s, first, last)]])
    for reduce in (np.maximum, np.add):
        agg = reduce.reduceat(lg[:, sorted_rows], starts, axis=1)
        if reduce is np.add:
            agg = agg / (ends - starts)[None, :, None]
        blocks.append(np.repeat(agg, ends - starts, axis=1))
    feats = np.concatenate(blocks, axis=2)  # (M, N sorted, 6 x blocks)
    feats = np.transpose(feats, (1, 0, 2)).reshape(len(rows), -1)
    out = np.empty_like(feats)
    out[sorted_rows] = feats
    return out


def _stacker(cfg, seed: int):
    s = cfg.ensemble.stacker
    if s.model == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=s.c, max_iter=2000))
    if s.model == "hgb":
        return HistGradientBoostingClassifier(max_iter=s.max_iter, learning_rate=s.learning_rate,
                                              max_leaf_nodes=s.max_leaf_nodes, min_samples_leaf=s.min_samples_leaf,
                                              l2_regularization=s.l2_regularization, early_stopping=False,
                                              random_state=seed)
    raise InputError(f"ensemble.stacker.model={s.model!r}: logistic or hgb")


def fit_stacker(cfg: Config, x: np.ndarray, y: np.ndarray, folds: np.ndarray, x_test: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted OOF (each fold from stackers trained on the others) and test (their mean) probabilities."""
    oof = np.full(y.shape, np.nan)
    test = np.zeros((len(x_test), len(LABELS)))
    fold_values = np.unique(folds)
    for c in range(len(LABELS)):
        for k in fold_values:
            train = folds != k
            if y[train, c].min() == y[train, c].max():  # one class only: the training prevalence
                oof[folds == k, c] = y[train, c].mean()
                test[:, c] += y[train, c].mean() / len(fold_values)
                continue
            model = _stacker(cfg, cfg.seed + int(k)).fit(x[train], y[train, c])
            oof[folds == k, c] = model.predict_proba(x[folds == k])[:, 1]
            test[:, c] += model.predict_proba(x_test)[:, 1] / len(fold_values)
    return oof, test


@dataclass
class _Members:
    """The members' predictions, aligned: (members, rows, 6) arrays over the labelled and the test images."""

    names: list[str]
    labelled: pd.DataFrame  # the metadata's labelled rows, indexed by image id
    test_rows: pd.DataFrame  # the metadata's rows of the test images, in test_index order
    oof: np.ndarray
    test: np.ndarray
    test_index: pd.Index


def run_ensemble(cfg: Config, today: dt.date | None = None) -> EnsembleResult:
    """Combine the members of ``cfg.ensemble``; CV table, predictions and a validated submission."""
    members = _members(cfg)
    with writer_lock(data_paths(cfg).runs / cfg.ensemble.name, f"make ensemble {cfg.ensemble.name}"):
        loaded = _load_members(cfg, members)
        oof, test, detail = _combine_members(cfg, loaded)
        return _write_results(cfg, loaded, oof, test, detail, today)


def _members(cfg: Config) -> list[str]:
    """The members, each once: at least two."""
    ecfg = cfg.ensemble
    members = list(dict.fromkeys(ecfg.members))
    if len(members) < 2:
        raise InputError(f"ensemble.members: {members or 'none'}; name at least two experiments "
                         f"(make ensemble EXPERIMENTS=\"demo demo_mobilenet\")")
    return members  # the combiners, the final choice and the weight space are checked with the config


def _load_members(cfg: Config, members: list[str]) -> _Members:
    """Every member's stage-5 predictions, on today's folds, over the same images."""
    ecfg = cfg.ensemble
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    labelled = meta[meta.fold.notna()].set_index("image_id")
    for name in members:
        runs = sorted((paths.runs / name).glob("fold*/"))
        if not runs:
            raise InputError(f"{paths.runs / name}: no run folders; train experiment {name} first")
        check_fold_table(runs, meta)  # every member on today's folds, hence on the same folds

    oof_frames = {m: load_member(cfg, m, ecfg.member_model, "oof") for m in members}
    test_frames = {m: load_member(cfg, m, ecfg.member_model, "test") for m in members}
    test_index = test_frames[members[0]].index
    for name, frame in test_frames.items():
        if not frame.index.sort_values().equals(test_index.sort_values()):
            raise InputError(f"member {name}: its test predictions cover {len(frame)} images, "
                             f"{members[0]}'s {len(test_index)}; run stage 5 of both on the same metadata")
    return _Members(members, labelled, meta.set_index("image_id").loc[test_index],
                    aligned(oof_frames, labelled.index, "OOF"), aligned(test_frames, test_index, "test"), test_index)


def _combine_members(cfg: Config, m: _Members) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """OOF and test probabilities of each member and each combiner (cross-fitted out of fold), and what each
    combiner fitted."""
    ecfg = cfg.ensemble
    y = m.labelled[list(LABELS)].to_numpy(np.float64)
    folds = m.labelled.fold.to_numpy(int)
    oof: dict[str, np.ndarray] = {name: m.oof[i] for i, name in enumerate(m.names)}
    test: dict[str, np.ndarray] = {name: m.test[i] for i, name in enumerate(m.names)}
    detail: dict = {}
    if "mean" in ecfg.combiners:
        oof["mean"], test["mean"] = m.oof.mean(axis=0), m.test.mean(axis=0)
    if "weights" in ecfg.combiners:
        spaces = ["prob", "logit"] if ecfg.weight_space == "auto" else [ecfg.weight_space]
        cross: dict[str, np.ndarray] = {}
        for space in spaces:
            cross[space] = np.empty_like(y)
            for k in np.unique(folds):
                w = fit_weights(m.oof[:, folds != k], y[folds != k], space)
                cross[space][folds == k] = apply_weights(m.oof[:, folds == k], w, space)
        losses = {s: score({"w": pd.DataFrame(p, columns=list(LABELS))},
                           pd.DataFrame(y, columns=list(LABELS)))["w"].weighted for s, p in cross.items()}
        space = min(losses, key=losses.get)
        weights = fit_weights(m.oof, y, space)
        oof["weights"], test["weights"] = cross[space], apply_weights(m.test, weights, space)
        detail["weights"] = {"space": space, "cv_by_space": losses,
                             "per_class": {c: {name: round(float(weights[i, j]), 4) for i, name in enumerate(m.names)}
                                           for j, c in enumerate(LABELS)}}
    if "stacker" in ecfg.combiners:
        offsets = list(ecfg.stacker.neighbours)
        x = neighbour_features(m.oof, m.labelled, offsets)
        x_test = neighbour_features(m.test, m.test_rows, offsets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            oof["stacker"], test["stacker"] = fit_stacker(cfg, x, y, folds, x_test)
        detail["stacker"] = {"model": ecfg.stacker.model, "features": int(x.shape[1]), "neighbours": offsets}
    return oof, test, detail


@dataclass(frozen=True)
class EnsembleResult:
    scores: Scores  # "oof" (and "test") -> every member, every combiner and "final" -> Score
    final: str  # the submitted combiner or member
    path: Path  # its submission
    table: str  # the CV table, Markdown
    cv_dir: Path  # runs/<ensemble.name>/blend
    detail: dict  # what the combiners fitted (per-class weights, the stacker's features), as cv.json holds it
    members: list[str]


def _write_results(cfg: Config, m: _Members, oof: dict[str, np.ndarray], test: dict[str, np.ndarray], detail: dict,
                   today: dt.date | None) -> EnsembleResult:
    """Scores, the final choice, the CV table, prediction tables and the validated submission."""
    ecfg, paths, members = cfg.ensemble, data_paths(cfg), m.names
    clip = cfg.blend.clip
    index, test_index = m.labelled.index, m.test_index
    preds_oof = {k: pd.DataFrame(np.clip(p, clip, 1 - clip), index=index, columns=list(LABELS)) for k, p in oof.items()}
    preds_test = {k: pd.DataFrame(np.clip(p, clip, 1 - clip), index=test_index, columns=list(LABELS))
                  for k, p in test.items()}
    truth = m.labelled[list(LABELS)]
    scores = {"oof": score(preds_oof, truth)}
    # auto: the lowest OOF loss among the combiners and the members themselves, so that an ensemble
    # no combiner of which beats its best member submits that member rather than something worse
    final = ecfg.final if ecfg.final != "auto" else min([*ecfg.combiners, *members],
                                                        key=lambda c: scores["oof"][c].weighted)
    preds_oof["final"], preds_test["final"] = preds_oof[final], preds_test[final]
    scores["oof"]["final"] = scores["oof"][final]
    if paths.test_labels_csv.exists():
        truth_test = long_to_wide(read_long_csv(paths.test_labels_csv), paths.test_labels_csv)
        scores["test"] = score(preds_test, truth_test, complete=False)

    sample_ids = sample_image_ids(paths)
    out_dir = submissions_dir(cfg)
    sweep_leftovers(out_dir, ecfg.name)
    cv = scores["oof"]["final"].weighted
    path = out_dir / f"{(today or dt.date.today()).isoformat()}_{ecfg.name}_cv{cv:.4f}.csv.gz"
    sub, filled = fill_missing(preds_test["final"], sample_ids, prior_of(truth))
    if filled > cfg.preprocess.max_bad_fraction * len(sample_ids):
        raise InputError(f"{paths.sample_submission_csv}: {filled} of {len(sample_ids)} test images have no "
                         f"prediction in the members; run their stage 5 on today's metadata")
    info = {"file": path.name, "experiment": ecfg.name, "model": "final", "combiner": final,
            "work_dir": work_dir_id(cfg),
            "created": dt.datetime.now().isoformat(timespec="seconds"), "git": git_state(),
            "members": {k: {"model": ecfg.member_model, "oof": scores["oof"][k].weighted} for k in members},
            "detail": detail, "cv": {w: s["final"].to_json() for w, s in scores.items()},
            "cv_table": {w: {k: s[k].weighted for k in s} for w, s in scores.items()},
            "images_filled_with_prior": filled, "config": to_dict(cfg)}
    written = write_checked(sub, path, paths.sample_submission_csv, info)
    path = written.path
    out = blend_dir(cfg, ecfg.name)
    title = f"# Ensemble {ecfg.name}: {' + '.join(members)} ({ecfg.member_model} of each); final = {final}\n\n"
    write_results(out, cfg, title, scores, {"final": final, "members": members, "detail": detail}, preds_oof,
                  preds_test, {"final": {"file": str(path), "sha256": written.sha256}})
    return EnsembleResult(scores, final, path, format_table(scores), out, detail, members)
