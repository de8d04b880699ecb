"""A portable model bundle: everything `predict` needs to run a finished experiment on new studies.

    <bundle>/
      bundle.yaml        what the models expect and how to combine them: preprocessing (windows, size,
                         mode), network input (size, border crop, TTA views), backbone, folds and epochs,
                         blend weights, the training prior, operating thresholds per class, series-level
                         calibration, CV scores, git commit, and the resolved configs of the runs
      cnn/fold<k>_epoch<NN>.pt    the bagged CNN checkpoints of every fold (weights only; fp16 with fp16=True)
      lstm/fold<k>_epoch<NN>.pt   the sequence models of every fold (the refit of stage 4: bagged weights
                                  and standardisation)
      manifest.json      sha256 of every file above, written last

Loading (ichpipe.networks.bundle_format) checks the manifest (a changed, missing or extra file is a one-line error)
and reads every tensor file with ``torch.load(weights_only=True)``: a bundle holds no pickled code, so it is safe to
receive from someone else. Nothing outside the bundle is needed: no training data, no network.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from ichpipe.base.config import Config, ReportConfig, to_dict
from ichpipe.base.errors import InputError
from ichpipe.base.files import OUTPUT_MARKER, atomic_dir, atomic_path, load_tensors, save_torch, writer_lock
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import (
    SERIES_KEYS,
    blend_dir,
    checkpoint_path,
    data_paths,
    epoch_number,
    experiment_dir,
    finished_dirs,
    read_metadata,
    run_dir,
)
from ichpipe.networks.bundle_format import FORMAT, MANIFEST, Bundle, BundleInfo, sha256
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.metrics import logit, threshold_for_recall
from ichpipe.scoring.metrics import prior as prior_of
from ichpipe.scoring.results import PREDICTION_FILES, git_state


def _series_calibration(oof: pd.DataFrame, meta: pd.DataFrame) -> dict:
    """Per class, Platt scaling of the series' highest slice probability against "the series has it"."""
    frame = meta.set_index("image_id").loc[oof.index, [*SERIES_KEYS, *LABELS]]
    probs = oof.add_prefix("p_")
    joined = pd.concat([frame, probs], axis=1).groupby(SERIES_KEYS)
    out = {}
    for name in LABELS:
        x = logit(np.clip(joined[f"p_{name}"].max().to_numpy(), 1e-6, 1 - 1e-6))[:, None]
        y = joined[name].max().to_numpy().astype(int)
        if 0 < y.sum() < len(y):
            fit = LogisticRegression(C=1e4).fit(x, y)
            out[name] = {"slope": float(fit.coef_[0, 0]), "intercept": float(fit.intercept_[0])}
        else:  # one class only among the OOF series: the identity
            out[name] = {"slope": 1.0, "intercept": 0.0}
    return out


