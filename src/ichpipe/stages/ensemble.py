"""Ensembles of experiments: several model families, one submission (``scripts/06_ensemble.py``).

Each member is an experiment whose stage 5 has run (a bag of seeds included):
``runs/<member>/blend/oof_predictions.parquet`` and ``test_predictions.parquet`` hold its models' probabilities
(``ensemble.member_model`` picks which, ``blend`` by default). Members must have been trained on the fold table of
today's metadata (every run folder's ``folds.json``; refused otherwise: their OOF rows would not be out-of-fold for
each other), and must hold a prediction for every labelled image (aligned by image id, never by row order).

Combiners, each scored out of fold on the same folds, each fitted on the other folds' rows only for fold k
(src/ichpipe/fitting/stackers.py):

``mean``
    the members' probabilities averaged.
``weights``
    per-class non-negative weights summing to 1, in probability or logit space (``ensemble.weight_space``; auto:
    the space of the lower CV). The test set uses weights fitted on every fold.
``stacker``
    a logistic regression (or HistGradientBoosting) per class on each member's six logits for the slice, its
    neighbours at ``ensemble.stacker.neighbours`` and the series' max and mean.
``context``
    the 3rd and 11th places' context stacker: LightGBM per class over every member's probabilities at z±1..k
    (``ensemble.context.neighbours``), the slice's position and the series length, boosted from the members' mean
    and stopped early on inner patient groups.
``sequence``
    the 1st place's: a sequence model (stage 4's, ``ensemble.sequence``) over every member's per-slice embeddings
    (each projected on its own) and logits side by side, trained fold by fold with stage 4's discipline: fold k's
    model sees only the members' fold-k CNNs (whose embeddings of fold k's patients are out of fold) and never fold
    k's labels. A bag member gives one block per seed. Written per fold to ``runs/<name>/fold<k>/sequence/``
    (resumable: a finished fold is kept unless its settings or its members' embeddings changed).

The final model is ``ensemble.final`` (``auto``: the lowest OOF loss among the combiners and the
members, so an ensemble never submits something worse out of fold than its best member). Writes::

    runs/<ensemble.name>/blend/             replaced as one folder: cv.md, cv.json (the CV table: every member,
                                             every combiner, the final), oof_ and test_predictions.parquet,
                                             test_by_fold.parquet (each fold's combiners on the members' fold-k
                                             test predictions, when every member has them), submissions.json,
                                             config.yaml
    submissions/<date>_<ensemble.name>_cv<oof>.csv.gz   validated; the YAML beside it names the
                                             members, their weights and the combiner
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from ichpipe.base.config import Config, describe_changes, may_replace, save_config, to_dict
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, save_torch, sweep_temp_files, write_text_atomic, writer_lock
from ichpipe.base.label_csv import long_to_wide, read_long_csv
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import blend_dir, data_paths, finished_dirs, read_metadata, work_dir_id
from ichpipe.fitting import sequence_fit
from ichpipe.fitting.stackers import (
    Fitted,
    context_features,
    cross_fit_weights,
    fit_context,
    fit_stacker,
    neighbour_features,
)
from ichpipe.scoring.folds import check_fold_table, fold_table_id
from ichpipe.scoring.metrics import EPS, logit
from ichpipe.scoring.metrics import prior as prior_of
from ichpipe.scoring.results import (
    BY_FOLD_FILE,
    PREDICTION_FILES,
    Scores,
    format_table,
    git_state,
    score,
    write_results,
)
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


def member_by_fold(cfg: Config, member: str, model: str) -> dict[int, pd.DataFrame] | None:
    """Each fold's test probabilities of a member's ``model`` (its stage 5's ``test_by_fold.parquet``), or None when
    its stage 5 did not write them."""
    path = blend_dir(cfg, member) / BY_FOLD_FILE
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    table = table[table.model == model]
    return {int(k): g.set_index("image_id")[list(LABELS)].astype(np.float64) for k, g in table.groupby("fold")}


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


def member_runs(runs: Path, member: str) -> list[Path]:
    """A member's run folders (``fold<k>``), per seed for a bag of seeds (``seed<s>/fold<k>``)."""
    return sorted([*(runs / member).glob("fold*/"), *(runs / member).glob("seed*/fold*/")])


@dataclass
class _Members:
    """The members' predictions, aligned: (members, rows, 6) arrays over the labelled and the test images."""

    names: list[str]
    meta: pd.DataFrame  # today's metadata
    labelled: pd.DataFrame  # the metadata's labelled rows, indexed by image id
    test_rows: pd.DataFrame  # the metadata's rows of the test images, in test_index order
    oof: np.ndarray
    test: np.ndarray
    test_index: pd.Index
    by_fold: dict[int, np.ndarray] | None  # fold -> (members, T, 6): each fold's test view; None if one lacks it


def run_ensemble(cfg: Config, today: dt.date | None = None, progress: bool = True) -> EnsembleResult:
    """Combine the members of ``cfg.ensemble``; CV table, predictions and a validated submission."""
    members = _members(cfg)
    with writer_lock(data_paths(cfg).runs / cfg.ensemble.name, f"make ensemble {cfg.ensemble.name}"):
        loaded = _load_members(cfg, members)
        fitted, detail = _combine_members(cfg, loaded, progress)
        return _write_results(cfg, loaded, fitted, detail, today)


def _members(cfg: Config) -> list[str]:
    """The members, each once: at least two."""
    ecfg = cfg.ensemble
    members = list(dict.fromkeys(ecfg.members))
    if len(members) < 2:
        raise InputError(f"ensemble.members: {members or 'none'}; name at least two experiments "
                         f"(make ensemble EXPERIMENTS=\"demo demo_mobilenet\")")
    if ecfg.name in members:
        raise InputError(f"ensemble.name={ecfg.name}: also a member; give the ensemble a name of its own")
    return members  # the combiners, the final choice and the weight space are checked with the config


def _load_members(cfg: Config, members: list[str]) -> _Members:
    """Every member's stage-5 predictions, on today's folds, over the same images."""
    ecfg = cfg.ensemble
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    labelled = meta[meta.fold.notna()].set_index("image_id")
    for name in members:
        runs = member_runs(paths.runs, name)
        if not runs:
            raise InputError(f"{paths.runs / name}: no run folders; train experiment {name} first")
        _check_seeds(cfg, name)
        check_fold_table(runs, meta)  # every member on today's folds, hence on the same folds

    oof_frames = {m: load_member(cfg, m, ecfg.member_model, "oof") for m in members}
    test_frames = {m: load_member(cfg, m, ecfg.member_model, "test") for m in members}
    test_index = test_frames[members[0]].index
    for name, frame in test_frames.items():
        if not frame.index.sort_values().equals(test_index.sort_values()):
            raise InputError(f"member {name}: its test predictions cover {len(frame)} images, "
                             f"{members[0]}'s {len(test_index)}; run stage 5 of both on the same metadata")
    views = {m: member_by_fold(cfg, m, ecfg.member_model) for m in members}
    by_fold = None
    if all(v is not None for v in views.values()):
        folds = sorted(int(k) for k in labelled.fold.unique())
        by_fold = {k: aligned({m: v[k] for m, v in views.items() if k in v}, test_index, f"fold-{k} test")
                   for k in folds if all(k in v for v in views.values())}
        by_fold = by_fold if len(by_fold) == len(folds) else None
    return _Members(members, meta, labelled, meta.set_index("image_id").loc[test_index],
                    aligned(oof_frames, labelled.index, "OOF"), aligned(test_frames, test_index, "test"), test_index,
                    by_fold)


def _check_seeds(cfg: Config, member: str) -> None:
    """A bag of seeds as a member: every seed its stage 5 averaged must still have its run folder."""
    saved = blend_dir(cfg, member) / "config.yaml"
    seeds = (yaml.safe_load(saved.read_text()) or {}).get("seeds") if saved.exists() else None
    for seed in seeds or []:
        folder = data_paths(cfg).runs / member / f"seed{seed}"
        if not folder.is_dir():
            raise InputError(f"{folder}: seed {seed} of member {member}'s bag {seeds} has no run folder; train it "
                             f"again, or blend {member} without it (seeds=[...]) before the ensemble")


def _combine_members(cfg: Config, m: _Members, progress: bool) -> tuple[dict[str, Fitted], dict]:
    """OOF, test and per-fold test probabilities of each member and each combiner (cross-fitted out of fold), and
    what each combiner fitted."""
    ecfg = cfg.ensemble
    y = m.labelled[list(LABELS)].to_numpy(np.float64)
    folds = m.labelled.fold.to_numpy(int)
    views = m.by_fold or {}
    out: dict[str, Fitted] = {name: Fitted(m.oof[i], m.test[i], {k: v[i] for k, v in views.items()})
                              for i, name in enumerate(m.names)}
    detail: dict = {"test_by_fold": m.by_fold is not None}
    if "mean" in ecfg.combiners:
        out["mean"] = Fitted(m.oof.mean(axis=0), m.test.mean(axis=0), {k: v.mean(axis=0) for k, v in views.items()})
    if "weights" in ecfg.combiners:
        out["weights"], detail["weights"] = _weights(cfg, m, y, folds)
    if "stacker" in ecfg.combiners:
        offsets = list(ecfg.stacker.neighbours)
        x_views = {k: neighbour_features(v, m.test_rows, offsets) for k, v in views.items()} or None
        out["stacker"] = fit_stacker(ecfg.stacker, cfg.seed, neighbour_features(m.oof, m.labelled, offsets), y, folds,
                                     neighbour_features(m.test, m.test_rows, offsets), x_views)
        detail["stacker"] = {"model": ecfg.stacker.model, "neighbours": offsets}
    if "context" in ecfg.combiners:
        out["context"], detail["context"] = _context(cfg, m, y, folds)
    if "sequence" in ecfg.combiners:
        out["sequence"], detail["sequence"] = _sequence(cfg, m, progress)
    return out, detail


def _weights(cfg: Config, m: _Members, y: np.ndarray, folds: np.ndarray) -> tuple[Fitted, dict]:
    """Per-class weights, in the space of the lower cross-fitted CV when ``weight_space=auto``."""
    ecfg = cfg.ensemble
    spaces = ["prob", "logit"] if ecfg.weight_space == "auto" else [ecfg.weight_space]
    fits = {s: cross_fit_weights(m.oof, y, folds, s, m.test, m.by_fold) for s in spaces}
    truth = pd.DataFrame(y, columns=list(LABELS))
    losses = {s: score({"w": pd.DataFrame(f.oof, columns=list(LABELS))}, truth)["w"].weighted
              for s, (f, _) in fits.items()}
    space = min(losses, key=losses.get)
    fitted, weights = fits[space]
    return fitted, {"space": space, "cv_by_space": losses,
                    "per_class": {c: {name: round(float(weights[i, j]), 4) for i, name in enumerate(m.names)}
                                  for j, c in enumerate(LABELS)}}


def _context(cfg: Config, m: _Members, y: np.ndarray, folds: np.ndarray) -> tuple[Fitted, dict]:
    """The context stacker over every member at z ± 1..k, boosted from their mean."""
    ccfg = cfg.ensemble.context

    def base(probs: np.ndarray) -> np.ndarray:
        return logit(np.clip(probs.mean(axis=0), EPS, 1 - EPS))

    x = context_features(m.oof, m.labelled, ccfg.neighbours)
    views = {k: (context_features(v, m.test_rows, ccfg.neighbours), base(v)) for k, v in (m.by_fold or {}).items()}
    fitted, rounds = fit_context(ccfg, cfg.seed, cfg.data.workers, x, base(m.oof), y, folds,
                                 m.labelled.PatientID.to_numpy(), context_features(m.test, m.test_rows,
                                                                                   ccfg.neighbours),
                                 base(m.test), views or None)
    return fitted, {"neighbours": ccfg.neighbours, "features": int(x.shape[1]),
                    "rounds_median": {c: float(np.median(r)) if r else 0.0 for c, r in rounds.items()}}


# a finished fold of the sequence combiner made with other values of these: refused unless replace=true
SEQUENCE_KEYS = ("seed", "ensemble.members", "ensemble.member_model", "ensemble.sequence.")


def _sequence(cfg: Config, m: _Members, progress: bool) -> tuple[Fitted, dict]:
    """The sequence model over every member's embeddings, fold by fold (each fold resumable)."""
    paths = data_paths(cfg)
    oof = pd.DataFrame(np.nan, index=m.labelled.index, columns=list(LABELS))
    views, tests, written = {}, [], {}
    folds = sorted(int(k) for k in m.labelled.fold.unique())
    for k in tqdm(folds, desc=f"{cfg.ensemble.name}: sequence model per fold", disable=not progress):
        folders = _member_embeddings(paths.runs, m.names, k)
        target = paths.runs / cfg.ensemble.name / f"fold{k}" / "sequence"
        o, t = _sequence_fold(cfg, target, folders, m.meta, k, progress)
        oof.loc[o.index] = o.to_numpy()
        views[k] = t.loc[m.test_index].to_numpy()
        tests.append(views[k])
        written[k] = str(target)
    if oof.isna().any().any():
        raise InputError(f"{cfg.ensemble.name}: the sequence model has no OOF prediction for "
                         f"{int(oof.isna().any(axis=1).sum())} labelled images; embed every member on today's metadata")
    return Fitted(oof.to_numpy(), np.mean(tests, axis=0), views), {
        "blocks": [str(f) for f in _member_embeddings(paths.runs, m.names, folds[0])], "folds": written}


def _member_embeddings(runs: Path, members: list[str], fold: int) -> list[Path]:
    """The last finished embedding folder of fold ``fold`` of every member run (every seed of a bag)."""
    out = []
    for name in members:
        for run in [r for r in member_runs(runs, name) if r.name == f"fold{fold}"]:
            done = finished_dirs(run / "embeddings")
            if not done:
                raise InputError(f"{run}/embeddings: no finished embeddings of member {name}; the sequence combiner "
                                 f"reads every member's embeddings: run `make embed experiment={name} fold={fold}`")
            out.append(done[-1])
    return out


def _sequence_inputs(folders: list[Path], meta: pd.DataFrame) -> dict:
    """What a finished fold of the sequence combiner was made from: redone when it changes."""
    return {"folders": [str(f) for f in folders], "done_mtime_ns": [(f / "done").stat().st_mtime_ns for f in folders],
            "fold_table": fold_table_id(meta)}


def _sequence_fold(cfg: Config, target: Path, folders: list[Path], meta: pd.DataFrame, fold: int, progress: bool
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold ``fold``'s sequence model over the members' fold-k features: OOF and test probabilities (image id index);
    read back when finished with the same settings and inputs."""
    inputs = _sequence_inputs(folders, meta)
    if (target / "done").exists():
        changed = may_replace(target, cfg, SEQUENCE_KEYS, "the ensemble's sequence models")
        same = json.loads((target / "inputs.json").read_text()) == inputs if (target / "inputs.json").exists() else 0
        if not changed and same:
            return tuple(pd.read_parquet(target / f"{w}.parquet").set_index("image_id")[list(LABELS)]
                         for w in ("oof", "test"))
        if not changed:
            tqdm.write(f"{target}: redoing (the members' embeddings or the folds changed)")
        else:
            tqdm.write(f"{target}: redoing ({describe_changes(changed)})")
        (target / "done").unlink()
    lcfg = cfg.ensemble.sequence
    oof_feats = sequence_fit.member_features(folders, "oof", meta)
    test_feats = sequence_fit.member_features(folders, "test", meta)
    extra = None
    if lcfg.train_on != "oof":
        missing = [f for f in folders if not (f / "train_ids.csv").exists()]
        if missing:
            raise InputError(f"{missing[0]}: no training-patient embeddings; ensemble.sequence.train_on="
                             f"{lcfg.train_on} needs every member embedded with embed.train=true")
        extra = sequence_fit.member_features(folders, "train", meta)
    if lcfg.train_on == "train":
        o, t, history, keep = sequence_fit.fit_on_training_patients(lcfg, cfg.seed, cfg.train.amp, extra, oof_feats,
                                                                    test_feats)
    else:
        o, t, history, keep = sequence_fit.fit_nested(lcfg, cfg.seed, cfg.train.amp, oof_feats, test_feats, extra,
                                                      progress, f"fold {fold} inner folds")
    target.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(target)
    save_torch(keep, target / "models.pt")
    frames = {}
    for where, ids, probs in (("oof", oof_feats.ids, o), ("test", test_feats.ids, t)):
        frames[where] = pd.DataFrame(probs, index=pd.Index(ids, name="image_id"), columns=list(LABELS))
        with atomic_path(target / f"{where}.parquet") as tmp:
            frames[where].astype(np.float32).reset_index().to_parquet(tmp, index=False)
    with atomic_path(target / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    write_text_atomic(target / "inputs.json", json.dumps(inputs) + "\n")
    save_config(cfg, target / "config.yaml")
    write_text_atomic(target / "done", f"members={','.join(cfg.ensemble.members)}\n")
    return frames["oof"], frames["test"]


@dataclass(frozen=True)
class EnsembleResult:
    scores: Scores  # "oof" (and "test") -> every member, every combiner and "final" -> Score
    final: str  # the submitted combiner or member
    path: Path  # its submission
    table: str  # the CV table, Markdown
    cv_dir: Path  # runs/<ensemble.name>/blend
    detail: dict  # what the combiners fitted (per-class weights, the stackers' features), as cv.json holds it
    members: list[str]


def _write_results(cfg: Config, m: _Members, fitted: dict[str, Fitted], detail: dict, today: dt.date | None
                   ) -> EnsembleResult:
    """Scores, the final choice, the CV table, prediction tables and the validated submission."""
    ecfg, paths, members = cfg.ensemble, data_paths(cfg), m.names
    clip = cfg.blend.clip

    def frame(p: np.ndarray, index: pd.Index) -> pd.DataFrame:
        return pd.DataFrame(np.clip(p, clip, 1 - clip), index=index, columns=list(LABELS))

    preds_oof = {k: frame(f.oof, m.labelled.index) for k, f in fitted.items()}
    preds_test = {k: frame(f.test, m.test_index) for k, f in fitted.items()}
    truth = m.labelled[list(LABELS)]
    scores = {"oof": score(preds_oof, truth)}
    # auto: the lowest OOF loss among the combiners and the members themselves, so that an ensemble
    # no combiner of which beats its best member submits that member rather than something worse
    final = ecfg.final if ecfg.final != "auto" else min([*ecfg.combiners, *members],
                                                        key=lambda c: scores["oof"][c].weighted)
    preds_oof["final"], preds_test["final"] = preds_oof[final], preds_test[final]
    scores["oof"]["final"] = scores["oof"][final]
    by_fold = None
    if m.by_fold is not None:
        by_fold = {k: {j: frame(v, m.test_index) for j, v in f.by_fold.items()} for k, f in fitted.items()}
        by_fold["final"] = by_fold[final]
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
                  preds_test, {"final": {"file": str(path), "sha256": written.sha256}}, by_fold=by_fold, meta=m.meta)
    return EnsembleResult(scores, final, path, format_table(scores), out, detail, members)
