"""A bundle on labelled studies, as papers report it: ``python -m ichpipe evaluate STUDIES --bundle B --labels L
--out DIR`` (``make evaluate``).

STUDIES is a folder (or zip) of DICOM studies, read as ``predict`` reads them, each series through the same code
(``predictor.run_series``). The labels are either

- CQ500's ``reads.csv`` (three readers' calls per study: ``R1:ICH`` ... ``R3:SAH``): the reference is the
  readers' majority, per study; a study is the top-level folder under STUDIES whose name is the row's ``name``
  with anything but letters and digits dropped (``CQ500-CT-12`` is the folder ``CQ500CT12 CQ500CT12``'s first
  word); or
- an RSNA ``ID,Label`` file (``stage_2_train.csv``, the synthetic ``synthetic_test_labels.csv``): the reference
  is per slice (SOPInstanceUID = the image ID), and a study shows a class when any of its labelled slices does.

A study's score for a class is the **series maximum**: the highest slice probability over its series (its
calibrated counterpart, the highest ``series_<class>``, is what the calibration figure shows). Written into DIR:

    report.md, metrics.json   per class: studies, positives, AUC with its bootstrap 95% CI (studies resampled; how
                              many resamples had both classes, and "not estimable" when fewer than 90% did),
                              sensitivity/specificity at the bundle's flagging point, at its rule-in point (where
                              predict reports the class present) and at the threshold that reaches
                              95% sensitivity on this set (chosen on it: optimistic); with slice labels the
                              slice-level AUC and weighted log loss too; the published anchors beside them
    studies.csv, slices.csv, series.csv   every score and reference
    roc.png                   the ROC curve per class, and the reliability of the calibrated study probability
    misses/                   the worst misses at the bundle's operating point on `any` (false negatives scored
                              lowest, false positives highest) with predict's figure of their series
    pointing_game.csv         with ``--masks`` (the synthetic answer key's bleed masks): per subtype, of the slices
                              correctly flagged, the share whose Grad-CAM peak falls inside that subtype's blood and
                              the mean share of the heatmap's mass inside it (beside the blood's share of the image)

A series that is not a head CT (ichpipe.imaging.head) is left out of every figure, and listed in report.md.
Each series' results are kept in DIR/cache as they come, so a killed evaluation continues where it stopped.
This is a research tool, not a medical device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, file_stamp, write_text_atomic
from ichpipe.base.label_csv import read_labels
from ichpipe.base.labels import CQ500_FINDINGS, LABELS
from ichpipe.clinical.predictor import Predictor, read_series, run_series, series_result
from ichpipe.clinical.series_figure import series_figure
from ichpipe.clinical.studies import Series, find_series
from ichpipe.networks.bundle_format import load_bundle
from ichpipe.scoring.localisation import POINTING_COLUMNS, pointing_game, pointing_lines, pointing_summary
from ichpipe.scoring.metrics import auc_or_nan, confusion, threshold_for_recall, weighted_log_loss

ANCHORS = [  # published results on CQ500 to print beside ours (any ICH, study level)
    ("Chilamkurthy et al. 2018 (qure.ai), CQ500, any ICH", 0.94),
    ("RSNA 2019 1st place, external validation on CQ500 (PMC8377493), any ICH", 0.949),
]
SENSITIVITY_TARGET = 0.95


@dataclass
class Reference:
    """The labels: per study (``studies``: key -> class -> 0/1) and, from an RSNA file, per slice."""

    kind: str  # "reads" (CQ500) or "slices" (RSNA)
    studies: pd.DataFrame | None  # index: study key; columns LABELS (reads only)
    slices: pd.DataFrame | None  # index: image ID; columns LABELS (slices only)


def study_key(name: str) -> str:
    """CQ500's ``name`` and study folder to one key: letters and digits only, upper case."""
    return re.sub(r"[^0-9A-Za-z]", "", name).upper()


