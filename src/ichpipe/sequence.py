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
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

from ichpipe.config import CHOICES, Config, LstmConfig, describe_changes, may_replace, save_config
from ichpipe.device import NO_AMP, Amp, amp_settings, autocast, default_device
from ichpipe.folds import assign_folds, check_fold_table
from ichpipe.io import InputError, atomic_path, save_torch, sweep_temp_files, write_text_atomic
from ichpipe.labels import LABELS, N_LABELS
from ichpipe.losses import make_loss
from ichpipe.metrics import sigmoid, weighted_log_loss
from ichpipe.optim import make_optimizer
from ichpipe.paths import SERIES_KEYS, data_paths, finished_dirs, read_metadata, run_dir

LSTM_KEYS = ("seed", "lstm.")  # an LSTM folder with other values of these is redone
REFIT = 999  # seed offset of the refit on all the fold's patients (inner folds use their index)


KINDS = CHOICES["lstm.kind"]


def z_encoding(z: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of slice positions in mm (B, T) → (B, T, dim): wavelengths from 2 mm to ~2 m."""
    half = dim // 2
    freq = 2 * torch.pi / (2.0 * 1000.0 ** (torch.arange(half, device=z.device, dtype=torch.float32) / max(half - 1, 1)))
    angle = z[..., None].float() * freq
    enc = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    return nn.functional.pad(enc, (0, dim - 2 * half))


def _packed(rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A recurrent module over padded (B, T, F) inputs, packed so that padding never reaches it."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class SequenceModel(nn.Module):
    """A sequence model over one series' slices.

    ``kind``: ``lstm`` (a stacked BiLSTM), ``gru`` (BiGRU), ``gru_attention`` (BiGRU, then multi-head
    self-attention over the series with a residual), or ``transformer`` (an encoder over the slices,
    positions from z in mm): their input per slice is [e, e - prev, e - next, CNN logits] and their
    output is added to the CNN logits (the head starts at zero: an untrained model predicts what the CNN
    did). ``lstm_2nd_place`` is the 2nd place's own network (darraghdog/rsna, scripts/trainlstm.py):
    input [e, e - prev, e - next] only, two single-layer BiLSTMs (``layers`` of them) whose outputs, a
    ReLU-linear map of each and the embedding (tiled to their width) are summed before the head, which
    starts as PyTorch initialises it. Padding is packed away (recurrent kinds) or masked (attention).
    """

    def __init__(self, emb_dim: int, reduce_dim: int = 64, hidden: int = 64, layers: int = 2, dropout: float = 0.2,
                 kind: str = "lstm", heads: int = 4):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"lstm.kind={kind!r}: one of {', '.join(KINDS)}")
        self.kind = kind
        self.reduce = nn.Sequential(nn.Linear(emb_dim, reduce_dim), nn.ReLU()) if reduce_dim else nn.Identity()
        d = reduce_dim or emb_dim
        width = 3 * d + N_LABELS
        if kind == "lstm_2nd_place":
            self.lstms = nn.ModuleList(nn.LSTM(3 * d if i == 0 else 2 * hidden, hidden, batch_first=True,
                                               bidirectional=True) for i in range(layers))
            self.linears = nn.ModuleList(nn.Linear(2 * hidden, 2 * hidden) for _ in range(layers))
        elif kind == "transformer":
            self.proj = nn.Linear(width, 2 * hidden)
            layer = nn.TransformerEncoderLayer(2 * hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            rnn = nn.LSTM if kind == "lstm" else nn.GRU
            self.lstm = rnn(width, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
            if kind == "gru_attention":
                self.attention = nn.MultiheadAttention(2 * hidden, heads, dropout=dropout, batch_first=True)
                self.norm = nn.LayerNorm(2 * hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, N_LABELS)
        if kind != "lstm_2nd_place":
            nn.init.zeros_(self.head.weight)  # start as the CNN: the sequence model learns a correction
            nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) embeddings, (B, T, 6) CNN logits, (B,) lengths, (B, T) slice positions in mm from the
        series' first slice (transformer only; default 5 mm apart) → (B, T, 6) logits (padding: 0)."""
        e = self.reduce(emb)
        b, t, d = e.shape
        steps = torch.arange(t, device=e.device).expand(b, t)
        last = (lengths.to(e.device) - 1).clamp(min=0)[:, None]
        prev = e.gather(1, (steps - 1).clamp(min=0)[..., None].expand(b, t, d))  # first slice: itself
        nxt = e.gather(1, torch.minimum(steps + 1, last)[..., None].expand(b, t, d))  # last slice: itself
        valid = steps < lengths.to(e.device)[:, None]
        if self.kind == "lstm_2nd_place":
            h, hidden = torch.cat([e, e - prev, e - nxt], dim=-1), 0
            for rnn, linear in zip(self.lstms, self.linears, strict=True):
                h = _packed(rnn, h, lengths)
                hidden = hidden + h + torch.relu(linear(h))
            width = h.shape[-1]  # their h_embadd: the embedding repeated to the LSTMs' width
            hidden = hidden + e.repeat(1, 1, -(-width // d))[..., :width]
            return self.head(self.drop(hidden)) * valid.unsqueeze(-1)
        x = torch.cat([e, e - prev, e - nxt, logits], dim=-1)
        if self.kind == "transformer":
            pos = (z.to(e.device) if z is not None else steps * 5.0)
            h = self.proj(x)
            out = self.encoder(h + z_encoding(pos, h.shape[-1]), src_key_padding_mask=~valid)
        else:
            out = _packed(self.lstm, x, lengths)
            if self.kind == "gru_attention":
                attended, _ = self.attention(out, out, out, key_padding_mask=~valid, need_weights=False)
                out = self.norm(out + attended)
        return (logits + self.head(self.drop(out))) * valid.unsqueeze(-1)


@dataclass
class SliceFeatures:
    """Per-slice arrays of one set (OOF or test) in a common row order, plus the series that group them."""

    ids: np.ndarray  # (N,) image ids
    emb: np.ndarray  # (N, D)
    logits: np.ndarray  # (N, 6)
    labels: np.ndarray | None  # (N, 6) or None for the test set
    patients: np.ndarray  # (N,) PatientID
    series: list[np.ndarray]  # row indices of each series, in z order
    z: np.ndarray | None = None  # (N,) slice position in mm (metadata ``z``); None: 5 mm apart

    def batch(self, which: list[int], mean: np.ndarray, std: np.ndarray):
        """Padded tensors of the series ``which``: emb, logits, labels (or None), lengths, row indices, and z
        (mm from each series' first slice). One gather per array (a memory-mapped or float16 ``emb`` is read
        once, as float32), no loop over slices; padding is zero."""
        rows = [self.series[i] for i in which]
        lengths = np.array([len(r) for r in rows])
        t = int(lengths.max())
        valid = np.arange(t)[None, :] < lengths[:, None]  # (B, T)
        flat = np.concatenate(rows)  # the rows of the valid positions, series by series
        emb = np.zeros((len(rows), t, self.emb.shape[1]), np.float32)
        emb[valid] = (self.emb[flat] - mean) / std
        logits = np.zeros((len(rows), t, N_LABELS), np.float32)
        logits[valid] = self.logits[flat]
        labels = None
        if self.labels is not None:
            labels = np.zeros((len(rows), t, N_LABELS), np.float32)
            labels[valid] = self.labels[flat]
        z = np.zeros((len(rows), t), np.float32)
        if self.z is not None:
            z[valid] = np.abs(self.z[flat] - np.repeat(self.z[[r[0] for r in rows]], lengths))
        else:
            z[valid] = 5.0 * np.concatenate([np.arange(k) for k in lengths])
        return (torch.from_numpy(emb), torch.from_numpy(logits), torch.from_numpy(labels) if labels is not None else None,
                torch.from_numpy(lengths), rows, torch.from_numpy(z))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: on a GPU through pinned memory without blocking (the copy overlaps the
    previous step's kernels), on the CPU as it is."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


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


PREDICT_BATCH = 64  # series per prediction batch (no gradients: larger than the training batch)


def _predict(model: SequenceModel, feats: SliceFeatures, series: list[int], mean, std, batch_size: int,
             device: torch.device, amp: Amp = NO_AMP) -> np.ndarray:
    """(N, 6) probabilities for the rows of ``series`` (others stay NaN)."""
    out = np.full((len(feats.ids), N_LABELS), np.nan, np.float32)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(series), batch_size):
            emb, logits, _, lengths, rows, z = feats.batch(series[i:i + batch_size], mean, std)
            with autocast(device, amp):
                lg = model(to_device(emb, device), to_device(logits, device), lengths, to_device(z, device))
            probs = torch.sigmoid(lg.float()).cpu().numpy()
            valid = np.arange(probs.shape[1])[None, :] < lengths.numpy()[:, None]
            out[np.concatenate(rows)] = probs[valid]
    return out


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
            probs = _predict(model, target, series, mean, std, PREDICT_BATCH, device, amp)
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


MODEL_KEYS = ("reduce_dim", "hidden", "layers", "dropout", "kind", "heads")  # what rebuilds a SequenceModel


def load_models(path: str | Path, device: torch.device | None = None) -> tuple[list[SequenceModel], np.ndarray, np.ndarray]:
    """The bagged models of a ``models.pt`` (weights only: safe to load from anyone) and their standardisation."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    models = []
    for weights in state["bag"]:
        model = SequenceModel(state["emb_dim"], **state["lstm"])
        model.load_state_dict(weights)
        models.append(model.to(device or torch.device("cpu")).eval())
    return models, state["mean"].numpy(), state["std"].numpy()


def predict_bag(models: list[SequenceModel], feats: SliceFeatures, mean, std, device=None, amp: Amp = NO_AMP
                ) -> np.ndarray:
    """(N, 6) mean probability of the bagged models over every series of ``feats`` (``amp``: as stage 4 ran)."""
    series = list(range(len(feats.series)))
    return np.mean([_predict(m, feats, series, mean, std, PREDICT_BATCH, device or torch.device("cpu"), amp)
                    for m in models], axis=0)


def _inner_groups(feats: SliceFeatures, n: int, seed: int) -> np.ndarray:
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
    groups = _inner_groups(oof_feats, lcfg.inner_folds, cfg.seed)
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
    """Why a finished LSTM folder must be redone (other settings, newer embeddings, no saved models), or None."""
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


def train_sequence_fold(cfg: Config, progress: bool = True) -> dict:
    """The sequence models of ``cfg.fold`` on every embedded checkpoint; returns per-checkpoint OOF losses."""
    out = run_dir(cfg)
    folders = finished_dirs(out / "embeddings")
    if not folders:
        raise InputError(f"{out}/embeddings: no finished embeddings; run `make embed fold={cfg.fold}` first")
    meta = read_metadata(data_paths(cfg))
    check_fold_table(out, meta)
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
            results[folder.name] = {"cnn": cnn_loss, "lstm": weighted_log_loss(oof_feats.labels, oof.to_numpy())}
            continue
        test_feats = load_features(folder, "test", meta)
        if cfg.lstm.train_on == "train":
            oof, test, history, keep = fit_on_training_patients(cfg, _training_patients(folder, meta, cfg), oof_feats,
                                                                test_feats)
        else:
            extra = _training_patients(folder, meta, cfg) if cfg.lstm.train_on == "train_and_oof" else None
            oof, test, history, keep = fit_nested(cfg, oof_feats, test_feats, extra, progress)
        _write(target, cfg, keep, history, {"oof": (oof_feats.ids, oof), "test": (test_feats.ids, test)})
        results[folder.name] = {"cnn": cnn_loss, "lstm": weighted_log_loss(oof_feats.labels, oof)}
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
