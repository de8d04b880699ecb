#!/usr/bin/env python
"""The sequence stage and the blend at the real data's size, on fake but real-sized inputs.

    python benchmarks/bench_scale.py [--scale 1.0] [--work /tmp/ichpipe_scale] [--config ...] [key=value ...]

Builds (once, under --work) a data root shaped like the competition's after stages 1-3: 752k train +
121k test slices in ~21k series of ~19k patients, five folds, and for every fold three embedded
checkpoints (logits + ids; fold 0's last checkpoint also with 2048-d embeddings of its held-out, test
and training slices, stored as ``embed.dtype``) and their LSTM outputs. Then, each in its own process so
that its peak RSS is its own:

- ``lstm``: fold 0's features as stage 4 loads them (memory-mapped), one of the config's sequence models
  (``lstm.kind``, width, batch, optimiser) trained for ``--lstm-epochs`` epoch(s) on what
  ``lstm.train_on`` trains it on (an inner fold of the held-out patients, the CNN's training patients, or
  both), and its predictions: seconds per epoch and per prediction, peak RSS (and GPU memory), and the
  projection for the whole stage (5 folds x the config's embedded epochs x models per checkpoint x epochs);
- ``blend``: stage 5 over every fold and checkpoint: seconds and peak RSS;
- ``context``: the ensemble's context stacker (``--context-config``: its members' count and neighbours) over fake
  member probabilities of every slice: its feature matrix, one LightGBM model's seconds, peak RSS, the whole
  combiner projected.

Also prints stage 3's disk at the real size for the config (every fold and embedded epoch, its dtype).
``--scale 0.01`` runs the same path on 1% of the slices (a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ichpipe.base.config import load_config
from ichpipe.base.label_csv import wide_to_long
from ichpipe.base.labels import LABELS
from ichpipe.scoring.folds import record_fold_table

REPO = Path(__file__).resolve().parents[1]
REAL = {"train": 752_803, "test": 121_232, "series": 21_744, "patients": 18_938}  # RSNA_FACTS.md, stage 2
N_FOLDS, CHECKPOINTS, DIM = 5, (2, 3, 4), 2048


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build(root: Path, scale: float, dim: int, dtype: str = "float16", seed: int = 0) -> dict:
    """The fake data root; returns its sizes. Skipped when ``root/sizes.json`` exists for the same scale, width
    and dtype."""
    marker = root / "sizes.json"
    if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in ("scale", "dim", "dtype")} == \
            {"scale": scale, "dim": dim, "dtype": dtype}:
        return json.loads(marker.read_text())
    rng = np.random.default_rng(seed)
    n_series = max(10, int(REAL["series"] * scale))
    n_slices = int((REAL["train"] + REAL["test"]) * scale)
    lengths = rng.multinomial(n_slices - 20 * n_series, np.ones(n_series) / n_series) + 20  # >= 20 slices each
    n_patients = max(2, int(REAL["patients"] * scale))
    # every patient has a series; the rest are second studies of random patients (as the real ~1.15 per patient)
    patients = np.concatenate([np.arange(min(n_patients, n_series)),
                               rng.integers(0, n_patients, max(0, n_series - n_patients))])
    patients = rng.permutation(patients)
    test_series = rng.random(n_series) < REAL["test"] / (REAL["train"] + REAL["test"])
    series_of = np.repeat(np.arange(n_series), lengths)
    n = len(series_of)
    labels = (rng.random((n, len(LABELS))) < 0.03).astype(np.float32)
    labels[:, -1] = labels[:, :-1].max(axis=1)
    split = np.where(test_series[series_of], "test", "train")
    patient = np.char.add("P", patients[series_of].astype(str))
    patient = np.where(split == "test", np.char.add("T", patient), patient)
    fold_of_patient = {p: i % N_FOLDS for i, p in enumerate(rng.permutation(np.unique(patient[split == "train"])))}
    meta = pd.DataFrame({
        "image_id": [f"ID_{i:09x}" for i in range(n)], "split": split, "PatientID": patient,
        "StudyInstanceUID": np.char.add("S", series_of.astype(str)), "SeriesInstanceUID": np.char.add("S",
                                                                                                      series_of.astype(str)),
        "slice_index": np.concatenate([np.arange(k) for k in lengths]),
    })
    meta[list(LABELS)] = np.where((split == "train")[:, None], labels, np.nan)
    meta["fold"] = pd.array([fold_of_patient.get(p) if s == "train" else None for p, s in zip(patient, split,
                                                                                              strict=True)],
                            dtype="Int64")
    (root / "processed").mkdir(parents=True, exist_ok=True)
    meta.to_parquet(root / "processed" / "metadata.parquet", index=False)
    test_ids = meta.image_id[meta.split == "test"].to_numpy()
    wide_to_long(pd.DataFrame(0.5, index=test_ids, columns=list(LABELS))).to_csv(
        root / "stage_2_sample_submission.csv", index=False)
    sets_of = {k: {"oof": meta.image_id[meta.fold == k].to_numpy(), "test": test_ids,
                   "train": meta.image_id[meta.fold.notna() & (meta.fold != k)].to_numpy()} for k in range(N_FOLDS)}
    for k in range(N_FOLDS):
        run = root / "runs" / "scale" / f"fold{k}"
        record_fold_table(run, meta)
        for e in CHECKPOINTS:
            emb_dir, lstm_dir = run / "embeddings" / f"epoch{e:02d}", run / "lstm" / f"epoch{e:02d}"
            emb_dir.mkdir(parents=True, exist_ok=True)
            lstm_dir.mkdir(parents=True, exist_ok=True)
            for name, ids in sets_of[k].items():
                last = k == 0 and e == CHECKPOINTS[-1]
                if name == "train" and not last:  # only stage 4's input needs the training patients
                    continue
                pd.DataFrame({"image_id": ids}).to_csv(emb_dir / f"{name}_ids.csv", index=False)
                np.save(emb_dir / f"{name}_logits.npy", rng.normal(-3, 1.5, (len(ids), len(LABELS))).astype(np.float32))
                if last:  # written in chunks: never N x 2048 in RAM here either; ReLU-pooled-like values
                    emb = np.lib.format.open_memmap(emb_dir / f"{name}_emb.npy", mode="w+", dtype=np.dtype(dtype),
                                                    shape=(len(ids), dim))
                    for i in range(0, len(ids), 20_000):
                        emb[i:i + 20_000] = rng.gamma(1.0, 0.5, (min(20_000, len(ids) - i), dim))
                    emb.flush()
                    del emb
                if name == "train":
                    continue
                probs = rng.uniform(0.001, 0.2, (len(ids), len(LABELS))).astype(np.float32)
                pd.DataFrame(probs, columns=list(LABELS)).assign(image_id=ids).to_parquet(lstm_dir / f"{name}.parquet")
            (emb_dir / "done").write_text("none\n")
            (lstm_dir / "done").write_text("fake\n")
    sizes = {"scale": scale, "slices": n, "train": int((split == "train").sum()), "test": len(test_ids),
             "series": n_series, "patients": int(len(np.unique(patient))), "dim": dim, "dtype": dtype,
             "fold0_oof": len(sets_of[0]["oof"]), "fold0_train": len(sets_of[0]["train"])}
    marker.write_text(json.dumps(sizes))
    return sizes


def part_lstm(cfg, epochs: int) -> dict:
    from ichpipe.base.device import amp_settings, default_device
    from ichpipe.base.paths import data_paths, read_metadata, run_dir
    from ichpipe.fitting.sequence_fit import concat_features, fit_predict, inner_groups, load_features
    from ichpipe.networks.sequence_models import MODEL_KEYS, PREDICT_BATCH, SequenceModel, predict_rows

    schedule = cfg.lstm  # the configured epochs and bagging, for the projection
    lcfg = cfg.lstm.model_copy(update={"epochs": epochs, "bag_last": 1})  # this run: a few epochs only
    folder = run_dir(cfg, 0) / "embeddings" / f"epoch{CHECKPOINTS[-1]:02d}"
    start = time.perf_counter()
    meta = read_metadata(data_paths(cfg))
    oof, test = load_features(folder, "oof", meta), load_features(folder, "test", meta)
    train = load_features(folder, "train", meta) if lcfg.train_on != "oof" else None
    groups = inner_groups(oof, lcfg.inner_folds, cfg.seed)
    load_s = time.perf_counter() - start
    all_series = np.arange(len(oof.series))
    inner_val = list(all_series[groups == 0])
    if lcfg.train_on == "train":  # one model per checkpoint: the CNN's training patients -> held-out + test
        feats, fit_series, val_feats, val = train, list(range(len(train.series))), oof, list(all_series)
        models = 1
    else:
        feats, fit_series = oof, list(all_series[groups != 0])
        if train is not None:
            feats = concat_features(oof, train)
            fit_series += list(range(len(oof.series), len(feats.series)))
        val_feats, val, models = oof, inner_val, len(np.unique(groups)) + 1  # inner models + the refit
    device = default_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fit_predict(feats, fit_series, [(val_feats, val), (test, list(range(len(test.series))))], lcfg, cfg.seed, device,
                amp_mode=cfg.train.amp)
    fit_s = time.perf_counter() - start
    # predictions alone, to split the fit's time into training and prediction
    model = SequenceModel(oof.emb.shape[1], **{k: getattr(lcfg, k) for k in MODEL_KEYS}).to(device)
    mean, std = np.zeros(oof.emb.shape[1], np.float32), np.ones(oof.emb.shape[1], np.float32)
    amp = amp_settings(cfg.train.amp, device)
    start = time.perf_counter()
    predict_rows(model, test, list(range(len(test.series))), mean, std, PREDICT_BATCH, device, amp)
    test_s = time.perf_counter() - start
    start = time.perf_counter()
    predict_rows(model, val_feats, val, mean, std, PREDICT_BATCH, device, amp)
    val_s = time.perf_counter() - start
    epoch_s = (fit_s - test_s - val_s) / epochs
    per_model = schedule.epochs * epoch_s + schedule.epochs * val_s + schedule.bag_last * test_s
    checkpoints = len(cfg.embed.epochs) or cfg.train.epochs
    return {"device": str(device), "load_s": load_s, "train_slices": int(sum(len(feats.series[i]) for i in fit_series)),
            "epoch_s": epoch_s, "predict_val_s": val_s, "predict_test_s": test_s, "models": models,
            "projected_stage_h": N_FOLDS * checkpoints * models * per_model / 3600,
            "projection": f"{N_FOLDS} folds x {checkpoints} checkpoints x {models} model(s) "
                          f"(train_on={lcfg.train_on}) x ({schedule.epochs} epochs + predictions)",
            "peak_rss_gb": _rss_gb(),
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "parameters": sum(p.numel() for p in model.parameters())}


def stage3_disk_gb(cfg, dim: int) -> tuple[float, float]:
    """Stage 3's embeddings at the real size for ``cfg`` (every fold, every embedded epoch; training slices too
    when ``embed.train``): GB as stored (``embed.dtype``) and as float32 would be."""
    rows = REAL["train"] / N_FOLDS + REAL["test"] + (REAL["train"] * (N_FOLDS - 1) / N_FOLDS if cfg.embed.train else 0)
    checkpoints = len(cfg.embed.epochs) or cfg.train.epochs
    total = N_FOLDS * checkpoints * rows * dim
    return total * np.dtype(cfg.embed.dtype).itemsize / 1e9, total * 4 / 1e9


def part_blend(cfg) -> dict:
    from ichpipe.stages.blend import run_blend

    start = time.perf_counter()
    result = run_blend(cfg)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": _rss_gb(),
            "oof_images": result.scores["oof"]["blend"].n_images}


def part_context(cfg, members: int) -> dict:
    """The ensemble's context stacker at this size: ``members`` members' probabilities (fake, label-correlated) of
    every labelled and test slice, its feature matrix, and one of its LightGBM models (fold 0, class any, inner group
    0) trained and predicting the test set; the whole combiner projected (folds x classes x inner groups)."""
    import lightgbm as lgb

    from ichpipe.base.paths import data_paths, read_metadata
    from ichpipe.fitting.stackers import context_features, lgb_params
    from ichpipe.scoring.folds import assign_folds
    from ichpipe.scoring.metrics import logit

    ccfg = cfg.ensemble.context
    meta = read_metadata(data_paths(cfg))
    labelled, test = meta[meta.fold.notna()].reset_index(drop=True), meta[meta.fold.isna()].reset_index(drop=True)
    rng = np.random.default_rng(0)
    y = labelled[list(LABELS)].to_numpy(np.float32)

    def probs(n: int, truth: np.ndarray | None) -> np.ndarray:
        signal = 0 if truth is None else 3 * (2 * truth - 1)
        return 1 / (1 + np.exp(-(signal - 3 + rng.normal(0, 1.5, (members, n, len(LABELS)))))).astype(np.float32)

    p_oof, p_test = probs(len(labelled), y), probs(len(test), None)
    start = time.perf_counter()
    x, x_test = context_features(p_oof, labelled, ccfg.neighbours), context_features(p_test, test, ccfg.neighbours)
    features_s = time.perf_counter() - start
    base = logit(np.clip(p_oof.mean(axis=0), 1e-6, 1 - 1e-6))
    folds = labelled.fold.to_numpy(int)
    train = folds != 0
    frame = pd.DataFrame(y[train], columns=list(LABELS)).assign(PatientID=labelled.PatientID.to_numpy()[train])
    groups = assign_folds(frame, ccfg.inner_folds, 0).to_numpy()
    xt, bt, yt = x[train], base[train, -1], y[train, -1]
    start = time.perf_counter()
    fit_set = lgb.Dataset(xt[groups != 0], yt[groups != 0], init_score=bt[groups != 0])
    stop_set = lgb.Dataset(xt[groups == 0], yt[groups == 0], init_score=bt[groups == 0], reference=fit_set)
    booster = lgb.train(lgb_params(ccfg, 0, cfg.data.workers), fit_set, ccfg.max_rounds, valid_sets=[stop_set],
                        callbacks=[lgb.early_stopping(ccfg.early_stopping, verbose=False)])
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    booster.predict(x_test, raw_score=True, num_iteration=booster.best_iteration)
    booster.predict(x[~train], raw_score=True, num_iteration=booster.best_iteration)
    predict_s = time.perf_counter() - start
    models = N_FOLDS * len(LABELS) * ccfg.inner_folds
    return {"members": members, "neighbours": ccfg.neighbours, "features": int(x.shape[1]),
            "rows": int(len(x)), "test_rows": int(len(x_test)), "matrix_gb": (x.nbytes + x_test.nbytes) / 1e9,
            "features_s": features_s, "model_s": fit_s, "predict_s": predict_s, "rounds": int(booster.best_iteration),
            "fit_rows": int((groups != 0).sum()), "models": models,
            "projected_h": models * (fit_s + predict_s) / 3600, "peak_rss_gb": _rss_gb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="share of the real slice and series counts")
    parser.add_argument("--dim", type=int, default=DIM, help="embedding width (2048: ResNeXt-101)")
    parser.add_argument("--work", default="/tmp/ichpipe_scale", help="where the fake data root is built (~3 GB)")
    parser.add_argument("--config", default=str(REPO / "configs" / "real" / "resnext101_2nd_place.yaml"))
    parser.add_argument("--lstm-epochs", type=int, default=1)
    parser.add_argument("--part", choices=["all", "lstm", "blend", "context"], default="all")
    parser.add_argument("--context-config", default=str(REPO / "configs" / "ensemble" / "3rd_place_context.yaml"),
                        help="the ensemble whose context stacker is measured (its members' count, neighbours)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    root = Path(args.work)
    cfg = load_config(args.config, [f"data.root={root}", "experiment=scale", f"blend.out_dir={root / 'subs'}",
                                    *args.overrides])
    if args.part == "lstm":
        print(json.dumps(part_lstm(cfg, args.lstm_epochs)))
        return 0
    if args.part == "blend":
        print(json.dumps(part_blend(cfg)))
        return 0
    if args.part == "context":
        ecfg = load_config(args.context_config, [f"data.root={root}", *args.overrides])
        print(json.dumps(part_context(ecfg, max(2, len(ecfg.ensemble.members)))))
        return 0
    start = time.perf_counter()
    sizes = build(root, args.scale, args.dim, cfg.embed.dtype)
    print(f"inputs: {sizes['train']} train + {sizes['test']} test slices, {sizes['series']} series, "
          f"{sizes['patients']} patients, {sizes['dim']}-d {sizes['dtype']} embeddings (fold 0: {sizes['fold0_oof']} "
          f"OOF, {sizes['fold0_train']} training slices); built or found in {time.perf_counter() - start:.0f} s under "
          f"{root}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}")
    results = {}
    for part in ("lstm", "blend", "context"):
        cmd = [sys.executable, __file__, "--part", part, "--work", str(root), "--config", args.config,
               "--context-config", args.context_config, "--lstm-epochs", str(args.lstm_epochs), *args.overrides]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        results[part] = json.loads(res.stdout.strip().splitlines()[-1])
    lstm, blend, ctx = results["lstm"], results["blend"], results["context"]
    gpu = f", peak GPU memory {lstm['peak_gpu_gb']:.2f} GB" if lstm["peak_gpu_gb"] is not None else ""
    print(f"lstm ({lstm['device']}, {cfg.lstm.kind} {cfg.lstm.layers} x {cfg.lstm.hidden}, reduce "
          f"{cfg.lstm.reduce_dim}, "
          f"{lstm['parameters'] / 1e6:.1f}M parameters, batch {cfg.lstm.batch_size} series, "
          f"train_on={cfg.lstm.train_on}): "
          f"load {lstm['load_s']:.1f} s; one epoch over {lstm['train_slices']} slices {lstm['epoch_s']:.1f} s; "
          f"predict held-out {lstm['predict_val_s']:.1f} s, test {lstm['predict_test_s']:.1f} s; "
          f"peak RSS {lstm['peak_rss_gb']:.2f} GB{gpu}")
    print(f"lstm whole stage, projected at this scale: {lstm['projected_stage_h']:.2f} h ({lstm['projection']}); "
          f"x {1 / args.scale:.0f} at the real size: {lstm['projected_stage_h'] / args.scale:.1f} h")
    stored, fp32 = stage3_disk_gb(cfg, args.dim)
    print(f"stage 3 on disk at the real size: {stored:.0f} GB as {cfg.embed.dtype} ({fp32:.0f} GB as float32), "
          f"{N_FOLDS} folds x {len(cfg.embed.epochs) or cfg.train.epochs} epochs, "
          f"{'held-out + test + training' if cfg.embed.train else 'held-out + test'} slices at {args.dim}-d")
    print(f"blend: {blend['seconds']:.1f} s for {blend['oof_images']} OOF images x {len(CHECKPOINTS)} checkpoints "
          f"x {N_FOLDS} folds; peak RSS {blend['peak_rss_gb']:.2f} GB")
    print(f"context stacker ({Path(args.context_config).name}: {ctx['members']} members, z ± {ctx['neighbours']}): "
          f"{ctx['features']} features x {ctx['rows']} labelled + {ctx['test_rows']} test slices = "
          f"{ctx['matrix_gb']:.2f} GB float32, built in {ctx['features_s']:.1f} s; one LightGBM model on "
          f"{ctx['fit_rows']} slices {ctx['model_s']:.1f} s ({ctx['rounds']} rounds) + {ctx['predict_s']:.1f} s to "
          f"predict; peak RSS {ctx['peak_rss_gb']:.2f} GB; the whole combiner, {ctx['models']} models, projected "
          f"{ctx['projected_h']:.2f} h at this scale (x {1 / args.scale:.0f}: {ctx['projected_h'] / args.scale:.1f} h "
          f"at the real size, if the time grows with the rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
