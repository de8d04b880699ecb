"""Stage 5: average TTA views, bags (epoch checkpoints) and folds; score out-of-fold; write submissions.

Reads, per fold k of ``runs/<experiment>/``: the CNN logits of ``fold<k>/embeddings/epoch<NN>/``
(already averaged over the TTA views by stage 3) and the LSTM probabilities of
``fold<k>/lstm/epoch<NN>/``. Probabilities are averaged over epochs with ``blend.epoch_weights``
(OOF: each row comes from its own fold; test: averaged over folds with ``blend.fold_weights``) and
clipped to ``[blend.clip, 1 - blend.clip]``.

Rows of the CV table: ``prior`` (each fold's training prevalence for every slice), ``cnn_single``
(the last epoch only), ``cnn_bagged``, ``lstm`` and ``blend`` (``lstm_weight`` x LSTM + the rest x
CNN bagged). Writes::

    runs/<experiment>/blend/                  replaced as one folder (a kill leaves the former results or the new):
        cv.md, cv.json                        the CV table (OOF; test too when an answer key exists)
        oof_predictions.parquet               image_id, model, six probabilities (the report, make ensemble)
        test_predictions.parquet              the same for the test images (make ensemble)
        submissions.json                      the submissions below and their sha256 (what `make submit` takes)
        config.yaml                           the resolved config
    submissions/<date>_<experiment>_cv<oof>.csv.gz      the final blend, validated; .yaml beside it
    submissions/<date>_<experiment>-cnn_cv<oof>.csv.gz  the CNN-only blend, to compare
(``submissions/`` under the work folder: ``blend.out_dir``.)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ichpipe.base.config import Config, to_dict
from ichpipe.base.errors import InputError
from ichpipe.base.files import writer_lock
from ichpipe.base.label_csv import long_to_wide, read_long_csv
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import (
    bag_dir,
    blend_dir,
    data_paths,
    epoch_number,
    experiment_dir,
    finished_dirs,
    read_metadata,
    run_dir,
    seed_configs,
    work_dir_id,
)
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.metrics import prior as prior_of
from ichpipe.scoring.metrics import sigmoid
from ichpipe.scoring.results import Scores, final_blend, format_table, git_state, score, weighted_mean, write_results
from ichpipe.scoring.submission import fill_missing, sample_image_ids, submissions_dir, sweep_leftovers, write_checked

MODELS = ("prior", "cnn_single", "cnn_bagged", "lstm", "blend")


BY_FOLD_MODELS = ("cnn_bagged", "lstm", "blend")  # the models whose per-fold test predictions are kept (pseudo-labels)


@dataclass
class Predictions:
    """OOF and test probabilities (image_id index, six label columns) of each model, and the test probabilities of
    each fold's models alone (``by_fold``: model -> fold -> frame; what a pseudo-label round of fold k reads)."""

    oof: dict[str, pd.DataFrame] = field(default_factory=dict)
    test: dict[str, pd.DataFrame] = field(default_factory=dict)
    by_fold: dict[str, dict[int, pd.DataFrame]] = field(default_factory=dict)


def _cnn_probs(folder: Path, name: str) -> pd.DataFrame:
    ids = pd.read_csv(folder / f"{name}_ids.csv").image_id
    frame = pd.DataFrame(sigmoid(np.load(folder / f"{name}_logits.npy")),
                         index=pd.Index(ids, name="image_id"), columns=list(LABELS))
    frame.attrs["source"] = str(folder)
    return frame


def _lstm_probs(folder: Path, name: str) -> pd.DataFrame:
    frame = pd.read_parquet(folder / f"{name}.parquet").set_index("image_id")[list(LABELS)].astype(np.float64)
    frame.attrs["source"] = str(folder)
    return frame


def _epoch_weights(folders: list[Path], bcfg) -> list[float]:
    """``blend.epoch_weights`` of each ``epoch<NN>`` folder (1 where not given)."""
    return [bcfg.epoch_weights.get(epoch_number(d), 1.0) for d in folders]


