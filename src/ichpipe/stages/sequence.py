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

With ``pseudo.source`` (and ``lstm`` in ``pseudo.stages``), the test series labelled by the source's fold-k models
(src/ichpipe/fitting/pseudo.py) join every model's training set. The training loop, its folds and the augmentations
(``lstm.window``, ``lstm.reverse``, ``lstm.reverse_tta``) live in src/ichpipe/fitting/sequence_fit.py, shared with
the ensemble's sequence model.

For fold k and each embedded checkpoint ``embeddings/epoch<NN>/``, writes
``runs/<experiment>/fold<k>/lstm/epoch<NN>/``::

    oof.parquet, test.parquet    image_id + six probabilities (bagged over the last epochs)
    models.pt                    the refit's bagged weights + standardisation (weights only)
    history.csv                  inner fold, epoch, train loss, inner-validation loss (one model per epoch)
    pseudo.json                  the pseudo-labels it trained on (source, digest, slices), or null
    config.yaml                  the resolved config
    done                         written last: a folder without it is redone
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ichpipe.base.config import Config, describe_changes, may_replace, save_config
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, save_torch, sweep_temp_files, write_text_atomic, writer_lock
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import data_paths, finished_dirs, read_metadata, run_dir
from ichpipe.fitting import sequence_fit
from ichpipe.fitting.pseudo import PSEUDO_RECORD, PseudoLabels, pseudo_series, read_pseudo_labels, wanted
from ichpipe.networks.sequence_models import SliceFeatures
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.metrics import sigmoid, weighted_log_loss

# a finished LSTM folder made with other values: kept, the stage stops (replace=true redoes it)
LSTM_KEYS = ("seed", "lstm.", "pseudo.")


def _stale(target: Path, folder: Path, cfg: Config, pseudo: PseudoLabels | None) -> str | None:
    """Why a finished LSTM folder must be redone (other settings, allowed by replace=true; newer embeddings; no saved
    models; other pseudo-labels), or None."""
    if not (target / "done").exists():
        return None
    changed = may_replace(target, cfg, LSTM_KEYS, "sequence models")
    if changed:
        return f"other settings: {describe_changes(changed)}"
    if (target / "done").stat().st_mtime < (folder / "done").stat().st_mtime:
        return f"{folder} was embedded again"
    if not (target / "models.pt").exists():
        return "no saved models.pt (made before stage 4 saved its models)"
    saved = json.loads((target / PSEUDO_RECORD).read_text()) if (target / PSEUDO_RECORD).exists() else None
    if (saved or {}).get("digest") != (pseudo.digest if pseudo else None):
        return f"the pseudo-labels of {cfg.pseudo.source} changed"
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
    pseudo = read_pseudo_labels(cfg, cfg.fold, meta) if wanted(cfg, "lstm") else None
    for folder in folders:
        target = out / "lstm" / folder.name
        oof_feats = sequence_fit.load_features(folder, "oof", meta)
        if oof_feats.labels is None:
            raise InputError(f"{folder}: OOF rows without labels; the embeddings do not match the metadata")
        cnn_loss = weighted_log_loss(oof_feats.labels, sigmoid(oof_feats.logits))
        reason = _stale(target, folder, cfg, pseudo)
        if reason:
            tqdm.write(f"fold {cfg.fold} {folder.name}: redoing the sequence models ({reason})")
            (target / "done").unlink()
        if (target / "done").exists():
            oof = pd.read_parquet(target / "oof.parquet").set_index("image_id").loc[oof_feats.ids, list(LABELS)]
            results[folder.name] = SequenceLosses(cnn_loss, weighted_log_loss(oof_feats.labels, oof.to_numpy()))
            continue
        test_feats = sequence_fit.load_features(folder, "test", meta)
        extra = _training_patients(folder, meta, cfg) if cfg.lstm.train_on != "oof" else None
        if pseudo is not None:  # the test series with fold k's pseudo-labels join the training set
            labelled_test = pseudo_series(test_feats, pseudo)
            if labelled_test is not None:
                extra = labelled_test if extra is None else sequence_fit.concat_features(extra, labelled_test)
        lcfg, seed, amp = cfg.lstm, cfg.seed, cfg.train.amp
        if lcfg.train_on == "train":
            oof, test, history, keep = sequence_fit.fit_on_training_patients(lcfg, seed, amp, extra, oof_feats,
                                                                             test_feats)
        else:
            oof, test, history, keep = sequence_fit.fit_nested(lcfg, seed, amp, oof_feats, test_feats, extra, progress,
                                                               f"fold {cfg.fold} LSTM inner folds")
        _write(target, cfg, keep, history, {"oof": (oof_feats.ids, oof), "test": (test_feats.ids, test)}, pseudo)
        results[folder.name] = SequenceLosses(cnn_loss, weighted_log_loss(oof_feats.labels, oof))
    return results


def _training_patients(folder: Path, meta: pd.DataFrame, cfg: Config) -> SliceFeatures:
    """CNN_k's own training patients (``train_*`` of stage 3), for ``lstm.train_on`` train / train_and_oof."""
    if not (folder / "train_ids.csv").exists():
        raise InputError(f"{folder}: no training-patient embeddings; lstm.train_on={cfg.lstm.train_on} needs "
                         f"`make embed fold={cfg.fold} embed.train=true`")
    return sequence_fit.load_features(folder, "train", meta)


def _write(target: Path, cfg: Config, keep: dict, history: list[dict], predictions: dict,
           pseudo: PseudoLabels | None) -> None:
    """One finished LSTM folder: saved models, predictions, history, config, the pseudo-labels' record, then
    ``done``."""
    target.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(target)  # what a killed run was writing
    save_torch(keep, target / "models.pt")
    write_text_atomic(target / PSEUDO_RECORD, json.dumps(pseudo.record() if pseudo else None) + "\n")
    for name, (ids, probs) in predictions.items():
        with atomic_path(target / f"{name}.parquet") as tmp:
            pd.DataFrame(probs.astype(np.float32), columns=list(LABELS)).assign(image_id=ids)[
                ["image_id", *LABELS]].to_parquet(tmp, index=False)
    with atomic_path(target / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    save_config(cfg, target / "config.yaml")
    write_text_atomic(target / "done", f"lstm.train_on={cfg.lstm.train_on}\n")