def read_reference(path: str | os.PathLike) -> Reference:
    """CQ500's reads.csv (the readers' majority per study) or an RSNA ``ID,Label`` file (per slice)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: labels file not found")
    head = pd.read_csv(path, nrows=1)
    if "ID" in head.columns and "Label" in head.columns:
        return Reference("slices", None, read_labels(path))
    readers = sorted({c.split(":")[0] for c in head.columns if re.fullmatch(r"R\d+:[A-Z]+", c)})
    if "name" not in head.columns or not readers:
        raise InputError(f"{path}: neither CQ500's reads.csv (a name column and reader columns R1:ICH ...) nor an "
                         f"ID,Label file; its columns: {', '.join(map(str, head.columns[:8]))}")
    reads = pd.read_csv(path)
    missing = [f"{r}:{code}" for r in readers for code in CQ500_FINDINGS if f"{r}:{code}" not in reads.columns]
    if missing:
        raise InputError(f"{path}: reader column(s) {', '.join(missing[:4])} missing")
    votes = {label: reads[[f"{r}:{code}" for r in readers]].apply(pd.to_numeric, errors="coerce")
             for code, label in CQ500_FINDINGS.items()}
    bad = [label for label, v in votes.items() if not v.isin([0, 1]).all().all()]
    if bad:
        raise InputError(f"{path}: reader calls must be 0 or 1 (found others for {bad[0]})")
    studies = pd.DataFrame({label: (v.sum(axis=1) * 2 > len(readers)).astype(int) for label, v in votes.items()})
    studies.index = reads["name"].map(lambda n: study_key(str(n)))
    return Reference("reads", studies[list(LABELS)], None)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict  # metrics.json: per class, the AUC with its CI and the operating points; slice level; misses
    studies: int
    classes: dict[str, dict]  # metrics.json's "classes": per class its studies, positives, AUC, CI, operating points
    skipped: list[dict[str, str]]  # what was left out: what, reason
    out: Path
    seconds: float


def evaluate(studies: str | os.PathLike, bundle_path: str | os.PathLike, labels: str | os.PathLike,
             out: str | os.PathLike, masks: str | os.PathLike | None = None, n_boot: int = 1000,
             progress: bool = True, device: torch.device | None = None) -> EvaluateResult:
    """Evaluate the bundle on the labelled studies under ``studies``; write the report into ``out``."""
    start = time.perf_counter()
    studies, out = Path(studies), Path(out)
    ref = read_reference(labels)
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"{masks}: no such folder of bleed masks (the synthetic set's synthetic_masks/)")
    (out / "cache").mkdir(parents=True, exist_ok=True)
    with load_bundle(bundle_path) as bundle, tempfile.TemporaryDirectory(prefix="ichpipe_evaluate_") as work:
        series, skipped = find_series(studies, Path(work))
        base = studies if studies.is_dir() else Path(work)  # a zip is unpacked into ``work``
        keys = {s.series: _key_of(s, base, ref) for s in series}
        series = [s for s in series if keys[s.series] is not None]
        if not series:
            known = (list(ref.studies.index) if ref.kind == "reads" else list(ref.slices.index))[:2]
            raise InputError(f"{labels}: none of its studies matches a series under {studies} (labels e.g. "
                             f"{', '.join(known)}; {'study folders' if ref.kind == 'reads' else 'SOPInstanceUIDs'} "
                             f"are matched)")
        predictor = Predictor(bundle, device)
        done = [_series_result(s, predictor, out / "cache", masks, skipped)
                for s in tqdm(series, desc="evaluate", unit="series", disable=not progress)]
        slices = pd.DataFrame([r for d in done if d for r in d["slices"]])
        rows = pd.DataFrame([{**d["row"], "study": keys[d["row"]["SeriesInstanceUID"]]} for d in done if d])
        pointing = pd.DataFrame([p for d in done if d for p in d["pointing"]])
        ok = rows.get("assessable", pd.Series(1, index=rows.index)).fillna(1).astype(int) == 1
        excluded = [{"study": r.study, "series": r.SeriesInstanceUID, "reason": r.not_assessable}
                    for r in rows[~ok].itertuples()]
        if not ok.any():
            raise InputError(f"{studies}: no series is a head CT the bundle can assess ({excluded[0]['reason']})")
        table = _study_table(rows[ok], slices, ref)
        metrics = _metrics(table, slices, ref, bundle.info.thresholds, n_boot)
        metrics["not_assessable"] = excluded
        cached = {d["row"]["SeriesInstanceUID"]: d for d in done if d}
        metrics["misses_threshold_any"] = float(bundle.info.thresholds["any"].threshold)
        metrics["misses"] = _worst_misses(out, table, series, keys, cached, predictor,
                                          Path(masks) if masks is not None else None,
                                          metrics["misses_threshold_any"])
        _write(out, table, slices, rows, metrics, pointing, masks is not None)
    return EvaluateResult(metrics, metrics["studies"], metrics["classes"], skipped, out, time.perf_counter() - start)


def _key_of(s: Series, root: Path, ref: Reference) -> str | None:
    """The study key of a series in the reference (None: not labelled)."""
    if ref.kind == "slices":
        return s.study if ref.slices.index.isin(s.ids).any() else None
    parts = s.files[0].resolve().relative_to(root.resolve()).parts
    key = study_key(parts[0].split()[0]) if len(parts) > 1 else ""
    return key if key in ref.studies.index else None


def cache_key(s: Series, bundle_digest: str, masks) -> str:
    """What decides a series' cached result: the bundle (its sha256), the masks asked for, the series and each of
    its files (SOPInstanceUID, size, modification time): another bundle, or a file replaced since, is computed
    anew."""
    files = [[i, *file_stamp(f)] for i, f in zip(s.ids, s.files, strict=True)]
    text = json.dumps([bundle_digest, None if masks is None else str(Path(masks).resolve()), s.study, s.series, files])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _series_result(s: Series, predictor: Predictor, cache: Path, masks, skipped: list[dict]) -> dict | None:
    """One series' rows (and pointing game), from the cache or computed and cached."""
    path = cache / f"{cache_key(s, predictor.bundle.digest, masks)}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = run_series(predictor, s, skipped)
    if result is None:
        return None
    pointing = [] if masks is None else pointing_game(
        [r["SOPInstanceUID"] for r in result.slices], result.flags, Path(masks),
        lambda rows, label: predictor.grad_cam(result.images[rows], label=label))
    done = {"slices": result.slices, "row": result.row, "pointing": pointing}
    write_text_atomic(path, json.dumps(done))
    return done


