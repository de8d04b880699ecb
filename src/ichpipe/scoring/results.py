"""What every stage that produces results shares: probability averaging, the CV scores and their table, the
prediction tables, and the git state recorded with a submission or a bundle (stage 5, the ensemble, predict,
the bundle)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ichpipe.base.config import REPO_ROOT, Config, save_config
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_dir, atomic_path
from ichpipe.base.labels import ABBREVIATIONS, LABELS
from ichpipe.scoring.folds import record_fold_table
from ichpipe.scoring.metrics import per_class_log_loss, weighted_log_loss


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


def final_blend(cnn: pd.DataFrame, lstm: pd.DataFrame | None, lstm_weight: float) -> pd.DataFrame:
    """The final blend: ``lstm_weight`` x LSTM + the rest x CNN (bagged), in the LSTM's row order; the CNN
    alone when there is no LSTM. Stage 5 and `predict` both blend here."""
    if lstm is None:
        return cnn
    return lstm_weight * lstm + (1 - lstm_weight) * cnn.loc[lstm.index]


@dataclass(frozen=True)
class Score:
    """A model's score on one set of images: the competition's weighted log loss, each label's log loss, and on how
    many images."""

    weighted: float
    per_class: dict[str, float]
    n_images: int

    def to_json(self) -> dict[str, float]:
        """As cv.json and a submission's YAML hold it: weighted, one key per label, n_images."""
        return {"weighted": self.weighted, **self.per_class, "n_images": self.n_images}

    @classmethod
    def from_json(cls, row: dict) -> Score:
        return cls(float(row["weighted"]), {c: float(row[c]) for c in LABELS}, int(row["n_images"]))


Scores = dict[str, dict[str, Score]]  # the scored set ("oof", and "test" where an answer key exists) -> model -> score
SCORED_SETS = ("oof", "test")


def scores_json(scores: Scores) -> dict[str, dict[str, dict[str, float]]]:
    return {where: {model: s.to_json() for model, s in rows.items()} for where, rows in scores.items()}


def read_scores(cv: dict) -> Scores:
    """The scores of a cv.json (its other keys, such as ``used``, left out)."""
    return {where: {model: Score.from_json(row) for model, row in cv[where].items()}
            for where in SCORED_SETS if where in cv}


def score(preds: dict[str, pd.DataFrame], truth: pd.DataFrame, complete: bool = True) -> dict[str, Score]:
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
        out[name] = Score(weighted_log_loss(y, q), dict(per_class_log_loss(y, q)), len(common))
    return out


def format_table(scores: Scores) -> str:
    """The CV table as Markdown: one block per scored set, one row per model."""
    header = "| model | weighted | " + " | ".join(ABBREVIATIONS[c] for c in LABELS) + " | images |"
    lines = []
    for where, rows in scores.items():
        lines += [f"**{where}**", "", header, "|" + "---|" * (len(LABELS) + 3)]
        for model, s in rows.items():
            cells = " | ".join(f"{s.per_class[c]:.4f}" for c in LABELS)
            lines.append(f"| {model} | {s.weighted:.4f} | {cells} | {s.n_images} |")
        lines.append("")
    return "\n".join(lines)


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


PREDICTION_FILES = {"oof": "oof_predictions.parquet", "test": "test_predictions.parquet"}
BY_FOLD_FILE = "test_by_fold.parquet"  # each fold's models' test predictions: image_id, fold, model, six columns
SUBMISSIONS_FILE = "submissions.json"


def write_results(folder: Path, cfg: Config, title: str, scores: Scores, extra: dict, oof: dict[str, pd.DataFrame],
                  test: dict[str, pd.DataFrame], submissions: dict[str, dict],
                  by_fold: dict[str, dict[int, pd.DataFrame]] | None = None, meta: pd.DataFrame | None = None) -> None:
    """Stage 5's (or the ensemble's) results, replaced in ``folder`` as one unit (a kill leaves the former results
    or the new ones, never a mix): ``cv.md`` (``title`` and the table of ``scores``), ``cv.json`` (the scores and
    ``extra``), the prediction tables, ``submissions.json`` (per model, the submission file it made and its sha256:
    what `make submit` uploads) and the resolved ``config.yaml``. With ``by_fold`` and ``meta``: each fold's test
    predictions (``test_by_fold.parquet``, what a pseudo-label round of fold k trains on) and the fold table they
    were made on (``folds.json``)."""
    with atomic_dir(folder, what="stage 5's results") as tmp:
        (tmp / "cv.md").write_text(title + format_table(scores))
        (tmp / "cv.json").write_text(json.dumps({**scores_json(scores), **extra}, indent=2) + "\n")
        write_prediction_tables(tmp, oof, test)
        if by_fold and meta is not None:
            pd.concat([f.assign(model=m, fold=k) for m, per in by_fold.items() for k, f in per.items()]).rename_axis(
                "image_id").reset_index()[["image_id", "fold", "model", *LABELS]].to_parquet(
                tmp / BY_FOLD_FILE, index=False)
            record_fold_table(tmp, meta)
        (tmp / SUBMISSIONS_FILE).write_text(json.dumps(submissions, indent=1) + "\n")
        save_config(cfg, tmp / "config.yaml")


def write_prediction_tables(folder: Path, oof: dict[str, pd.DataFrame], test: dict[str, pd.DataFrame]) -> None:
    """``oof_predictions.parquet`` and ``test_predictions.parquet``: image_id, model, six probabilities."""
    for where, preds in (("oof", oof), ("test", test)):
        with atomic_path(folder / PREDICTION_FILES[where]) as tmp:
            pd.concat([p.assign(model=m) for m, p in preds.items()]).rename_axis("image_id").reset_index()[
                ["image_id", "model", *LABELS]].to_parquet(tmp, index=False)
