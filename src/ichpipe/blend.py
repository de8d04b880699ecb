"""Stage 5: average TTA views, bags (epoch checkpoints) and folds; score out-of-fold; write submissions.

Reads, per fold k of ``runs/<experiment>/``: the CNN logits of ``fold<k>/embeddings/epoch<NN>/``
(already averaged over the TTA views by stage 3) and the LSTM probabilities of
``fold<k>/lstm/epoch<NN>/``. Probabilities are averaged over epochs with ``blend.epoch_weights``
(OOF: each row comes from its own fold; test: averaged over folds with ``blend.fold_weights``) and
clipped to ``[blend.clip, 1 - blend.clip]``.

Rows of the CV table: ``prior`` (each fold's training prevalence for every slice), ``cnn_single``
(the last epoch only), ``cnn_bagged``, ``lstm`` and ``blend`` (``lstm_weight`` x LSTM + the rest x
CNN bagged). Writes::

    runs/<experiment>/cv.md, cv.json          the CV table (OOF; test too when an answer key exists)
    runs/<experiment>/oof_predictions.parquet image_id, model, six probabilities (the report, make ensemble)
    runs/<experiment>/test_predictions.parquet the same for the test images (make ensemble)
    submissions/<date>_<experiment>_cv<oof>.csv.gz      the final blend, validated; .yaml beside it
    submissions/<date>_<experiment>-cnn_cv<oof>.csv.gz  the CNN-only blend, to compare
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ichpipe.config import REPO_ROOT, Config, to_dict
from ichpipe.folds import check_fold_table
from ichpipe.io import InputError, atomic_path, long_to_wide, read_long_csv, write_text_atomic
from ichpipe.labels import ABBREVIATIONS, LABELS
from ichpipe.metrics import per_class_log_loss, sigmoid, weighted_log_loss
from ichpipe.metrics import prior as prior_of
from ichpipe.paths import data_paths, epoch_number, finished_dirs, read_metadata, run_dir, work_dir_id
from ichpipe.submission import SubmissionError, check_submission, submission_csv, write_submission

MODELS = ("prior", "cnn_single", "cnn_bagged", "lstm", "blend")


@dataclass
class Predictions:
    """OOF and test probabilities (image_id index, six label columns) of each model."""

    oof: dict[str, pd.DataFrame] = field(default_factory=dict)
    test: dict[str, pd.DataFrame] = field(default_factory=dict)


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


def weighted_mean(frames: list[pd.DataFrame], weights: list[float]) -> pd.DataFrame:
    """Row-aligned weighted mean of probability frames that hold the same image ids (else a one-line error)."""
    if sum(weights) <= 0:
        raise InputError(f"blend: weights {weights} must sum to more than 0")
    base = frames[0]
    for f in frames[1:]:
        if len(f.index) != len(base.index) or not f.index.isin(base.index).all():
            raise InputError(f"{f.attrs.get('source', 'predictions')}: holds {len(f.index)} images, "
                             f"{int((~f.index.isin(base.index)).sum())} of them not in "
                             f"{base.attrs.get('source', 'the first')} ({len(base.index)} images); "
                             f"the folders were made from different metadata: embed them again")
    total = sum(w * f.loc[base.index].to_numpy() for f, w in zip(frames, weights, strict=True))
    return pd.DataFrame(total / sum(weights), index=base.index, columns=base.columns)


def _epoch_weights(folders: list[Path], bcfg) -> list[float]:
    """``blend.epoch_weights`` of each ``epoch<NN>`` folder (1 where not given)."""
    return [bcfg.epoch_weights.get(epoch_number(d), 1.0) for d in folders]


def final_blend(cnn: pd.DataFrame, lstm: pd.DataFrame | None, lstm_weight: float) -> pd.DataFrame:
    """The final blend: ``lstm_weight`` x LSTM + the rest x CNN (bagged), in the LSTM's row order; the CNN
    alone when there is no LSTM. Stage 5 and `predict` both blend here."""
    if lstm is None:
        return cnn
    return lstm_weight * lstm + (1 - lstm_weight) * cnn.loc[lstm.index]


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
        raise InputError(f"{run_dir(cfg, 0).parent}: no LSTM output in any fold, but blend.lstm_weight="
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
    for where in (preds.oof, preds.test):
        where["blend"] = final_blend(where["cnn_bagged"], where.get("lstm"), bcfg.lstm_weight)
        for m in where:
            where[m] = where[m].clip(bcfg.clip, 1 - bcfg.clip)
    return preds, used


def score(preds: dict[str, pd.DataFrame], truth: pd.DataFrame, complete: bool = True) -> dict[str, dict[str, float]]:
    """Weighted log loss and per-class loss of each model on the images of ``truth``.

    ``complete``: every image of ``truth`` must have a prediction (OOF); otherwise (the synthetic
    test answer key, which also lists test files stage 1 could not read) the common images are scored.
    """
    out = {}
    for name, p in preds.items():
        missing = truth.index.difference(p.index)
        if complete and len(missing):
            raise InputError(f"{name}: no prediction for {len(missing)} of {len(truth)} labelled images "
                             f"(e.g. {missing[0]}); a CV score on fewer images is not comparable")
        common = truth.index.intersection(p.index)
        y, q = truth.loc[common, list(LABELS)].to_numpy(), p.loc[common].to_numpy()
        out[name] = {"weighted": weighted_log_loss(y, q), **per_class_log_loss(y, q), "n_images": len(common)}
    return out


def format_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """The CV table as Markdown: one block per scored set, one row per model."""
    header = "| model | weighted | " + " | ".join(ABBREVIATIONS[c] for c in LABELS) + " | images |"
    lines = []
    for where, rows in scores.items():
        lines += [f"**{where}**", "", header, "|" + "---|" * (len(LABELS) + 3)]
        for model, s in rows.items():
            cells = " | ".join(f"{s[c]:.4f}" for c in LABELS)
            lines.append(f"| {model} | {s['weighted']:.4f} | {cells} | {s['n_images']} |")
        lines.append("")
    return "\n".join(lines)


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


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
        stripped = [{key: v for key, v in c.items() if key not in ("fold", "resume", "replace")} for c in per_fold.values()]
        if stripped and all(s == stripped[0] for s in stripped):
            out[kind] = stripped[0]
        elif per_fold:
            out[kind] = {f"fold{k}": c for k, c in per_fold.items()}
    return out


def info_path(submission: str | os.PathLike) -> Path:
    """The YAML written beside a submission (``X.csv.gz`` or ``X.csv`` -> ``X.yaml``)."""
    p = Path(submission)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".csv") + ".yaml")


def submissions_dir(cfg: Config) -> Path:
    out = Path(cfg.blend.out_dir)
    return out if out.is_absolute() else REPO_ROOT / out


def write_checked(pred: pd.DataFrame, path: Path, sample: Path, info: dict) -> Path:
    """Write ``pred`` as a submission and ``info`` as the YAML beside it, together or not at all.

    Both go to temporary names; the submission must pass validation; then the YAML is renamed into
    place and the submission after it. A failure before (a NaN, a full disk) leaves neither; `make
    submit` only takes a submission whose YAML is there. The YAML records the sha256 of the CSV's
    text: when a complete submission of the same experiment and model with the same text is already
    in the folder (a rerun that changed nothing, on another day), that one is kept and returned and
    nothing is written.
    """
    text = submission_csv(pred)
    digest = hashlib.sha256(text.encode()).hexdigest()
    same = _same_submission(path.parent, info, digest)
    if same is not None:
        return same
    with atomic_path(path) as tmp, atomic_path(info_path(path)) as tmp_info:
        write_submission(text, tmp)
        problems = check_submission(tmp, sample)
        if problems:
            raise SubmissionError(path, problems)
        tmp_info.write_text(yaml.safe_dump({**info, "sha256": digest}, sort_keys=False))
    return path


def _infos(out_dir: Path):
    """(YAML path, its contents, its submission) of every complete submission in ``out_dir``."""
    for p in sorted(out_dir.glob("*.yaml")) if out_dir.exists() else []:
        try:
            info = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, OSError):
            continue
        sub = p.with_name(str(info.get("file", "")))
        if isinstance(info, dict) and sub.is_file() and info_path(sub) == p:
            yield p, info, sub


def _same_submission(out_dir: Path, info: dict, digest: str) -> Path | None:
    if "experiment" not in info:
        return None
    for _, old, sub in _infos(out_dir):
        if (old.get("experiment"), old.get("model"), old.get("work_dir"), old.get("sha256")) == (
                info["experiment"], info.get("model"), info.get("work_dir"), digest):
            return sub
    return None


def _sweep_leftovers(out_dir: Path, experiment: str) -> None:
    """What a killed blend of ``experiment`` left: temporary files, and submissions without their YAML."""
    if not out_dir.exists():
        return
    for p in out_dir.glob(".*.tmp*"):
        if _experiment_of_name(p.name.lstrip(".").split(".tmp")[0]) == experiment:
            p.unlink(missing_ok=True)
    for p in out_dir.glob("*.csv.gz"):
        if _experiment_of_name(p.name) == experiment and not info_path(p).exists():
            p.unlink(missing_ok=True)


def _experiment_of_name(name: str) -> str | None:
    """``<date>_<experiment>[-cnn]_cv<score>.csv.gz[...]`` → experiment (None for other names)."""
    stem, sep, _ = name.rpartition("_cv")
    date, under, rest = stem.partition("_")
    if not sep or not under or len(date) != 10:
        return None
    return rest.removesuffix("-cnn")


def latest_submission(cfg: Config, model: str = "blend") -> Path:
    """The newest complete submission of exactly ``cfg.experiment`` (by the YAML beside it), else an error."""
    out_dir = submissions_dir(cfg)
    work = work_dir_id(cfg)
    ours = [(info, sub) for _, info, sub in _infos(out_dir)
            if info.get("experiment") == cfg.experiment and info.get("model") == model]
    found = [(str(info.get("created", "")), sub.stat().st_mtime, sub) for info, sub in ours
             if info.get("work_dir") == work]
    if not found:
        others = sorted({str(info.get("work_dir", "an unrecorded data root")) for info, _ in ours})
        raise InputError(f"{out_dir}: no submission of experiment {cfg.experiment!r} from the data root {work}"
                         + (f" (only from {', '.join(others)}: give FILE=... to upload one of those)" if others else
                            "; run `make submission` first"))
    return max(found)[2]



def _test_frame(pred: pd.DataFrame, sample_ids: pd.Index, fill: np.ndarray) -> tuple[pd.DataFrame, int]:
    """Predictions for every image of the sample submission; images without one get ``fill`` (the prior)."""
    out = pred.reindex(sample_ids)
    missing = ~sample_ids.isin(pred.index)  # a NaN prediction stays NaN: validation must refuse it
    out.loc[missing] = fill
    return out, int(missing.sum())


PREDICTION_FILES = {"oof": "oof_predictions.parquet", "test": "test_predictions.parquet"}


def write_prediction_tables(folder: Path, oof: dict[str, pd.DataFrame], test: dict[str, pd.DataFrame]) -> None:
    """``oof_predictions.parquet`` and ``test_predictions.parquet``: image_id, model, six probabilities."""
    for where, preds in (("oof", oof), ("test", test)):
        with atomic_path(folder / PREDICTION_FILES[where]) as tmp:
            pd.concat([p.assign(model=m) for m, p in preds.items()]).rename_axis("image_id").reset_index()[
                ["image_id", "model", *LABELS]].to_parquet(tmp, index=False)


def sample_image_ids(paths) -> pd.Index:
    """The test images a submission must cover: those of the sample submission."""
    if not paths.sample_submission_csv.exists():
        raise InputError(f"{paths.sample_submission_csv}: not found; it lists the test images to predict")
    return pd.Index(read_long_csv(paths.sample_submission_csv).image_id.unique(), name="image_id")


def run_blend(cfg: Config, today: dt.date | None = None) -> dict:
    """Blend, score, write the CV table and both submissions; returns paths and scores."""
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    preds, used = collect(cfg, meta)
    truth_oof = meta[meta.fold.notna()].set_index("image_id")[list(LABELS)]
    scores = {"oof": score(preds.oof, truth_oof)}
    if paths.test_labels_csv.exists():  # the synthetic set's answer key
        truth_test = long_to_wide(read_long_csv(paths.test_labels_csv), paths.test_labels_csv)
        scores["test"] = score(preds.test, truth_test, complete=False)
    exp_dir = run_dir(cfg, 0).parent
    write_text_atomic(exp_dir / "cv.md", f"# CV: {cfg.experiment}\n\n" + format_table(scores))
    write_text_atomic(exp_dir / "cv.json", json.dumps({**scores, "used": used}, indent=2) + "\n")
    write_prediction_tables(exp_dir, preds.oof, preds.test)
    sample_ids = sample_image_ids(paths)
    out_dir = submissions_dir(cfg)
    _sweep_leftovers(out_dir, cfg.experiment)
    date = (today or dt.date.today()).isoformat()
    prior = prior_of(truth_oof)
    written = {}
    for model, suffix in (("blend", ""), ("cnn_bagged", "-cnn")):
        cv = scores["oof"][model]["weighted"]
        path = out_dir / f"{date}_{cfg.experiment}{suffix}_cv{cv:.4f}.csv.gz"
        test, filled = _test_frame(preds.test[model], sample_ids, prior)
        limit = cfg.preprocess.max_bad_fraction
        if filled > limit * len(sample_ids):
            raise InputError(f"{paths.sample_submission_csv}: {filled} of {len(sample_ids)} test images have no "
                             f"prediction, more than preprocess.max_bad_fraction={limit}; see the bad_files.csv "
                             f"of stage 1, or run stage 1 after adding the missing test files")
        info = {"file": path.name, "experiment": cfg.experiment, "model": model, "work_dir": work_dir_id(cfg),
                "created": dt.datetime.now().isoformat(timespec="seconds"), "git": git_state(), "cv": {w: s[model] for w, s in scores.items()},
            "cv_table": {w: {m: s[m]["weighted"] for m in s} for w, s in scores.items()},
            "images_filled_with_prior": filled, "used": used,
            "configs": {"blend": to_dict(cfg), **_run_configs(cfg, used["folds"])}}
        kept = write_checked(test, path, paths.sample_submission_csv, info)
        written[model] = {"path": str(kept), "cv": cv, "filled": filled, "new": kept == path}
    return {"scores": scores, "written": written, "table": format_table(scores), "cv_dir": str(exp_dir)}