def _study_table(rows: pd.DataFrame, slices: pd.DataFrame, ref: Reference) -> pd.DataFrame:
    """One row per study: ``score_<c>`` (series maximum), ``calibrated_<c>``, ``ref_<c>``, its series."""
    g = rows.groupby("study")
    table = pd.DataFrame({"series": g.size(), **{f"score_{c}": g[f"max_{c}"].max() for c in LABELS},
                          **{f"calibrated_{c}": g[f"series_{c}"].max() for c in LABELS}})
    if ref.kind == "reads":
        truth = ref.studies.loc[table.index]
    else:
        labelled = slices[slices.SOPInstanceUID.isin(ref.slices.index)]
        truth = ref.slices.loc[labelled.SOPInstanceUID].set_axis(labelled.StudyInstanceUID).groupby(level=0).max()
        truth = truth.reindex(table.index)
    for c in LABELS:
        table[f"ref_{c}"] = truth[c].astype(int).to_numpy()
    return table


MIN_RESAMPLED_SHARE = 0.9  # an interval whose resamples lost more than 10% to "one class only" is not estimable


def bootstrap_auc(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float, int]:
    """AUC, its bootstrap 95% CI (cases resampled with replacement) and how many of the ``n_boot`` resamples had both
    classes (the others have no AUC and are left out). The CI is NaN when the AUC is, or when fewer than
    :data:`MIN_RESAMPLED_SHARE` of the resamples count (one or two positives: the interval would mean nothing)."""
    auc = auc_or_nan(y, p)
    if np.isnan(auc) or n_boot == 0:
        return auc, float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    draws = [auc_or_nan(y[i], p[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    draws = np.array([d for d in draws if not np.isnan(d)])
    if len(draws) < MIN_RESAMPLED_SHARE * n_boot:
        return auc, float("nan"), float("nan"), len(draws)
    return auc, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)), len(draws)


def _metrics(table: pd.DataFrame, slices: pd.DataFrame, ref: Reference, thresholds, n_boot: int) -> dict:
    per_class = {}
    for c in LABELS:
        y, p = table[f"ref_{c}"].to_numpy(), table[f"score_{c}"].to_numpy()
        auc, lo, hi, used = bootstrap_auc(y, p, n_boot)
        t = thresholds[c].threshold
        entry = {"studies": len(y), "positives": int(y.sum()), "auc": auc, "auc_ci": [lo, hi],
                 "auc_ci_resamples": [used, n_boot],
                 "at_bundle_threshold": {"threshold": t, **_sens_spec(y, p >= t)}}
        rule_in = thresholds[c].rule_in
        if rule_in is not None:  # where predict reports the class present (a subtype also needs `any` present)
            entry["at_rule_in"] = {"threshold": rule_in, **_sens_spec(y, p >= rule_in)}
        if y.sum():
            op = threshold_for_recall(y, p, SENSITIVITY_TARGET)
            entry[f"at_{int(SENSITIVITY_TARGET * 100)}_sensitivity"] = {"threshold": op.threshold,
                                                                        **_sens_spec(y, p >= op.threshold)}
        per_class[c] = entry
    metrics = {"reference": "readers' majority (CQ500 reads.csv)" if ref.kind == "reads" else "slice labels",
               "score": "series maximum: the highest slice probability over the study's series",
               "studies": len(table), "classes": per_class,
               "anchors": [{"what": w, "auc": a} for w, a in ANCHORS]}
    if ref.kind == "slices":
        s = slices[slices.SOPInstanceUID.isin(ref.slices.index)]
        y = ref.slices.loc[s.SOPInstanceUID, list(LABELS)].to_numpy()
        metrics["slice_level"] = {"slices": len(s), "weighted_log_loss": weighted_log_loss(y,
                                                                                           s[list(LABELS)].to_numpy()),
                                  "auc": {c: auc_or_nan(y[:, k], s[c].to_numpy()) for k, c in enumerate(LABELS)}}
    return metrics


def _sens_spec(y: np.ndarray, pred: np.ndarray) -> dict:
    """Sensitivity and specificity (NaN where the set has no positive, or no negative, study) and the counts."""
    tp, fp, tn, fn = confusion(y, pred)
    return {"sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"), "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def _write(out: Path, table, slices, rows, metrics: dict, pointing: pd.DataFrame, with_masks: bool) -> None:
    for name, frame in (("studies.csv", table), ("slices.csv", slices), ("series.csv", rows)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=name == "studies.csv", index_label="study")
    if with_masks:
        summary = pointing_summary(pointing)
        metrics["pointing_game"] = summary.reset_index().to_dict("records")
        with atomic_path(out / "pointing_game.csv") as tmp:
            summary.to_csv(tmp)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, default=float) + "\n")
    _figures(out, table)
    write_text_atomic(out / "report.md", report_text(metrics))