def _sens_spec(top: np.ndarray, y: np.ndarray, point: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of "the series' highest slice reaches ``point``" (None without positives or
    negatives)."""
    flagged = top >= point
    return (float(flagged[y].mean()) if y.any() else None, float((~flagged[~y]).mean()) if (~y).any() else None)


def operating_points(oof: pd.DataFrame, meta: pd.DataFrame, report: ReportConfig) -> dict[str, dict]:
    """Per class (``OperatingThreshold``): the flagging point, chosen for the slice recall ``report`` asks, and the
    rule-in point, the lowest series maximum whose OOF series specificity reaches ``report.rule_in_specificity``
    (never below the flagging point); each measured on the OOF series."""
    truth = meta.set_index("image_id").loc[oof.index, list(LABELS)].to_numpy()
    series = pd.concat([meta.set_index("image_id").loc[oof.index, [*SERIES_KEYS, *LABELS]],
                        oof.add_prefix("p_")], axis=1).groupby(SERIES_KEYS)
    out = {}
    for i, name in enumerate(LABELS):
        target = report.target_recall.get(name, report.default_recall)
        if not truth[:, i].sum():
            out[name] = {"threshold": 0.5, "recall": None}
            continue
        t = float(threshold_for_recall(truth[:, i], oof[name].to_numpy(), target).threshold)
        top, y = series[f"p_{name}"].max().to_numpy(), series[name].max().to_numpy() > 0.5
        negatives = np.sort(top[~y])
        rule_in = t
        if len(negatives):  # just above the k-th lowest negative: at least the asked share of negatives below it
            k = max(1, math.ceil(report.rule_in_specificity * len(negatives) - 1e-9))
            rule_in = max(t, float(np.nextafter(negatives[k - 1], np.inf)))
        (sens, spec), (in_sens, in_spec) = _sens_spec(top, y, t), _sens_spec(top, y, rule_in)
        out[name] = {"threshold": t, "recall": target, "series_sensitivity": sens, "series_specificity": spec,
                     "rule_in": rule_in, "rule_in_sensitivity": in_sens, "rule_in_specificity": in_spec,
                     "series": len(y), "positive_series": int(y.sum())}
    return out


def make_bundle(cfg: Config, out: str | os.PathLike, fp16: bool = False, archive: bool = False) -> Path:
    """Pack the finished experiment of ``cfg`` into the directory ``out`` (and ``out.tar.gz`` with ``archive``)."""
    if cfg.seeds:
        raise InputError(f"{cfg.experiment}: a bag of seeds {list(cfg.seeds)}; a bundle holds one run: bundle one seed "
                         f"as its own experiment (train it without seeds), or bundle each seed with seed=<s> seeds=[]")
    out = Path(out)
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    exp = experiment_dir(cfg)
    preds_path = blend_dir(cfg) / PREDICTION_FILES["oof"]
    if not preds_path.exists():
        raise InputError(f"{preds_path}: not found; run `make submission` first (the bundle carries its CV scores)")
    folds = sorted(int(k) for k in meta.fold.dropna().unique())
    use_lstm = cfg.blend.lstm_weight > 0
    inputs = [blend_dir(cfg), *(run_dir(cfg, k) for k in folds)]  # what the bundle is made from stays
    with writer_lock(exp, f"make bundle of {cfg.experiment}"), atomic_dir(out, inputs, "the bundle") as tmp:
        staged = Bundle(tmp, None)  # the bundle's own file names
        (tmp / "cnn").mkdir()
        (tmp / "lstm").mkdir()
        epochs: dict[int, list[int]] = {}
        check_fold_table([run_dir(cfg, k) for k in folds], meta)
        for k in folds:
            run = run_dir(cfg, k)
            done = finished_dirs(run / "embeddings")
            if not done:
                raise InputError(f"{run}/embeddings: no finished embeddings; run `make embed fold={k}` first")
            epochs[k] = [epoch_number(d) for d in done]
            for e in epochs[k]:
                state = load_tensors(checkpoint_path(run, e))
                if fp16:
                    state = {n: t.half() if t.is_floating_point() else t for n, t in state.items()}
                save_torch(state, staged.cnn_path(k, e))
                if use_lstm:
                    models = run / "lstm" / f"epoch{e:02d}" / "models.pt"
                    if not models.exists():
                        raise InputError(f"{models}: not found; run `make lstm fold={k}` (stage 4 saves its models)")
                    shutil.copyfile(models, staged.lstm_path(k, e))
        oof = pd.read_parquet(preds_path)
        final = oof[oof.model == "blend"].set_index("image_id")[list(LABELS)]
        thresholds = operating_points(final, meta, cfg.report)
        cv_path = blend_dir(cfg) / "cv.json"
        cv = json.loads(cv_path.read_text()) if cv_path.exists() else {}
        pcfg, tcfg = cfg.preprocess, cfg.train
        info = BundleInfo.model_validate({
            "format": FORMAT, "experiment": cfg.experiment, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "git": git_state(), "backbone": cfg.model.backbone, "fp16": fp16,
            "preprocess": {"windows": pcfg.windows, "size": pcfg.size, "mode": pcfg.mode},
            "input": {"image_size": tcfg.image_size, "crop_border": tcfg.crop_border, "tta": list(cfg.embed.tta),
                      "batch_size": cfg.embed.batch_size},
            "folds": folds, "epochs": {int(k): v for k, v in epochs.items()}, "lstm": use_lstm,
            "blend": {"epoch_weights": dict(cfg.blend.epoch_weights), "fold_weights": dict(cfg.blend.fold_weights),
                      "lstm_weight": cfg.blend.lstm_weight, "clip": cfg.blend.clip},
            "prior": [float(x) for x in prior_of(meta[meta.fold.notna()][list(LABELS)])],
            "thresholds": thresholds, "series_calibration": _series_calibration(final, meta),
            "cv": {where: {m: s.get("weighted") for m, s in rows.items()} for where, rows in cv.items()
                   if where in ("oof", "test")},
            "config": to_dict(cfg),
        })
        (tmp / "bundle.yaml").write_text(info.to_yaml())
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
        manifest = {"format": FORMAT, "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if archive:
        with atomic_path(out.with_name(out.name + ".tar.gz")) as tmp, tarfile.open(tmp, mode="w:gz") as tar:
            tar.add(out, arcname=out.name, filter=lambda m: None if Path(m.name).name == OUTPUT_MARKER else m)
    return out