def _check_oof_rows(frame: pd.DataFrame, expected: pd.Index, fold: int) -> None:
    """Every held-out image of the fold must have its OOF prediction: a smaller-n CV would not be comparable."""
    missing = expected.difference(frame.index)
    extra = frame.index.difference(expected)
    if len(missing) or len(extra):
        raise InputError(f"{frame.attrs.get('source', f'fold {fold}')}: OOF predictions of fold {fold} miss "
                         f"{len(missing)} of its {len(expected)} images and hold {len(extra)} of other folds "
                         f"(e.g. {(missing if len(missing) else extra)[0]}); run that stage again for fold {fold}")


def _check_weight_keys(bcfg, folds: list[int], epochs: set[int]) -> None:
    """``blend.epoch_weights``/``fold_weights`` keys that match no epoch or fold would be silently ignored."""
    unknown = sorted(set(bcfg.epoch_weights) - epochs)
    if unknown:
        raise InputError(f"blend.epoch_weights: no embedded epoch {unknown} in this experiment "
                         f"(epochs: {sorted(epochs)})")
    unknown = sorted(set(bcfg.fold_weights) - set(folds))
    if unknown:
        raise InputError(f"blend.fold_weights: no fold {unknown} in the metadata (folds: {folds})")


def collect(cfg: Config, meta: pd.DataFrame) -> tuple[Predictions, dict]:
    """Every model's OOF and test probabilities from the experiment's run folders, and what was used."""
    bcfg = cfg.blend
    folds = sorted(int(k) for k in meta.fold.dropna().unique())
    per_fold: dict[str, list[pd.DataFrame]] = {m: [] for m in MODELS}
    tests: dict[str, list[pd.DataFrame]] = {m: [] for m in MODELS}
    used: dict = {"folds": folds, "cnn_epochs": {}, "lstm_epochs": {}}
    labelled = meta[meta.fold.notna()].set_index("image_id")
    has_lstm = [bool(finished_dirs(run_dir(cfg, k) / "lstm")) for k in folds]
    if not any(has_lstm) and bcfg.lstm_weight > 0:  # the final blend's name must not hide a CNN-only blend
        raise InputError(f"{experiment_dir(cfg)}: no LSTM output in any fold, but blend.lstm_weight="
                         f"{bcfg.lstm_weight}; run `make lstm`, or add blend.lstm_weight=0 for a CNN-only blend")
    if any(has_lstm) and not all(has_lstm):
        missing = [k for k, h in zip(folds, has_lstm, strict=True) if not h]
        raise InputError(f"{run_dir(cfg, missing[0]).parent}: no LSTM output for fold(s) {missing}; "
                         f"run `make lstm fold={missing[0]}` (or remove every fold's lstm/ for a CNN-only blend)")
    epochs: set[int] = set()
    check_fold_table([run_dir(cfg, k) for k in folds], meta)
    for k in folds:
        emb_dirs = finished_dirs(run_dir(cfg, k) / "embeddings")
        if not emb_dirs:
            raise InputError(f"{run_dir(cfg, k)}/embeddings: no finished embeddings; run `make embed fold={k}`")
        used["cnn_epochs"][k] = [epoch_number(d) for d in emb_dirs]
        epochs.update(used["cnn_epochs"][k])
        fold_ids = labelled.index[labelled.fold == k]
        for name, bucket in (("oof", per_fold), ("test", tests)):
            cnn = [_cnn_probs(d, name) for d in emb_dirs]
            if name == "oof":
                for c in cnn:
                    _check_oof_rows(c, fold_ids, k)
            bucket["cnn_single"].append(cnn[-1])
            bucket["cnn_bagged"].append(weighted_mean(cnn, _epoch_weights(emb_dirs, bcfg)))
        train_rows = labelled[labelled.fold != k]
        prior = prior_of(train_rows[list(LABELS)])
        for bucket in (per_fold, tests):
            index = bucket["cnn_single"][-1].index
            bucket["prior"].append(pd.DataFrame(np.tile(prior, (len(index), 1)), index=index, columns=list(LABELS)))
        if all(has_lstm):
            lstm_dirs = finished_dirs(run_dir(cfg, k) / "lstm")
            used["lstm_epochs"][k] = [epoch_number(d) for d in lstm_dirs]
            epochs.update(used["lstm_epochs"][k])
            for name, bucket in (("oof", per_fold), ("test", tests)):
                lstm = [_lstm_probs(d, name) for d in lstm_dirs]
                if name == "oof":
                    for frame in lstm:
                        _check_oof_rows(frame, fold_ids, k)
                bucket["lstm"].append(weighted_mean(lstm, _epoch_weights(lstm_dirs, bcfg)))
    _check_weight_keys(bcfg, folds, epochs)
    preds = Predictions()
    fold_w = [bcfg.fold_weights.get(k, 1.0) for k in folds]
    models = [m for m in MODELS if m != "blend" and per_fold[m]]
    for m in models:
        preds.oof[m] = pd.concat(per_fold[m])
        preds.test[m] = weighted_mean(tests[m], fold_w)
        if m in BY_FOLD_MODELS:
            preds.by_fold[m] = dict(zip(folds, tests[m], strict=True))
    preds.by_fold["blend"] = {k: final_blend(preds.by_fold["cnn_bagged"][k], preds.by_fold.get("lstm", {}).get(k),
                                             bcfg.lstm_weight) for k in folds}
    for where in (preds.oof, preds.test):
        where["blend"] = final_blend(where["cnn_bagged"], where.get("lstm"), bcfg.lstm_weight)
        for m in where:
            where[m] = where[m].clip(bcfg.clip, 1 - bcfg.clip)
    preds.by_fold = {m: {k: f.clip(bcfg.clip, 1 - bcfg.clip) for k, f in per.items()}
                     for m, per in preds.by_fold.items()}
    return preds, used