def _figures(out: Path, table: pd.DataFrame) -> None:
    from matplotlib.figure import Figure
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(11, 5))
    roc, cal = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for c in LABELS:
        y = table[f"ref_{c}"].to_numpy()
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, table[f"score_{c}"])
            roc.plot(fpr, tpr, lw=2.2 if c == "any" else 1.2, label=f"{c} (AUC "
                                                                    f"{auc_or_nan(y, table[f'score_{c}']):.3f})")
            frac, mean = calibration_curve(y, table[f"calibrated_{c}"], n_bins=5, strategy="quantile")
            cal.plot(mean, frac, marker="o", lw=2.2 if c == "any" else 1.2, label=c)
    roc.plot([0, 1], [0, 1], color="grey", ls=":")
    roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC per class ({len(table)} studies)")
    cal.plot([0, 1], [0, 1], color="grey", ls=":")
    cal.set(xlabel="calibrated study probability (quantile bins)", ylabel="share of studies positive",
            title="calibration")
    if len(cal.lines) > 1:  # beside the diagonal, a class with both positive and negative studies
        roc.legend(fontsize=8)
        cal.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "roc.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def report_text(metrics: dict) -> str:
    """report.md: the per-class table with CIs and operating points, the anchors, the pointing game."""
    lines = [f"# Evaluation: {metrics['studies']} studies; reference: {metrics['reference']}", "",
             f"Score: {metrics['score']}. AUC with its bootstrap 95% CI (studies resampled; resamples with one class "
             "only have no AUC and are left out, and an interval that lost more than "
             f"{1 - MIN_RESAMPLED_SHARE:.0%} of them is not estimable). The bundle's threshold was chosen out of fold "
             f"on the training set; the threshold for {int(SENSITIVITY_TARGET * 100)}% sensitivity is picked on the "
             "evaluated studies themselves, so its specificity is optimistic. Research tool, not for diagnosis.", "",
             *([f"Not assessable (left out of every figure): {len(metrics['not_assessable'])} series: "
                + "; ".join(f"{n['study']}: {n['reason']}" for n in metrics["not_assessable"][:5]), ""]
               if metrics.get("not_assessable") else []),
             "| class | studies | positives | AUC (95% CI) | sens / spec at the bundle's flagging point "
             f"| at its rule-in point (reported present) | threshold for {int(SENSITIVITY_TARGET * 100)}% sensitivity: "
             "sens / spec |",
             "|---|---|---|---|---|---|---|"]
    for c, e in metrics["classes"].items():
        b = e["at_bundle_threshold"]
        s = e.get(f"at_{int(SENSITIVITY_TARGET * 100)}_sensitivity")
        r = e.get("at_rule_in")
        lines.append(f"| {c} | {e['studies']} | {e['positives']} | {_auc_cell(e)} | {_pair(b)} (t={b['threshold']:.3f})"
                     f" | " + (f"{_pair(r)} (t={r['threshold']:.3f})" if r else "none in this bundle") + " | "
                     + (f"{_pair(s)} (t={s['threshold']:.3f}) |" if s else "no positive study |"))
    lines += ["", "Published anchors (any ICH, study level): "
              + "; ".join(f"{a['what']}: AUC {a['auc']:.3f}" for a in metrics["anchors"]) + "."]
    if "slice_level" in metrics:
        sl = metrics["slice_level"]
        lines += ["", f"Slice level ({sl['slices']} slices): weighted log loss {sl['weighted_log_loss']:.4f}; AUC "
                  + ", ".join(f"{c} {a:.3f}" for c, a in sl["auc"].items()) + "."]
    if "pointing_game" in metrics:
        lines += ["", "Grad-CAM pointing game (the mean map of the bundle's CNNs for the subtype's output, on the "
                      "slices "
                  "correctly flagged for it):", "",
                  *pointing_lines(pd.DataFrame(metrics["pointing_game"], columns=["subtype", *POINTING_COLUMNS])
                                  .set_index("subtype"))]
    t = metrics.get("misses_threshold_any", math.nan)
    lines += ["", f"The worst misses on `any` at the bundle's operating point ({t:.3f}: a positive study scored below "
                  "it, a negative one at or above it; figures: the flagged or most suspicious slices with the "
                  "Grad-CAM):", ""]
    if not metrics["misses"]:
        lines += ["None: every positive study is at or above the threshold and every negative one below it."]
    else:
        lines += ["| study | kind | score (any) | reference | figure |", "|---|---|---|---|---|"]
    lines += [f"| {m['study']} | {m['kind']} | {m['score_any']:.3f} | "
              f"{', '.join(c for c, v in m['reference'].items() if v) or 'no bleed'} | {m['figure']} |"
              for m in metrics["misses"]]
    lines += ["", "Figures: roc.png (ROC per class and calibration); misses/."]
    return "\n".join(lines) + "\n"


