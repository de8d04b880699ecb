"""Stage 4: a bidirectional LSTM over each series' slices, on the CNN's per-slice embeddings.

One sequence per series (PatientID, StudyInstanceUID, SeriesInstanceUID), slices in z order
(``slice_index`` of the metadata, from ImagePositionPatient). Input per slice: the embedding
(standardised, optionally reduced by Linear+ReLU), its differences to the previous and the next
slice, and the CNN's six logits; a two-layer BiLSTM; its output is added to the CNN logits (a skip
connection: an untrained head predicts exactly what the CNN did). Series are padded to the longest
in the batch and packed, so padding reaches neither the LSTM, the loss nor the predictions.

How leakage is avoided. Embedding spaces of different fold CNNs are not aligned, so the LSTM of
fold k uses CNN_k's embeddings only: those of fold k's patients, whom CNN_k never saw, and of the
test set. Fold k's patients are split again, by patient, into ``lstm.inner_folds`` groups; each
inner LSTM trains on the other groups and predicts its own group. Every OOF prediction therefore
comes from an LSTM that never saw the patient, over features from a CNN that never saw the
patient. Test predictions (and new studies, through a model bundle) come from one more LSTM
refit on all of fold k's patients, bagged over its last epochs; its weights are saved.

With ``lstm.train_on=train_and_oof`` (the 2nd place's recipe) every one of those LSTMs also trains
on CNN_k's own training patients (``embed.train=true`` embeds them): on a small set that multiplies
the series it learns from, at the price of features the CNN has fitted. The OOF rows are still
predicted by models that never saw their patients. The joined set is held in memory (rows x width
x 4 bytes: ~5 GB per fold at the real size with 2048-d embeddings).

For fold k and each embedded checkpoint ``embeddings/epoch<NN>/``, writes
``runs/<experiment>/fold<k>/lstm/epoch<NN>/``::

    oof.parquet, test.parquet    image_id + six probabilities (bagged over the last epochs)
    models.pt                    the refit's bagged weights + standardisation (weights only)
    history.csv                  inner fold, epoch, train loss, inner-validation loss (one model per epoch)
    config.yaml                  the resolved config
    done                         written last: a folder without it is redone
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ichpipe.base.config import Config, LstmConfig, describe_changes, may_replace, save_config
from ichpipe.base.device import amp_settings, autocast, default_device
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, save_torch, sweep_temp_files, write_text_atomic, writer_lock
from ichpipe.base.labels import LABELS, N_LABELS
from ichpipe.base.paths import SERIES_KEYS, data_paths, finished_dirs, read_metadata, run_dir
from ichpipe.networks.losses import make_loss
from ichpipe.networks.optim import make_optimizer
from ichpipe.networks.sequence_models import (
    MODEL_KEYS,
    PREDICT_BATCH,
    SequenceModel,
    SliceFeatures,
    predict_rows,
    to_device,
)
from ichpipe.scoring.folds import assign_folds, check_fold_table
from ichpipe.scoring.metrics import sigmoid, weighted_log_loss

# a finished LSTM folder made with other values: kept, the stage stops (replace=true redoes it)
LSTM_KEYS = ("seed", "lstm.")
REFIT = 999  # seed offset of the refit on all the fold's patients (inner folds use their index)


def concat_features(first: SliceFeatures, second: SliceFeatures) -> SliceFeatures:
    """One set of ``first``'s rows then ``second``'s (its series renumbered after ``first``'s); in memory."""
    if first.emb.shape[1] != second.emb.shape[1]:
        raise InputError(f"embedding widths differ: {first.emb.shape[1]} vs {second.emb.shape[1]}")
    if first.labels is None or second.labels is None:
        raise InputError("only labelled sets can be joined for training")
    n = len(first.ids)
    z = None if first.z is None or second.z is None else np.concatenate([first.z, second.z])
    return SliceFeatures(np.concatenate([first.ids, second.ids]), np.concatenate([first.emb, second.emb]),
                         np.concatenate([first.logits, second.logits]), np.concatenate([first.labels, second.labels]),
                         np.concatenate([first.patients, second.patients]),
                         first.series + [r + n for r in second.series], z)


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


def fit_predict(feats: SliceFeatures, train_series: list[int], targets: list[tuple[SliceFeatures, list[int]]],
                cfg: LstmConfig, seed: int, device: torch.device | None = None,
                keep: dict | None = None, amp_mode: str = "auto") -> tuple[list[np.ndarray], list[dict]]:
    """Train one LSTM on ``train_series`` of ``feats``; probabilities for each target, bagged over the last epochs.

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
    model = SequenceModel(feats.emb.shape[1], **{k: getattr(cfg, k) for k in MODEL_KEYS}).to(device)
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
            emb, logits, labels, lengths, _, z = feats.batch(list(order[i:i + cfg.batch_size]), mean, std)
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
            total += loss.detach().double() * n  # summed on the device: no sync per step
            count += n
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch, "train_loss": total.item() / count}
        bagging = epoch >= cfg.epochs - cfg.bag_last
        for k, (bag, (target, series)) in enumerate(zip(bags, targets, strict=True)):
            if not bagging and k > 0:
                break
            probs = predict_rows(model, target, series, mean, std, PREDICT_BATCH, device, amp)
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
        keep.update(mean=torch.from_numpy(mean), std=torch.from_numpy(std),
                    emb_dim=int(feats.emb.shape[1]), lstm={k: getattr(cfg, k) for k in MODEL_KEYS})
    return [bag / n_bagged for bag in bags], history


def inner_groups(feats: SliceFeatures, n: int, seed: int) -> np.ndarray:
    """Inner fold of each series: fold k's patients split again by patient, stratified like the outer folds."""
    frame = pd.DataFrame(feats.labels, columns=list(LABELS)).assign(PatientID=feats.patients)
    n = min(n, frame.PatientID.nunique())
    if n < 2:
        raise InputError(f"lstm.inner_folds: the fold holds {frame.PatientID.nunique()} patient(s); need at least 2")
    inner = assign_folds(frame, n, seed).to_numpy()
    return np.array([inner[s[0]] for s in feats.series])


def _training_patients(folder: Path, meta: pd.DataFrame, cfg: Config) -> SliceFeatures:
    """CNN_k's own training patients (``train_*`` of stage 3), for ``lstm.train_on`` train / train_and_oof."""
    if not (folder / "train_ids.csv").exists():
        raise InputError(f"{folder}: no training-patient embeddings; lstm.train_on={cfg.lstm.train_on} needs "
                         f"`make embed fold={cfg.fold} embed.train=true`")
    return load_features(folder, "train", meta)


def fit_on_training_patients(cfg: Config, train: SliceFeatures, oof: SliceFeatures, test: SliceFeatures,
                             ) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """``lstm.train_on=train`` (the 2nd place's recipe): one model on CNN_k's training patients predicts fold k's
    held-out patients (neither it nor the CNN saw them) and the test set; returns (oof, test, history, saved)."""
    keep: dict = {}
    (oof_pred, test_pred), history = fit_predict(
        train, list(range(len(train.series))),
        [(oof, list(range(len(oof.series)))), (test, list(range(len(test.series))))],
        cfg.lstm, cfg.seed * 1000 + REFIT, keep=keep, amp_mode=cfg.train.amp)
    return oof_pred, test_pred, [{"inner_fold": "all", **h} for h in history], keep


def fit_nested(cfg: Config, oof_feats: SliceFeatures, test: SliceFeatures, extra: SliceFeatures | None, progress: bool
               ) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """``lstm.train_on`` oof / train_and_oof: fold k's held-out patients split into inner folds, each predicted by a
    model trained on the others (plus ``extra``, CNN_k's training patients, when given); the test set by a refit on
    all of them. Returns (oof, test, history, the refit's saved models)."""
    lcfg = cfg.lstm
    groups = inner_groups(oof_feats, lcfg.inner_folds, cfg.seed)
    all_series = np.arange(len(oof_feats.series))
    feats, always = oof_feats, []  # the training set: OOF rows first (their row numbers stay), then extras
    if extra is not None:
        feats = concat_features(oof_feats, extra)
        always = list(range(len(oof_feats.series), len(feats.series)))
    oof = np.full((len(oof_feats.ids), N_LABELS), np.nan)
    history = []
    for j in tqdm(np.unique(groups), desc=f"fold {cfg.fold} LSTM inner folds", leave=False, disable=not progress):
        train_series, val_series = list(all_series[groups != j]) + always, list(all_series[groups == j])
        (val_pred,), hist = fit_predict(feats, train_series, [(feats, val_series)], lcfg, cfg.seed * 1000 + int(j),
                                        amp_mode=cfg.train.amp)
        rows = np.concatenate([oof_feats.series[i] for i in val_series])
        oof[rows] = val_pred[rows]
        history += [{"inner_fold": int(j), **h} for h in hist]
    # The test set and new studies: one refit on all the fold's patients, its bagged epochs saved.
    keep: dict = {}
    (test_pred,), _ = fit_predict(feats, list(all_series) + always, [(test, list(range(len(test.series))))],
                                  lcfg, cfg.seed * 1000 + REFIT, keep=keep, amp_mode=cfg.train.amp)
    return oof, test_pred, history, keep


def _stale(target: Path, folder: Path, cfg: Config) -> str | None:
    """Why a finished LSTM folder must be redone (other settings, allowed by replace=true; newer embeddings; no saved
    models), or None."""
    if not (target / "done").exists():
        return None
    changed = may_replace(target, cfg, LSTM_KEYS, "sequence models")
    if changed:
        return f"other settings: {describe_changes(changed)}"
    if (target / "done").stat().st_mtime < (folder / "done").stat().st_mtime:
        return f"{folder} was embedded again"
    if not (target / "models.pt").exists():
        return "no saved models.pt (made before stage 4 saved its models)"
    return None


@dataclass(frozen=True)
class SequenceLosses:
    """One embedded checkpoint's OOF weighted log loss: its CNN's, and the sequence model's over it."""

    cnn: float
    lstm: float


def train_sequence_fold(cfg: Config, progress: bool = True) -> dict[str, SequenceLosses]:
    """The sequence models of ``cfg.fold`` on every embedded checkpoint; returns per-checkpoint OOF losses."""
    out = run_dir(cfg)
    folders = finished_dirs(out / "embeddings")
    if not folders:
        raise InputError(f"{out}/embeddings: no finished embeddings; run `make embed fold={cfg.fold}` first")
    meta = read_metadata(data_paths(cfg))
    check_fold_table(out, meta)
    with writer_lock(out, f"stage 4 (sequence model) of {cfg.experiment} fold {cfg.fold}"):
        return _train_sequences(cfg, out, folders, meta, progress)


def _train_sequences(cfg: Config, out: Path, folders: list[Path], meta: pd.DataFrame, progress: bool
                     ) -> dict[str, SequenceLosses]:
    results = {}
    for folder in folders:
        target = out / "lstm" / folder.name
        oof_feats = load_features(folder, "oof", meta)
        if oof_feats.labels is None:
            raise InputError(f"{folder}: OOF rows without labels; the embeddings do not match the metadata")
        cnn_loss = weighted_log_loss(oof_feats.labels, sigmoid(oof_feats.logits))
        reason = _stale(target, folder, cfg)
        if reason:
            tqdm.write(f"fold {cfg.fold} {folder.name}: redoing the sequence models ({reason})")
            (target / "done").unlink()
        if (target / "done").exists():
            oof = pd.read_parquet(target / "oof.parquet").set_index("image_id").loc[oof_feats.ids, list(LABELS)]
            results[folder.name] = SequenceLosses(cnn_loss, weighted_log_loss(oof_feats.labels, oof.to_numpy()))
            continue
        test_feats = load_features(folder, "test", meta)
        if cfg.lstm.train_on == "train":
            oof, test, history, keep = fit_on_training_patients(cfg, _training_patients(folder, meta, cfg), oof_feats,
                                                                test_feats)
        else:
            extra = _training_patients(folder, meta, cfg) if cfg.lstm.train_on == "train_and_oof" else None
            oof, test, history, keep = fit_nested(cfg, oof_feats, test_feats, extra, progress)
        _write(target, cfg, keep, history, {"oof": (oof_feats.ids, oof), "test": (test_feats.ids, test)})
        results[folder.name] = SequenceLosses(cnn_loss, weighted_log_loss(oof_feats.labels, oof))
    return results


def _write(target: Path, cfg: Config, keep: dict, history: list[dict], predictions: dict) -> None:
    """One finished LSTM folder: saved models, predictions, history, config, then ``done``."""
    target.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(target)  # what a killed run was writing
    save_torch(keep, target / "models.pt")
    for name, (ids, probs) in predictions.items():
        with atomic_path(target / f"{name}.parquet") as tmp:
            pd.DataFrame(probs.astype(np.float32), columns=list(LABELS)).assign(image_id=ids)[
                ["image_id", *LABELS]].to_parquet(tmp, index=False)
    with atomic_path(target / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    save_config(cfg, target / "config.yaml")
    write_text_atomic(target / "done", f"lstm.train_on={cfg.lstm.train_on}\n")
