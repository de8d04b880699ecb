"""Pseudo-labels: a finished model's test-set predictions as the labels of the test slices in the next round's
training (``pseudo:`` of the config; stage 2 and stage 4 read them).

Fold discipline. Fold k's next-round models train on fold k's pseudo-labels only: the test predictions of the
source's fold-k models (its ``runs/<source>/blend/test_by_fold.parquet``, written by stage 5 and by the ensemble),
which never saw fold k's patients. Labels from the source's other folds would carry what their models learnt from
fold k's patients into fold k's model, and its out-of-fold score would flatter it. The synthetic test set's answer
key is never read here: it only scores.

``pseudo.labels``: ``soft`` keeps every test slice with the source's probabilities as targets; ``hard`` rounds them
to 0/1 and keeps only the slices whose every class is confident (below ``pseudo.confidence`` or above
1 - ``pseudo.confidence``). A series model (stage 4) trains on whole series: in ``hard`` mode a series with one
unconfident slice is left out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.base.config import Config
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import blend_dir
from ichpipe.networks.sequence_models import SliceFeatures
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.results import BY_FOLD_FILE

PSEUDO_RECORD = "pseudo.json"  # in a run or LSTM folder: the pseudo-labels it trained on (null: none)


@dataclass(frozen=True)
class PseudoLabels:
    """One fold's pseudo-labels: ``labels`` (image_id index, six columns in [0, 1]) of the kept test slices."""

    labels: pd.DataFrame
    source: Path  # the test_by_fold.parquet they came from
    digest: str  # sha256 of the kept labels: a run records it, and a change of the source is seen
    dropped: int  # test slices left out (hard labels: not confident)

    def record(self) -> dict:
        return {"source": str(self.source), "digest": self.digest, "slices": len(self.labels), "dropped": self.dropped}


def wanted(cfg: Config, stage: str) -> bool:
    """Whether ``stage`` (train | lstm) of this config trains on pseudo-labels."""
    return bool(cfg.pseudo.source) and stage in cfg.pseudo.stages


def read_pseudo_labels(cfg: Config, fold: int, meta: pd.DataFrame) -> PseudoLabels:
    """Fold ``fold``'s pseudo-labels from ``cfg.pseudo.source``; one-line errors for a source that does not fit."""
    p = cfg.pseudo
    folder = blend_dir(cfg, p.source)
    path = folder / BY_FOLD_FILE
    if p.source == cfg.experiment:
        raise InputError(f"pseudo.source={p.source}: the experiment itself; name the finished experiment (or "
                         f"ensemble) whose test predictions label this round's training")
    if not path.exists():
        raise InputError(f"{path}: not found; run stage 5 of {p.source} (`make submission experiment={p.source}`, or "
                         f"`make ensemble`) before training on its pseudo-labels")
    check_fold_table(folder, meta)  # its fold k must be this run's fold k
    table = pd.read_parquet(path)
    if p.model not in set(table.model):
        raise InputError(f"{path}: no model {p.model!r} (has {', '.join(sorted(set(table.model)))}); set pseudo.model")
    part = table[(table.model == p.model) & (table.fold == fold)].set_index("image_id")[list(LABELS)]
    if part.empty:
        raise InputError(f"{path}: no test predictions of fold {fold} (folds {sorted(set(table.fold))}); the source "
                         f"was made on other folds")
    test_ids = set(meta.loc[meta.split == "test", "image_id"])
    unknown = part.index.difference(pd.Index(sorted(test_ids)))
    if len(unknown):
        raise InputError(f"{path}: {len(unknown)} images are not test images of this metadata (e.g. {unknown[0]}); "
                         f"run stage 5 of {p.source} again on today's metadata")
    values = part.to_numpy(np.float64)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise InputError(f"{path}: probabilities outside [0, 1] for fold {fold}")
    if p.labels == "hard":
        keep = ((values <= p.confidence) | (values >= 1 - p.confidence)).all(axis=1)
        part = pd.DataFrame(np.round(values[keep]), index=part.index[keep], columns=list(LABELS))
    part = part.astype(np.float32).sort_index()
    digest = hashlib.sha256(part.to_csv().encode()).hexdigest()
    return PseudoLabels(part, path, digest, int(len(values) - len(part)))


def pseudo_rows(meta: pd.DataFrame, pseudo: PseudoLabels) -> pd.DataFrame:
    """The metadata rows of the pseudo-labelled test slices, their label columns set to the pseudo-labels."""
    rows = meta[meta.image_id.isin(pseudo.labels.index)].copy()
    rows[list(LABELS)] = pseudo.labels.loc[rows.image_id, list(LABELS)].to_numpy()
    return rows


def pseudo_series(test: SliceFeatures, pseudo: PseudoLabels) -> SliceFeatures | None:
    """The test set's series whose every slice has a pseudo-label, labelled with them (for a series model); None
    when no series is whole."""
    labels = pseudo.labels.reindex(test.ids)
    have = labels.notna().all(axis=1).to_numpy()
    series = [s for s in test.series if have[s].all()]
    if not series:
        return None
    return SliceFeatures(test.ids, test.emb, test.logits, labels.fillna(0.0).to_numpy(np.float32), test.patients,
                         series, test.z, test.blocks)
