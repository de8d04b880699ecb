"""The sequence stage's CPU results, stored, so that a change of stage 4 that moves them is seen.

``python -m tests.stages.lstm_reference`` rewrites ``tests/stages/data/lstm_cpu_reference.npz``. Written first with the
code before stage 4 learnt to run on a GPU; rewritten on 2026-12-01 when the standardisation started to
accumulate in float64 a chunk at a time (one of 486 values moved by 1.5e-8), after the vectorised batching
of that change had been checked bit for bit against the old file. ``test_sequence`` checks that today's code
gives the stored numbers bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ichpipe.base.config import LstmConfig
from ichpipe.fitting.sequence_fit import fit_predict
from ichpipe.networks.sequence_models import SliceFeatures

REFERENCE = Path(__file__).parent / "data" / "lstm_cpu_reference.npz"
CFG = LstmConfig(reduce_dim=8, hidden=8, layers=2, dropout=0.2, epochs=3, bag_last=2, batch_size=3)


def features(seed: int, labelled: bool) -> SliceFeatures:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 14, size=9)
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    series = [rng.permutation(np.arange(s, s + k)) for s, k in zip(starts, lengths, strict=True)]
    labels = (rng.random((n, 6)) < 0.2).astype(np.float32) if labelled else None
    return SliceFeatures(np.array([f"ID_{seed}_{i}" for i in range(n)]), rng.normal(size=(n, 16)).astype(np.float32),
                         rng.normal(size=(n, 6)).astype(np.float32), labels,
                         np.repeat(np.arange(len(lengths)), lengths).astype(str), series)


def compute() -> dict[str, np.ndarray]:
    oof, test = features(1, True), features(2, False)
    (val, tst), hist = fit_predict(oof, [0, 1, 2, 3, 4, 5], [(oof, [6, 7, 8]), (test, list(range(9)))], CFG, seed=3,
                             device=torch.device("cpu"))
    return {"val": val, "test": tst, "val_loss": np.array([h["val_loss"] for h in hist])}


if __name__ == "__main__":
    np.savez(REFERENCE, **compute())
    print(f"wrote {REFERENCE}")
