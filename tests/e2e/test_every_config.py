"""Every config in configs/demo/, configs/benchmark/ and configs/real/ runs: its model at its own size (random
weights), stages 2, 3 and 4 on a few slices.

A config that no longer loads, whose backbone, augmentation, crop, optimiser, schedule, TTA views, embedding
dtype or sequence model no longer builds or runs, fails here, on the CPU, in seconds to a minute each. A config
that only changes its base config's loader (resnext101_2nd_place_nocrop: no crop) runs its loader here and its
model under its base's name.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichpipe.base.config import flatten, load_config, to_dict
from ichpipe.base.paths import output_name
from ichpipe.networks.dataset import DEFAULT_AUGMENT, SliceDataset, build_transform, input_channels, make_loader
from ichpipe.stages.embed import embed_fold
from ichpipe.stages.sequence import train_sequence_fold
from ichpipe.stages.train import load_fold, train_fold
from tests.conftest import experiment_configs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = experiment_configs("demo", "benchmark", "real")


@pytest.fixture(scope="module")
def few_slices(processed, tmp_path_factory):
    """A data root of five slices of the tiny set: two of one training patient (fold 1), one of each of two
    held-out patients (fold 0: the nested sequence model has two inner folds), one test slice. Its PNG folder
    is the tiny set's 512 px one under every config's name (the loader resizes to each config's input)."""
    root, _, meta = processed
    labelled = meta[meta.fold.notna()]
    counts = labelled.groupby("PatientID").size()
    train_patient = counts[counts >= 2].index[0]
    others = [p for p in labelled.PatientID.unique() if p != train_patient][:2]
    first = labelled[labelled.PatientID == train_patient].sort_values(["SeriesInstanceUID", "slice_index"])
    rows = [first.iloc[[3, 4]].assign(fold=1)]
    rows += [labelled[labelled.PatientID == p].iloc[[2]].assign(fold=0) for p in others]
    rows.append(meta[meta.split == "test"].iloc[[0]])
    small = pd.concat(rows).reset_index(drop=True)
    small["fold"] = small.fold.astype("Int64")
    out = tmp_path_factory.mktemp("few_slices")
    (out / "processed").mkdir()
    small.to_parquet(out / "processed" / "metadata.parquet", index=False)
    for path in CONFIGS:
        name = output_name(load_config(path).preprocess)
        if not (out / "processed" / name).exists():
            os.symlink(root / "processed" / "512", out / "processed" / name)
    return out


# EfficientNetV2's BatchNorm after one step on two slices still holds its initial running statistics, so its pooled
# features reach ~4.5e4 in eval mode, beyond float16's 65,504: stage 3 refuses that (test_embed); a trained
# model's features are O(1-10)
EXTRA = {"effnetv2_9ch_512": ["embed.dtype=float32"]}


# What only the loader reads: a config that differs from its base config in these alone runs the base's model
# (exercised under the base's name) and is checked here for the part it changes, its loader.
DATA_PATH_KEYS = {"experiment", "train.crop_border", "train.crop_margin", "train.augment"}


def _variant_of(path: Path) -> Path | None:
    """The config of the same folder this one is a base-and-data-path variant of, or None."""
    import yaml

    own = yaml.safe_load(path.read_text())
    base = (path.parent / own["base"]).resolve() if own.get("base") else None
    if base is None or base.parent != path.parent.resolve():
        return None
    flat = flatten(to_dict(load_config(path))), flatten(to_dict(load_config(base)))
    changed = {k for k in flat[0] if flat[0][k] != flat[1].get(k)}
    return base if changed <= DATA_PATH_KEYS else None


@pytest.mark.parametrize("path", [p for p in CONFIGS if _variant_of(p)], ids=lambda p: p.stem)
def test_a_loader_variant_of_a_config_loads_its_own_images(path, few_slices):
    cfg = load_config(path, [f"data.root={few_slices}", "fold=0"])
    base = load_config(_variant_of(path), [f"data.root={few_slices}", "fold=0"])
    train_meta, _, png_dir, _ = load_fold(cfg)
    channels = input_channels(cfg.preprocess.mode)
    crops = {}
    for name, c in (("variant", cfg), ("base", base)):
        ds = SliceDataset(train_meta, png_dir, build_transform(c.train.augment or DEFAULT_AUGMENT, c.train.image_size,
                                                               train=True),
                          c.seed, c.train.crop_margin if c.train.crop_border else None, labelled=True,
                          channels=channels)
        x, y, _ = next(iter(make_loader(ds, 2, 0)))
        assert tuple(x.shape) == (2, channels, c.train.image_size, c.train.image_size) and x.dtype == torch.uint8
        crops[name] = x
    assert not torch.equal(crops["variant"], crops["base"])  # its own crop (or augmentation) is what it changes


@pytest.mark.parametrize("path", [p for p in CONFIGS if not _variant_of(p)], ids=lambda p: p.stem)
def test_every_cnn_config_trains_embeds_and_runs_its_sequence_model(path, few_slices):
    cfg = load_config(path, [f"data.root={few_slices}", "model.pretrained=false", "train.epochs=1",
                             "train.batch_size=2",
                             "train.loader_workers=0", "embed.batch_size=2", "embed.epochs=[0]", "lstm.epochs=1",
                             "lstm.bag_last=1", "lstm.inner_folds=2", "fold=0", *EXTRA.get(path.stem, [])])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="train.amp=.* is a GPU precision")
        metrics = train_fold(cfg, progress=False)
        assert np.isfinite(metrics.val_loss) and np.isfinite(metrics.last.train_loss), path.name
        folders = embed_fold(cfg, progress=False)
        emb = np.load(Path(folders[-1]) / "oof_emb.npy")
        assert emb.shape[0] == 2 and emb.dtype == np.dtype(cfg.embed.dtype) and np.isfinite(emb).all()
        results = train_sequence_fold(cfg, progress=False)
    assert all(np.isfinite(r.lstm) for r in results.values()), (path.name, results)
    run = few_slices / "runs" / cfg.experiment / "fold0"
    test = pd.read_parquet(run / "lstm" / Path(folders[-1]).name / "test.parquet")
    assert len(test) == 1 and test.drop(columns="image_id").notna().all().all()
