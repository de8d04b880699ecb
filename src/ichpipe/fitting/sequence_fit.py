"""The sequence model's training loop and its folds, shared by stage 4 (one CNN's embeddings) and the ensemble's
sequence model (several CNNs' side by side).

How leakage is avoided. Embedding spaces of different fold CNNs are not aligned, so the model of fold k uses CNN_k's
embeddings only: those of fold k's patients, whom CNN_k never saw, of CNN_k's own training patients (``train_on``
train / train_and_oof) and of the test set. Fold k's patients are split again, by patient, into ``inner_folds``
groups; each inner model trains on the other groups and predicts its own group (:func:`fit_nested`), or one model
trained on CNN_k's training patients predicts them all (:func:`fit_on_training_patients`). Every OOF prediction comes
from a model that never saw the patient, over features from a CNN that never saw the patient.

Augmentation (``lstm.window``, ``lstm.reverse``; the 1st place's): a training series is cut to a random window and
read backward at random; ``lstm.reverse_tta`` predicts each series forward and backward and averages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ichpipe.base.config import LstmConfig
from ichpipe.base.device import amp_settings, autocast, default_device
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS, N_LABELS
from ichpipe.base.paths import SERIES_KEYS
from ichpipe.networks.losses import make_loss
from ichpipe.networks.optim import make_optimizer
from ichpipe.networks.sequence_models import (
    MODEL_KEYS,
    PREDICT_BATCH,
    ConcatColumns,
    SequenceModel,
    SliceFeatures,
    predict_rows,
    to_device,
)
from ichpipe.scoring.folds import assign_folds
from ichpipe.scoring.metrics import weighted_log_loss

REFIT = 999  # seed offset of the refit on all the fold's patients (inner folds use their index)


def concat_features(first: SliceFeatures, second: SliceFeatures) -> SliceFeatures:
    """One set of ``first``'s rows then ``second``'s (its series renumbered after ``first``'s); in memory."""
    if first.emb.shape[1] != second.emb.shape[1]:
        raise InputError(f"embedding widths differ: {first.emb.shape[1]} vs {second.emb.shape[1]}")
    if first.labels is None or second.labels is None:
        raise InputError("only labelled sets can be joined for training")
    n = len(first.ids)
    z = None if first.z is None or second.z is None else np.concatenate([first.z, second.z])
    emb = [f.emb if isinstance(f.emb, np.ndarray) else f.emb[np.arange(len(f.ids))] for f in (first, second)]
    return SliceFeatures(np.concatenate([first.ids, second.ids]), np.concatenate(emb),
                         np.concatenate([first.logits, second.logits]), np.concatenate([first.labels, second.labels]),
                         np.concatenate([first.patients, second.patients]),
                         first.series + [r + n for r in second.series], z, first.blocks)


def load_features(folder: Path, name: str, meta: pd.DataFrame) -> SliceFeatures:
    """Embeddings + logits of ``folder/<name>_*`` joined with the metadata, grouped into z-ordered series."""
    ids_path = folder / f"{name}_ids.csv"
    if not ids_path.exists():
        raise InputError(f"{ids_path}: not found; run `make embed` first")
    ids = pd.read_csv(ids_path).image_id.to_numpy()
    # Memory-mapped: at real size a fold's OOF + test embeddings are ~2 GB; batches read the rows they need.
    emb, logits = np.load(folder / f"{name}_emb.npy", mmap_mode="r"), np.load(folder / f"{name}_logits.npy")
    if len(emb) != len(ids) or len(logits) != len(ids):
        raise InputError(f"{folder}: {name} arrays have {len(emb)}/{len(logits)} rows for {len(ids)} ids")
    rows = meta.set_index("image_id").reindex(ids)
    if rows.PatientID.isna().any():
        raise InputError(f"{folder}: {int(rows.PatientID.isna().sum())} {name} ids are not in the metadata, "
                         f"e.g. {ids[rows.PatientID.isna().to_numpy()][0]}; embed again after preprocessing")
    order = rows.reset_index(drop=True).assign(row=np.arange(len(ids)))
    series = [g.sort_values("slice_index").row.to_numpy() for _, g in order.groupby(SERIES_KEYS, sort=True)]
    labels = rows[list(LABELS)].to_numpy(np.float32)
    return SliceFeatures(ids, emb, logits, None if np.isnan(labels).any() else labels,
                         rows.PatientID.to_numpy(), series, rows.z.to_numpy(np.float64) if "z" in rows else None)


def standardisation(emb: np.ndarray, rows: np.ndarray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (+1e-6) of ``emb[rows]`` as float32, accumulated in float64 a chunk of rows at a
    time: a memory-mapped float16 (N, 2048) array is never copied whole into RAM."""
    total = np.zeros(emb.shape[1], np.float64)
    squares = np.zeros(emb.shape[1], np.float64)
    for i in range(0, len(rows), chunk):
        x = emb[np.sort(rows[i:i + chunk])].astype(np.float64)
        total += x.sum(axis=0)
        squares += np.square(x).sum(axis=0)
    mean = total / len(rows)
    std = np.sqrt(np.maximum(squares / len(rows) - np.square(mean), 0.0))
    return mean.astype(np.float32), (std + 1e-6).astype(np.float32)


def model_settings(cfg: LstmConfig) -> dict:
    """The settings that rebuild a :class:`SequenceModel` (saved with its weights)."""
    return {k: getattr(cfg, k) for k in MODEL_KEYS}


def training_rows(feats: SliceFeatures, which: list[int], cfg: LstmConfig, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """The rows of the training series ``which`` as one batch reads them: each cut to a random window of
    ``cfg.window`` slices (0: whole) and read backward with chance ``cfg.reverse``. The generator is only drawn
    from when an augmentation is on, so that without them a run repeats the runs made before they existed."""
    rows = [feats.series[i] for i in which]
    if cfg.window:
        starts = [int(rng.integers(0, len(r) - cfg.window + 1)) if len(r) > cfg.window else 0 for r in rows]
        rows = [r[s:s + cfg.window] for r, s in zip(rows, starts, strict=True)]
    if cfg.reverse:
        rows = [r[::-1] if rng.random() < cfg.reverse else r for r in rows]
    return rows


def _step(model, optimizer, scaler, loss_fn, batch, device, amp) -> tuple[torch.Tensor, int]:
    """One optimisation step on a padded batch; its loss (on the device) and the slices it covered."""
    emb, logits, labels, lengths, _, z = batch
    mask = torch.arange(emb.shape[1])[None, :] < lengths[:, None]
    n = int(mask.sum())
    mask = to_device(mask, device)
    with autocast(device, amp):
        out = model(to_device(emb, device), to_device(logits, device), lengths, to_device(z, device))
    loss = loss_fn(out[mask], to_device(labels, device)[mask])
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach().double() * n, n


def fit_predict(feats: SliceFeatures, train_series: list[int], targets: list[tuple[SliceFeatures, list[int]]],
                cfg: LstmConfig, seed: int, device: torch.device | None = None,
                keep: dict | None = None, amp_mode: str = "auto") -> tuple[list[np.ndarray], list[dict]]:
    """Train one sequence model on ``train_series`` of ``feats``; probabilities for each target, bagged over the
    last epochs.

    Runs on ``device`` (default: the GPU when there is one), with mixed precision as ``train.amp``
    (``amp_mode``: on CUDA fp16 with loss scaling by default; off on the CPU). Returns one (N, 6) array per
    target (rows outside its series: NaN) and the per-epoch history (train loss, and the first target's loss
    when it has labels). With ``keep`` (a dict), also stores what predicting again needs: the
    standardisation ``mean``/``std`` and the weights of every bagged epoch (``bag``), on the CPU.
    """
    device = device or default_device()
    amp = amp_settings(amp_mode, device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if cfg.standardize:
        mean, std = standardisation(feats.emb, np.concatenate([feats.series[i] for i in train_series]))
    else:
        mean, std = np.zeros(feats.emb.shape[1], np.float32), np.ones(feats.emb.shape[1], np.float32)
    model = SequenceModel(feats.emb.shape[1], **model_settings(cfg), blocks=feats.blocks).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=cfg.lr_gamma) if cfg.lr_gamma != 1 else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
    loss_fn = make_loss("weighted_bce", device)
    bags = [np.zeros((len(f.ids), N_LABELS), np.float64) for f, _ in targets]
    n_bagged = 0
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(train_series)
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for i in range(0, len(order), cfg.batch_size):
            batch = feats.batch_rows(training_rows(feats, list(order[i:i + cfg.batch_size]), cfg, rng), mean, std)
            loss, n = _step(model, optimizer, scaler, loss_fn, batch, device, amp)
            total += loss  # summed on the device: no sync per step
            count += n
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch, "train_loss": total.item() / count}
        bagging = epoch >= cfg.epochs - cfg.bag_last
        for k, (bag, (target, series)) in enumerate(zip(bags, targets, strict=True)):
            if not bagging and k > 0:
                break
            probs = predict_rows(model, target, series, mean, std, PREDICT_BATCH, device, amp, cfg.reverse_tta)
            if k == 0 and target.labels is not None:  # the first target's loss per epoch, for the curves
                rows = np.concatenate([target.series[i] for i in series])
                record["val_loss"] = weighted_log_loss(target.labels[rows], probs[rows])
            if bagging:
                bag += probs
        if bagging and keep is not None:
            keep.setdefault("bag", []).append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        n_bagged += bagging
        history.append(record)
    if keep is not None:
        keep.update(mean=torch.from_numpy(mean), std=torch.from_numpy(std), emb_dim=int(feats.emb.shape[1]),
                    lstm=model_settings(cfg), reverse_view=bool(cfg.reverse_tta))
        if feats.blocks:
            keep["blocks"] = list(feats.blocks)
    return [bag / n_bagged for bag in bags], history


def inner_groups(feats: SliceFeatures, n: int, seed: int) -> np.ndarray:
    """Inner fold of each series: fold k's patients split again by patient, stratified like the outer folds."""
    frame = pd.DataFrame(feats.labels, columns=list(LABELS)).assign(PatientID=feats.patients)
    n = min(n, frame.PatientID.nunique())
    if n < 2:
        raise InputError(f"lstm.inner_folds: the fold holds {frame.PatientID.nunique()} patient(s); need at least 2")
    inner = assign_folds(frame, n, seed).to_numpy()
    return np.array([inner[s[0]] for s in feats.series])


def fit_on_training_patients(cfg: LstmConfig, seed: int, amp: str, train: SliceFeatures, oof: SliceFeatures,
                             test: SliceFeatures) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """``train_on=train`` (the 2nd place's recipe): one model on CNN_k's training patients (and whatever else
    ``train`` holds, e.g. pseudo-labelled test series) predicts fold k's held-out patients (neither it nor the CNN
    saw them) and the test set; returns (oof, test, history, saved). ``seed``: the model seed (``cfg.seed`` of the
    run), ``amp``: ``train.amp``."""
    keep: dict = {}
    (oof_pred, test_pred), history = fit_predict(
        train, list(range(len(train.series))),
        [(oof, list(range(len(oof.series)))), (test, list(range(len(test.series))))],
        cfg, seed * 1000 + REFIT, keep=keep, amp_mode=amp)
    return oof_pred, test_pred, [{"inner_fold": "all", **h} for h in history], keep


def fit_nested(cfg: LstmConfig, seed: int, amp: str, oof_feats: SliceFeatures, test: SliceFeatures,
               extra: SliceFeatures | None, progress: bool, desc: str = "inner folds"
               ) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """``train_on`` oof / train_and_oof: fold k's held-out patients split into inner folds, each predicted by a
    model trained on the others (plus ``extra``, CNN_k's training patients, when given); the test set by a refit on
    all of them. Returns (oof, test, history, the refit's saved models)."""
    groups = inner_groups(oof_feats, cfg.inner_folds, seed)
    all_series = np.arange(len(oof_feats.series))
    feats, always = oof_feats, []  # the training set: OOF rows first (their row numbers stay), then extras
    if extra is not None:
        feats = concat_features(oof_feats, extra)
        always = list(range(len(oof_feats.series), len(feats.series)))
    oof = np.full((len(oof_feats.ids), N_LABELS), np.nan)
    history = []
    for j in tqdm(np.unique(groups), desc=desc, leave=False, disable=not progress):
        train_series, val_series = list(all_series[groups != j]) + always, list(all_series[groups == j])
        (val_pred,), hist = fit_predict(feats, train_series, [(feats, val_series)], cfg, seed * 1000 + int(j),
                                        amp_mode=amp)
        rows = np.concatenate([oof_feats.series[i] for i in val_series])
        oof[rows] = val_pred[rows]
        history += [{"inner_fold": int(j), **h} for h in hist]
    # The test set and new studies: one refit on all the fold's patients, its bagged epochs saved.
    keep: dict = {}
    (test_pred,), _ = fit_predict(feats, list(all_series) + always, [(test, list(range(len(test.series))))],
                                  cfg, seed * 1000 + REFIT, keep=keep, amp_mode=amp)
    return oof, test_pred, history, keep


def member_features(folders: list[Path], name: str, meta: pd.DataFrame) -> SliceFeatures:
    """Several CNNs' features of the same slices side by side (the ensemble's sequence model, the 1st place's): the
    ``<name>_*`` arrays of each embedding folder, aligned by image id and read lazily, then one block of every
    CNN's six logits; the series' base logits (what the model corrects) are the mean of the CNNs' logits."""
    parts = [load_features(f, name, meta) for f in folders]
    first = parts[0]
    maps = []
    for folder, part in zip(folders, parts, strict=True):
        where = pd.Index(part.ids).get_indexer(first.ids)
        if len(part.ids) != len(first.ids) or (where < 0).any():
            raise InputError(f"{folder}: its {name} slices ({len(part.ids)}) are not those of {folders[0]} "
                             f"({len(first.ids)}); embed both members on today's metadata")
        maps.append(where)
    logits = np.stack([p.logits[m] for p, m in zip(parts, maps, strict=True)])  # (members, N, 6)
    block = np.transpose(logits, (1, 0, 2)).reshape(len(first.ids), -1).astype(np.float32)
    emb = ConcatColumns([p.emb for p in parts] + [block], maps + [np.arange(len(first.ids))])
    return SliceFeatures(first.ids, emb, logits.mean(axis=0).astype(np.float32), first.labels, first.patients,
                         first.series, first.z, emb.widths)
