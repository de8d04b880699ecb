"""Shared fixtures: one tiny synthetic dataset per test session (written once, read by many tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from ichpipe.base.config import load_config
from ichpipe.stages.preprocess import run_preprocess
from ichpipe.synthetic.dataset import generate_dataset

REPO = Path(__file__).resolve().parents[1]  # the repository

# The suite runs on the CPU wherever it runs, so that a machine with a GPU gives CI's results; `ICHPIPE_DEVICE=auto
# make test` (as `make gpu-check` does) runs it on the GPU, where the tests compare with tolerances what is only
# bit-exact on the CPU.
os.environ.setdefault("ICHPIPE_DEVICE", "cpu")

# Small but with every quirk: 8 patients, short series, quirk rates raised so each one occurs.
TINY_OVERRIDES = [
    "synthetic.n_patients=8", "synthetic.slices_min=12", "synthetic.slices_max=16",
    "synthetic.control_rate=0.2", "synthetic.rate_12bit_quirk=0.3", "synthetic.rate_multivalue_window=0.4",
    "synthetic.rate_non512=0.2", "synthetic.rate_fov_padding=0.4", "synthetic.rate_gantry_tilt=0.4",
    "synthetic.rate_motion=0.3", "synthetic.seed=8",
]


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(overrides=TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_cfg):
    """(root, per-file table) of a tiny synthetic dataset in the competition layout."""
    root = tmp_path_factory.mktemp("tiny_rsna")
    table = generate_dataset(tiny_cfg.synthetic, root, workers=2, progress=False)
    return root, table


def _cfg(root, *extra):
    """The tiny config pointed at ``root``."""
    return load_config(overrides=[*TINY_OVERRIDES, f"data.root={root}", "data.workers=2", *extra])


TINY_TRAIN = ["model.backbone=test_resnet", "model.pretrained=false", "train.image_size=32", "train.epochs=2",
              "train.batch_size=16", "train.warmup_steps=2", "train.loader_workers=0", "train.log_every=1"]


def _train_cfg(root, experiment, *extra):
    return _cfg(root, *TINY_TRAIN, f"experiment={experiment}", *extra)


@pytest.fixture(scope="session")
def processed(tiny_data):
    """(root, summary, metadata table) of the tiny set after `preprocess` with the default config."""
    root, _ = tiny_data
    summary = run_preprocess(_cfg(root), progress=False)
    return root, summary, pd.read_parquet(root / "processed" / "metadata.parquet")


def experiment_configs(*folders: str) -> list[Path]:
    """The experiment configs in configs/<folder>/ for each folder (default demo, benchmark, real, ensemble): the
    YAML files that are a Config (a benchmark spec, which names its families, is not one)."""
    import yaml

    paths = []
    for folder in folders or ("demo", "benchmark", "real", "ensemble"):
        for path in sorted((REPO / "configs" / folder).glob("*.yaml")):
            if "families" not in (yaml.safe_load(path.read_text()) or {}):
                paths.append(path)
    return paths


def write_pseudo_source(root, name, meta, values=None, models=("blend",)):
    """A finished experiment as a pseudo-label source: ``runs/<name>/blend/test_by_fold.parquet`` with each fold's
    test probabilities (by default fold k's are 0.1 + 0.2 k: every fold's its own) and its folds.json."""
    import numpy as np

    from ichpipe.base.labels import LABELS
    from ichpipe.scoring.folds import record_fold_table

    folder = Path(root) / "runs" / name / "blend"
    folder.mkdir(parents=True, exist_ok=True)
    test_ids = meta.loc[meta.split == "test", "image_id"].to_numpy()
    frames = []
    for k in sorted(int(f) for f in meta.fold.dropna().unique()):
        probs = np.full((len(test_ids), len(LABELS)), 0.1 + 0.2 * k) if values is None else values(k, len(test_ids))
        for model in models:
            frames.append(pd.DataFrame(probs, columns=list(LABELS)).assign(image_id=test_ids, fold=k, model=model))
    pd.concat(frames)[["image_id", "fold", "model", *LABELS]].to_parquet(folder / "test_by_fold.parquet", index=False)
    record_fold_table(folder, meta)
    return folder