def _mean_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return weighted_mean(frames, [1.0] * len(frames))


def collect_bag(cfg: Config, meta: pd.DataFrame) -> tuple[Predictions, dict]:
    """:func:`collect` of every seed of a bag (``seeds``), averaged model by model (OOF: each row from its own fold
    in every seed; test and per fold alike), plus each seed's final blend as ``blend_seed<s>``. Without a bag, the
    run of ``cfg`` itself."""
    runs = seed_configs(cfg)
    if not cfg.seeds:
        return collect(cfg, meta)
    parts = {}
    for run in runs:
        if not any(run_dir(run, k).exists() for k in sorted(int(f) for f in meta.fold.dropna().unique())):
            raise InputError(f"{experiment_dir(run)}: seed {run.seed} of the bag {list(cfg.seeds)} has no run; train "
                             f"it (`make train` runs every seed of the bag) or take it out of seeds")
        parts[run.seed] = collect(run, meta)
    first = parts[cfg.seeds[0]]
    bag = Predictions()
    for m in first[0].oof:
        bag.oof[m] = _mean_frames([p.oof[m] for p, _ in parts.values()])
        bag.test[m] = _mean_frames([p.test[m] for p, _ in parts.values()])
    for m, per in first[0].by_fold.items():
        bag.by_fold[m] = {k: _mean_frames([p.by_fold[m][k] for p, _ in parts.values()]) for k in per}
    for s, (p, _) in parts.items():
        bag.oof[f"blend_seed{s}"], bag.test[f"blend_seed{s}"] = p.oof["blend"], p.test["blend"]
    return bag, {"seeds": {int(s): used for s, (_, used) in parts.items()}}


def _folds(used: dict) -> list[int]:
    """The folds a blend used (of a bag: of its first seed; every seed has the same, checked by the fold table)."""
    return used["folds"] if "folds" in used else next(iter(used["seeds"].values()))["folds"]


def _run_configs(cfg: Config, folds: list[int]) -> dict:
    """The resolved CNN and LSTM configs of the runs: one copy when the folds differ only in ``fold``."""
    out = {}
    for kind in ("cnn", "lstm"):
        per_fold = {}
        for k in folds:
            folder = run_dir(cfg, k)
            if kind == "lstm":
                folder = next(iter(finished_dirs(folder / "lstm")), None)
            if folder is not None and (folder / "config.yaml").exists():
                per_fold[k] = yaml.safe_load((folder / "config.yaml").read_text())
        stripped = [{key: v for key, v in c.items() if key not in ("fold", "resume",
                                                                   "replace")} for c in per_fold.values()]
        if stripped and all(s == stripped[0] for s in stripped):
            out[kind] = stripped[0]
        elif per_fold:
            out[kind] = {f"fold{k}": c for k, c in per_fold.items()}
    return out


