"""Stage 3: embeddings and logits per checkpoint, TTA views, resume, leakage-free OOF rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ichpipe.embed import embed_fold
from ichpipe.io import InputError
from ichpipe.labels import LABELS
from ichpipe.train import train_fold

from .conftest import _train_cfg


@pytest.fixture(scope="module")
def trained(processed):
    root, _, meta = processed
    train_fold(_train_cfg(root, "embed", "train.epochs=2"), progress=False)
    return root, meta


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_plain_view_logits_reproduce_the_training_oof(trained):
    root, meta = trained
    cfg = _train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none]")
    folders = embed_fold(cfg, progress=False)
    assert [f.rsplit("/", 1)[1] for f in folders] == ["epoch00", "epoch01"]
    run = root / "runs" / "embed" / "fold0"
    emb_dir = run / "embeddings" / "epoch01"
    ids = pd.read_csv(emb_dir / "oof_ids.csv").image_id
    assert sorted(ids) == sorted(meta[meta.fold == 0].image_id)  # only patients fold 0's model never saw
    test_ids = pd.read_csv(emb_dir / "test_ids.csv").image_id
    assert sorted(test_ids) == sorted(meta[meta.split == "test"].image_id)
    emb, logits = np.load(emb_dir / "oof_emb.npy"), np.load(emb_dir / "oof_logits.npy")
    assert emb.shape == (len(ids), 96) and logits.shape == (len(ids), len(LABELS))  # test_resnet: 96 features
    oof = pd.read_parquet(run / "oof_epoch01.parquet").set_index("image_id").loc[ids, list(LABELS)]
    np.testing.assert_allclose(_sigmoid(logits), oof.to_numpy(), rtol=1e-4, atol=1e-5)
    assert embed_fold(cfg, progress=False) == []  # finished checkpoints are skipped


def test_tta_views_are_kept_and_averaged(trained):
    root, _ = trained
    cfg = _train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none, hflip, transpose]", "embed.keep_views=true",
                     "embed.epochs=[1]")
    folder = root / "runs" / "embed" / "fold0" / "embeddings" / "epoch01"
    (folder / "done").unlink()  # force a redo of this checkpoint with three views
    assert embed_fold(cfg, progress=False) == [str(folder)]
    views = np.load(folder / "test_logits_views.npy")
    assert views.shape[0] == 3
    assert not np.allclose(views[0], views[1]) and not np.allclose(views[0], views[2])
    np.testing.assert_allclose(np.load(folder / "test_logits.npy"), views.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert (folder / "done").read_text().strip() == "none,hflip,transpose"


def test_bad_view_and_missing_checkpoints_are_clear_errors(processed):
    root, _, _ = processed
    with pytest.raises(InputError, match="embed.tta: unknown view 'vflip'"):
        embed_fold(_train_cfg(root, "embed", "embed.tta=[vflip]"), progress=False)
    with pytest.raises(InputError, match="no epoch checkpoints; run `make train fold=0` first"):
        embed_fold(_train_cfg(root, "never_trained"), progress=False)
