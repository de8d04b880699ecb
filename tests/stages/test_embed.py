"""Stage 3: embeddings and logits per checkpoint, TTA views, resume, leakage-free OOF rows."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from ichpipe.base.config import ConfigError
from ichpipe.base.device import NO_AMP
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.networks.inference import embed_loader, mean_probability_logit
from ichpipe.stages.embed import embed_fold
from ichpipe.stages.train import train_fold
from tests.conftest import _train_cfg


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
    assert emb.dtype == np.float16 and logits.dtype == np.float32  # embed.dtype: embeddings stored at half size
    oof = pd.read_parquet(run / "oof_epoch01.parquet").set_index("image_id").loc[ids, list(LABELS)]
    np.testing.assert_allclose(_sigmoid(logits), oof.to_numpy(), rtol=1e-4, atol=1e-5)
    assert embed_fold(cfg, progress=False) == []  # finished checkpoints are skipped
    wide = _train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none]", "embed.dtype=float32", "embed.epochs=[1]",
                      "replace=true")
    assert embed_fold(wide, progress=False) == [str(emb_dir)]  # another dtype: redone
    emb32 = np.load(emb_dir / "oof_emb.npy")
    assert emb32.dtype == np.float32
    np.testing.assert_allclose(emb.astype(np.float32), emb32, rtol=2 ** -10, atol=1e-4)  # float16's rounding only
    np.testing.assert_array_equal(np.load(emb_dir / "oof_logits.npy"), logits)
    cfg.replace = True
    embed_fold(cfg, progress=False)  # back to the default for the tests below


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
    # views are averaged as probabilities (like epochs, folds and inner LSTMs), stored as the logit of that mean
    mean_prob = _sigmoid(views.astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(_sigmoid(np.load(folder / "test_logits.npy")), mean_prob, rtol=1e-5, atol=1e-7)
    assert (folder / "done").read_text().strip() == "none,hflip,transpose"


def test_bad_view_and_missing_checkpoints_are_clear_errors(processed):
    root, _, _ = processed
    with pytest.raises(ConfigError, match=r"^embed.tta\[0\]: one of none, hflip, transpose, got 'vflip'$"):
        _train_cfg(root, "embed", "embed.tta=[vflip]")  # refused when the config is read, before any stage
    with pytest.raises(InputError, match="no epoch checkpoints; run `make train fold=0` first"):
        embed_fold(_train_cfg(root, "never_trained"), progress=False)


def test_hflip_view_is_the_model_on_a_left_right_flipped_image(tmp_path):
    """The ``hflip`` TTA view of stage 3 equals the model applied to the PNG mirrored left-right."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 40, 3), dtype=np.uint8)
    images[:, :, :8] = 0  # not symmetric: a flip changes the prediction
    model = timm.create_model("test_resnet", num_classes=len(LABELS)).eval()

    def run(batch, views):
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        n = len(batch)
        out = {"emb": np.zeros((n, 96), np.float32), "logits": np.zeros((n, len(LABELS)), np.float32)}
        embed_loader(model, [(x, None, None)], views, torch.device("cpu"), NO_AMP, False, "", out)
        return out["logits"]

    flipped = run(images, ["hflip"])
    np.testing.assert_allclose(flipped, run(images[:, :, ::-1], ["none"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(flipped, run(images, ["none"]), atol=1e-4)
    # two views: the logit of their mean probability
    both = run(images, ["none", "hflip"])
    np.testing.assert_allclose(_sigmoid(both), (_sigmoid(run(images, ["none"])) + _sigmoid(flipped)) / 2, rtol=1e-5)


def test_views_average_as_probabilities_not_logits():
    views = torch.tensor([[[0.0, -30.0, 50.0]], [[6.0, -40.0, 60.0]]])  # (V=2, N=1, 3), far into the tails too
    got = mean_probability_logit(views).numpy()[0]
    want = np.log((_sigmoid(np.array([0.0, -30, 50])) + _sigmoid(np.array([6.0, -40, 60]))) / 2)
    want -= np.log((_sigmoid(-np.array([0.0, -30, 50])) + _sigmoid(-np.array([6.0, -40, 60]))) / 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # 1.092 for (0, 6), where the mean logit would say 3
    assert got[0] == pytest.approx(1.0920, abs=1e-3) and np.isfinite(got).all()
    one = torch.tensor([[[1.5, -2.0]]])
    assert torch.equal(mean_probability_logit(one), one[0])  # a single view passes through unchanged


def test_a_rerun_with_other_settings_is_refused_unless_told_to_replace(trained, capsys):
    root, _ = trained
    folder = root / "runs" / "embed" / "fold0" / "embeddings" / "epoch01"
    cfg = _train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none]", "embed.epochs=[1]")
    embed_fold(_train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none]", "embed.epochs=[1]", "replace=true"),
               progress=False)  # from whatever the tests before left
    assert (folder / "done").read_text().strip() == "none"
    assert embed_fold(cfg, progress=False) == []  # the same settings: kept
    other = _train_cfg(root, "embed", "train.epochs=2", "embed.tta=[none, hflip]", "embed.epochs=[1]")
    with pytest.raises(ConfigError, match=re.escape(
            f"{folder}: embeddings made with other settings (embed.tta=['none'] (now ['none', 'hflip'])); set "
            "experiment=<new name> to keep it and start another, or add replace=true to redo it")):
        embed_fold(other, progress=False)  # was: replaced without a word
    assert (folder / "done").read_text().strip() == "none"  # kept
    other.replace = True
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = folder / f".oof_emb.npy.{killed.pid}.abcd1234.tmp.npy"  # what a killed embedding run leaves (GBs)
    stale.write_bytes(b"partial")
    assert embed_fold(other, progress=False) == [str(folder)]  # told to: redone
    assert not stale.exists()
    assert (folder / "done").read_text().strip() == "none,hflip"
    assert "redoing the embeddings (other settings: embed.tta=['none'] (now ['none', 'hflip']))" in \
        capsys.readouterr().out


def test_embeddings_beyond_float16_are_refused_not_stored_as_inf():
    model = timm.create_model("test_resnet", num_classes=len(LABELS)).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(1e-6)  # logits stay finite
        for m in model.modules():  # pooled features of ~1e5
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(1e3)
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = {"emb": np.zeros((2, 96), np.float16), "logits": np.zeros((2, len(LABELS)), np.float32)}
    with pytest.raises(InputError, match=r"fold 0 epoch00 test: the model's pooled features reach .*, beyond "
                                         r"float16's 65504; set embed.dtype=float32"):
        embed_loader(model, [(x, None, None)], ["none"], torch.device("cpu"), NO_AMP, False,
                     "fold 0 epoch00 test", out)
    wide = {"emb": np.zeros((2, 96), np.float32), "logits": np.zeros((2, len(LABELS)), np.float32)}
    embed_loader(model, [(x, None, None)], ["none"], torch.device("cpu"), NO_AMP, False, "", wide)
    assert np.abs(wide["emb"]).max() > 65504 and np.isfinite(wide["emb"]).all()


def test_the_views_the_config_accepts_are_the_views_stage_3_has():
    """embed.tta is checked when the config is read (a Literal); inference.VIEWS implements them: one list."""
    import typing

    from ichpipe.base.config import EmbedConfig
    from ichpipe.networks.inference import VIEWS

    (literal,) = typing.get_args(EmbedConfig.model_fields["tta"].annotation)
    assert set(typing.get_args(literal)) == set(VIEWS)