@dataclass(frozen=True)
class MadeSubmission:
    """A submission of stage 5: written now (``new``), or the same text found already written."""

    path: Path
    sha256: str  # of its CSV text, as its YAML records it
    new: bool
    cv: float  # the OOF weighted log loss of its model
    filled: int  # test images without a prediction, given the training prior


@dataclass(frozen=True)
class BlendResult:
    scores: Scores  # "oof" (and "test" where the synthetic answer key exists) -> model -> Score
    written: dict[str, MadeSubmission]  # "blend" (the final) and "cnn_bagged"
    table: str  # the CV table, Markdown
    cv_dir: Path  # runs/<experiment>/blend


def run_blend(cfg: Config, today: dt.date | None = None) -> BlendResult:
    """Blend, score, write the CV table and both submissions."""
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    with writer_lock(bag_dir(cfg), f"stage 5 (blend) of {cfg.experiment}"):
        preds, used = collect_bag(cfg, meta)
        truth_oof = meta[meta.fold.notna()].set_index("image_id")[list(LABELS)]
        scores = {"oof": score(preds.oof, truth_oof)}
        if paths.test_labels_csv.exists():  # the synthetic set's answer key
            truth_test = long_to_wide(read_long_csv(paths.test_labels_csv), paths.test_labels_csv)
            scores["test"] = score(preds.test, truth_test, complete=False)
        # the submissions first: the results folder names them, and replaces the former results as one unit
        written = _write_submissions(cfg, preds, scores, used, prior_of(truth_oof), today)
        title = f"# CV: {cfg.experiment}" + (f" (the mean of seeds {list(cfg.seeds)})" if cfg.seeds else "")
        write_results(blend_dir(cfg), cfg, title + "\n\n", scores, {"used": used}, preds.oof, preds.test,
                      {m: {"file": str(w.path), "sha256": w.sha256} for m, w in written.items()},
                      by_fold=preds.by_fold, meta=meta)
    return BlendResult(scores, written, format_table(scores), blend_dir(cfg))


def _write_submissions(cfg: Config, preds: Predictions, scores: Scores, used: dict, prior, today: dt.date | None
                       ) -> dict[str, MadeSubmission]:
    """The final blend's and the CNN-only blend's submissions (each validated, with its YAML)."""
    paths = data_paths(cfg)
    sample_ids = sample_image_ids(paths)
    out_dir = submissions_dir(cfg)
    sweep_leftovers(out_dir, cfg.experiment)
    date = (today or dt.date.today()).isoformat()
    written = {}
    for model, suffix in (("blend", ""), ("cnn_bagged", "-cnn")):
        cv = scores["oof"][model].weighted
        path = out_dir / f"{date}_{cfg.experiment}{suffix}_cv{cv:.4f}.csv.gz"
        test, filled = fill_missing(preds.test[model], sample_ids, prior)
        limit = cfg.preprocess.max_bad_fraction
        if filled > limit * len(sample_ids):
            raise InputError(f"{paths.sample_submission_csv}: {filled} of {len(sample_ids)} test images have no "
                             f"prediction, more than preprocess.max_bad_fraction={limit}; see the bad_files.csv "
                             f"of stage 1, or run stage 1 after adding the missing test files")
        info = {"file": path.name, "experiment": cfg.experiment, "model": model, "work_dir": work_dir_id(cfg),
                "created": dt.datetime.now().isoformat(timespec="seconds"), "git": git_state(),
                "cv": {w: s[model].to_json() for w, s in scores.items()},
                "cv_table": {w: {m: s[m].weighted for m in s} for w, s in scores.items()},
                "images_filled_with_prior": filled, "used": used,
                "configs": {"blend": to_dict(cfg), **_run_configs(seed_configs(cfg)[0], _folds(used))}}
        sub = write_checked(test, path, paths.sample_submission_csv, info)
        written[model] = MadeSubmission(sub.path, sub.sha256, sub.new, cv, filled)
    return written