def _auc_cell(e: dict) -> str:
    """An AUC with its CI, or why there is none."""
    if not e["positives"]:
        return "no positive study"
    if e["positives"] == e["studies"]:
        return "no negative study"
    used, n_boot = e.get("auc_ci_resamples", [0, 0])
    lo, hi = e["auc_ci"]
    if n_boot and not (math.isnan(lo) or math.isnan(hi)):
        return f"{e['auc']:.3f} ({lo:.3f}-{hi:.3f}; {used}/{n_boot} resamples)"
    return f"{e['auc']:.3f} (CI not estimable: {used}/{n_boot} resamples had both classes)"


def _pair(op: dict) -> str:
    """Sensitivity / specificity, each "-" where the set has no study to measure it on."""
    return " / ".join("-" if math.isnan(op[k]) else f"{op[k]:.2f}" for k in ("sensitivity", "specificity"))


def select_misses(table: pd.DataFrame, threshold: float, k: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The worst misses at the bundle's operating point on `any`: the false negatives (positive studies scored below
    ``threshold``) lowest first, the false positives (negative studies at or above it) highest first, ``k`` of each
    at most. A positive above the threshold was found, so it is never shown as a miss."""
    pos = table[(table.ref_any == 1) & (table.score_any < threshold)].sort_values("score_any").head(k)
    neg = table[(table.ref_any == 0) & (table.score_any >= threshold)].sort_values("score_any", ascending=False).head(k)
    return pos, neg


def _worst_misses(out: Path, table: pd.DataFrame, series: list[Series], keys: dict, cached: dict,
                  predictor: Predictor, masks: Path | None, threshold: float, k: int = 3) -> list[dict]:
    """The worst misses (:func:`select_misses`), each with predict's figure of its first series (the blood outlined
    where there are masks): its images read again, its probabilities those ``cached`` (series UID → its result)
    holds, so that only the figure's Grad-CAM runs a network."""
    pos, neg = select_misses(table, threshold, k)
    misses = []
    (out / "misses").mkdir(exist_ok=True)
    for kind, rows in (("false negative", pos), ("false positive", neg)):
        for study, row in rows.iterrows():
            mine = [s for s in series if keys[s.series] == study]
            if not mine:
                continue
            s = mine[0]
            images = read_series(predictor, s, [])
            if images is None or s.series not in cached:
                continue
            probs = np.array([[r[c] for c in LABELS] for r in cached[s.series]["slices"]])
            result = series_result(predictor, s, images, probs)
            figure = f"misses/{len(misses)}_{'fn' if kind == 'false negative' else 'fp'}.png"
            series_figure(out / figure, s, result, predictor, masks)
            misses.append({"study": study, "kind": kind, "score_any": float(row.score_any), "figure": figure,
                           "reference": {c: int(row[f"ref_{c}"]) for c in LABELS}})
    with atomic_path(out / "misses.csv") as tmp:
        pd.DataFrame(misses).drop(columns="reference", errors="ignore").to_csv(tmp, index=False)
    return misses
