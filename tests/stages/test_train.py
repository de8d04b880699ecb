"""Stage 2 on the tiny set: artifacts, exact resume, DDP (gloo, 2 processes), weights, loss = metric."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ichpipe.base.config import load_config
from ichpipe.base.device import default_device
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.imaging.crop import crop_border
from ichpipe.networks.dataset import SliceDataset, build_transform, normalize, to_input
from ichpipe.networks.models import create_model
from ichpipe.scoring.metrics import weighted_log_loss
from ichpipe.stages.train import EpochSampler, train_fold
from tests.conftest import TINY_OVERRIDES, TINY_TRAIN, _train_cfg

REPO = Path(__file__).resolve().parents[2]
def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_fold_run_folder_has_everything(processed):
    root, _, meta = processed
    m = train_fold(_train_cfg(root, "artifacts"), progress=False)
    out = m.run_dir
    assert out == root / "runs" / "artifacts" / "fold0"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch00.pt", "epoch01.pt"]
    assert (out / "last.pt").exists() and (out / "config.yaml").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [0, 1] and np.isfinite(history.val_loss).all()
    oof = pd.read_parquet(out / "oof_epoch01.parquet")
    val = meta[meta.fold == 0]
    assert sorted(oof.image_id) == sorted(val.image_id) and list(oof.columns) == ["image_id", *LABELS]
    truth = val.set_index("image_id").loc[oof.image_id, list(LABELS)].to_numpy()
    assert history.val_loss.iloc[-1] == pytest.approx(weighted_log_loss(truth, oof[list(LABELS)].to_numpy()), rel=1e-6)
    with pytest.raises(InputError, match="a run exists; add resume=true"):
        train_fold(_train_cfg(root, "artifacts"), progress=False)


def test_resume_after_a_stop_ends_with_the_same_weights(processed):
    root, _, _ = processed
    train_fold(_train_cfg(root, "straight", "train.epochs=3"), progress=False)
    train_fold(_train_cfg(root, "stopped", "train.epochs=3"), progress=False, stop_after_epochs=1)
    stopped = root / "runs" / "stopped" / "fold0"
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["epoch00.pt"]
    train_fold(_train_cfg(root, "stopped", "train.epochs=3", "resume=true"), progress=False)
    a = _state(root / "runs" / "straight" / "fold0" / "checkpoints" / "epoch02.pt")
    b = _state(stopped / "checkpoints" / "epoch02.pt")
    assert a.keys() == b.keys()
    h1 = pd.read_csv(root / "runs" / "straight" / "fold0" / "history.csv")
    h2 = pd.read_csv(stopped / "history.csv")
    if default_device().type == "cpu":  # bit for bit by construction: seeded order, augmentation and RNG states
        for key in a:
            assert torch.equal(a[key], b[key]), key
        pd.testing.assert_frame_equal(h1, h2)
    else:  # cuDNN's kernels (and fp16) are not deterministic: the same run to within their noise
        for key in a:
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0.05, atol=0.05, msg=key)
        pd.testing.assert_frame_equal(h1, h2, rtol=0.05)


def test_a_run_killed_at_any_write_of_its_last_epoch_resumes_with_its_whole_history(processed, monkeypatch):
    """last.pt is written last: a kill while the epoch's history row (or OOF, or checkpoint) is being written
    resumes from the epoch before, so history.csv has every epoch once (it lost the killed epoch's row when
    last.pt came before it)."""
    import ichpipe.stages.train as train_module

    root, _, _ = processed
    straight = pd.read_csv(Path(train_fold(_train_cfg(root, "whole"), progress=False).run_dir) / "history.csv")
    real = train_module.atomic_path

    def killed_at_history(path):
        if Path(path).name == "history.csv" and (Path(path).parent / "checkpoints" / "epoch01.pt").exists():
            raise KeyboardInterrupt  # the kill, as the last epoch's history row is written
        return real(path)

    monkeypatch.setattr(train_module, "atomic_path", killed_at_history)
    with pytest.raises(KeyboardInterrupt):
        train_fold(_train_cfg(root, "killed"), progress=False)
    monkeypatch.setattr(train_module, "atomic_path", real)
    out = root / "runs" / "killed" / "fold0"
    assert _state(out / "last.pt")["epoch"] == 0
    train_fold(_train_cfg(root, "killed", "resume=true"), progress=False)
    history = pd.read_csv(out / "history.csv")
    assert history.epoch.tolist() == [0, 1]
    if default_device().type == "cpu":
        pd.testing.assert_frame_equal(history, straight)


def test_ddp_with_gloo_on_two_processes(processed):
    root, _, meta = processed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "scripts" / "02_train_cnn.py"), "--config", str(REPO / "configs" / "default.yaml"),
           *TINY_OVERRIDES,
           *TINY_TRAIN, f"data.root={root}", "experiment=ddp", "train.epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICHPIPE_DEVICE": "cpu"}  # gloo on the CPU, whatever the machine has
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = root / "runs" / "ddp" / "fold0"
    assert res.stdout.count("validation weighted log loss") == 1 and "nothing to do" not in res.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch00.pt"]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert np.isfinite(pd.read_csv(out / "history.csv").val_loss).all()
    # validation was split across the two processes and gathered: every held-out image once, in its own row
    val = meta[meta.fold == 0]
    oof = pd.read_parquet(out / "oof_epoch00.parquet")
    assert oof.image_id.tolist() == val.image_id.tolist()
    model = create_model("test_resnet", pretrained=False, init_from=str(out / "checkpoints" / "epoch00.pt"))
    ds = SliceDataset(val, root / "processed" / "512", build_transform([], 32, train=False), labelled=True)
    with torch.no_grad():
        model.eval()
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        want = torch.sigmoid(model(normalize(x))).numpy()
    np.testing.assert_allclose(oof[list(LABELS)].to_numpy(), want, rtol=1e-4, atol=1e-5)


def test_sampler_splits_each_epoch_across_ranks_without_overlap():
    shards = [list(EpochSampler(10, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    indices = sorted(i for s in shards for i in s)
    assert set(indices) == set(range(10)) and len(indices) == 12  # padded with 2 repeats
    s = EpochSampler(10, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(i - 10 for i in second) == list(range(10)) and [i % 10 for i in second] != first


def test_half_resolution_weights_start_a_full_size_run(processed):
    root, _, _ = processed
    train_fold(_train_cfg(root, "half", "train.epochs=1"), progress=False)
    ckpt = root / "runs" / "half" / "fold0" / "checkpoints" / "epoch00.pt"
    model = create_model("test_resnet", pretrained=False, init_from=str(ckpt))
    saved = _state(ckpt)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    m = train_fold(_train_cfg(root, "full", "train.epochs=1", "train.image_size=48", f"model.init_from={ckpt}",
                              "train.crop_border=true"),
                   progress=False)
    assert np.isfinite(m.val_loss)


def test_the_2nd_place_config_crops_like_their_autocrop(processed):
    # their autocrop (darraghdog/rsna scripts/trainorig.py): box of pixels > 0 in any channel, zero-padded to a
    # square (at the top left; ours centres it), then resized to 480: the same head pixels at the same scale
    root, _, meta = processed
    cfg = load_config(REPO / "configs" / "real" / "resnext101_2nd_place.yaml", [f"data.root={root}"])
    img = cv2.cvtColor(cv2.imread(str(root / "processed" / "512" / f"{meta.image_id.iloc[5]}.png")), cv2.COLOR_BGR2RGB)
    rows, cols = np.flatnonzero(img.max(axis=2).any(axis=1)), np.flatnonzero(img.max(axis=2).any(axis=0))
    box = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(box.shape[:2])
    theirs = np.zeros((side, side, 3), np.uint8)
    theirs[:box.shape[0], :box.shape[1]] = box
    ours = crop_border(img, np.random.default_rng(0), cfg.train.crop_margin)
    assert ours.shape == theirs.shape and box.shape[0] != box.shape[1]
    assert np.array_equal(np.sort(ours.ravel()), np.sort(theirs.ravel()))  # the same pixels, placed centred
    x = to_input(img, build_transform([], cfg.train.image_size, train=False), 0, cfg.train.crop_margin)
    assert tuple(x.shape) == (3, 480, 480)


def test_training_labels_must_be_complete(tmp_path):
    meta = pd.DataFrame({"image_id": ["ID_a", "ID_b"], **{c: [0.0, 1.0] for c in LABELS}})
    assert SliceDataset(meta, tmp_path, build_transform([], 8, train=False), labelled=True).labels.sum() == 6
    nan = meta.copy()
    nan.loc[1, "subdural"] = np.nan
    with pytest.raises(InputError, match="metadata: image ID_b has label subdural=nan"):
        SliceDataset(nan, tmp_path, build_transform([], 8, train=False), labelled=True)
    two = meta.copy()
    two.loc[0, "any"] = 2
    with pytest.raises(InputError, match="metadata: image ID_a has label any=2.0"):
        SliceDataset(two, tmp_path, build_transform([], 8, train=False), labelled=True)
    with pytest.raises(InputError, match="metadata: no label column.s. epidural"):
        SliceDataset(meta.drop(columns="epidural"), tmp_path, build_transform([], 8, train=False), labelled=True)
    # test images carry no labels: zeros, no error
    test = meta.drop(columns=list(LABELS))
    assert SliceDataset(test, tmp_path, build_transform([], 8, train=False)).labels.sum() == 0


def test_resume_refuses_changed_settings_and_broken_checkpoints(processed):
    root, _, _ = processed
    train_fold(_train_cfg(root, "changed", "train.epochs=2"), progress=False, stop_after_epochs=1)
    run = root / "runs" / "changed" / "fold0"
    saved = (run / "config.yaml").read_text()
    with pytest.raises(InputError, match=r"resume with other settings than the run's: train.lr=0.0003 \(now 0.001\)"):
        train_fold(_train_cfg(root, "changed", "train.epochs=2", "train.lr=1e-3", "resume=true"), progress=False)
    with pytest.raises(InputError, match=r"model.backbone='test_resnet' \(now 'test_efficientnet'\)"):
        train_fold(_train_cfg(root, "changed", "train.epochs=2", "model.backbone=test_efficientnet", "resume=true"),
                   progress=False)
    # a mapping setting: a change of one of its entries is a change of the setting (model.kwargs builds the network)
    with pytest.raises(InputError, match=r"model.kwargs.channels=None \(now \[8, 16, 32, 64\]\)"):
        train_fold(_train_cfg(root, "changed", "train.epochs=2", "model.kwargs.channels=[8,16,32,64]", "resume=true"),
                   progress=False)
    assert (run / "config.yaml").read_text() == saved  # a refused resume leaves the run's config as it was
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"last.pt: cannot be read as saved weights"):
        train_fold(_train_cfg(root, "changed", "train.epochs=2", "resume=true"), progress=False)


def test_a_tiny_run_learns_more_than_the_prior(processed):
    # validate on the tiny set's fold with the most bleeding slices; four short epochs at 64 px
    root, _, meta = processed
    train = meta[meta.split == "train"]
    fold = int(train.groupby("fold")["any"].sum().idxmax())
    assert 0 < train.loc[train.fold == fold, "any"].mean() < 1 and train.loc[train.fold != fold, "any"].sum() > 0
    m = train_fold(_train_cfg(root, "learns", f"fold={fold}", "train.image_size=64", "train.epochs=4", "train.lr=2e-3",
                              "train.batch_size=8"), progress=False)
    assert m.val_loss < m.prior_loss - 0.01, m
    assert m.last.auc["any"] > 0.8, m


def test_missing_pngs_stop_training_before_the_first_epoch(processed, tmp_path):
    root, _, meta = processed
    data = tmp_path / "data"
    (data / "processed" / "512").mkdir(parents=True)
    shutil.copy(root / "processed" / "metadata.parquet", data / "processed")
    for i, image_id in enumerate(meta.image_id):
        if i != 7:  # one PNG lost
            os.symlink(root / "processed" / "512" / f"{image_id}.png", data / "processed" / "512" / f"{image_id}.png")
    with pytest.raises(InputError, match=rf"1 of \d+ PNGs are missing or empty, e.g. {meta.image_id[7]}.png; "
                                         r"run `make preprocess` again"):
        train_fold(_train_cfg(data, "lost", "train.loader_workers=2", f"fold={int(meta.fold[7])}"), progress=False)
    assert not list((data / "runs").glob("lost/*/checkpoints/*.pt"))  # stopped before any epoch


def test_mixup_mixes_images_and_labels_with_the_same_pairs_and_smoothing_pulls_towards_half():
    from ichpipe.stages.train import mix_batch

    y = torch.tensor(np.random.default_rng(0).integers(0, 2, (16, 6)), dtype=torch.float32)
    x = y[:, :1, None, None].expand(16, 3, 8, 8).clone()  # each image is its first label, everywhere
    xm, ym = mix_batch(x, y, 0.4, 0.0, np.random.default_rng([1, 2, 3]))
    torch.testing.assert_close(xm.mean(dim=(1, 2, 3)), ym[:, 0])  # pixels and labels mixed alike
    assert not torch.equal(ym, y) and ((ym >= 0) & (ym <= 1)).all()
    again, _ = mix_batch(x, y, 0.4, 0.0, np.random.default_rng([1, 2, 3]))
    torch.testing.assert_close(again, xm)  # the same seed, the same mix (resumes reproduce it)
    _, smooth = mix_batch(x, y, 0.0, 0.1, np.random.default_rng(0))
    torch.testing.assert_close(smooth, torch.where(y > 0, 0.95, 0.05))
    same_x, same_y = mix_batch(x, y, 0.0, 0.0, np.random.default_rng(0))
    assert torch.equal(same_x, x) and torch.equal(same_y, y)


def test_nine_channel_input_stacks_each_slice_with_its_series_neighbours(processed):
    """preprocess.mode=2.5d_windows: slices s-1, s, s+1 x 3 windows, the same in training and in `predict`."""
    import cv2

    from ichpipe.base.paths import output_name
    from ichpipe.networks.dataset import DEFAULT_AUGMENT, input_channels, stack_neighbours, to_input

    root, _, meta = processed
    cfg = _train_cfg(root, "nine", "preprocess.mode=2.5d_windows")
    png_dir = root / "processed" / output_name(cfg.preprocess)
    assert input_channels(cfg.preprocess.mode) == 9 and png_dir.name == str(cfg.preprocess.size)  # stage 1's PNGs
    sid = meta[meta.split == "train"].SeriesInstanceUID.iloc[0]
    one = meta[meta.SeriesInstanceUID == sid]
    shuffled = one.sample(frac=1.0, random_state=0)  # row order must not matter: neighbours come from z
    tf = build_transform([], 64, train=False)
    ds9, ds3 = SliceDataset(shuffled, png_dir, tf, channels=9), SliceDataset(shuffled, png_dir, tf)
    in_z = one.sort_values("slice_index").image_id.tolist()
    images = np.stack([cv2.cvtColor(cv2.imread(str(png_dir / f"{i}.png")), cv2.COLOR_BGR2RGB) for i in in_z])
    stacked = stack_neighbours(images)  # what predict feeds the network
    for i, image_id in enumerate(shuffled.image_id):
        x9 = ds9[i][0]
        assert x9.shape == (9, 64, 64)
        assert torch.equal(x9[3:6], ds3[i][0])
        assert torch.equal(x9, to_input(stacked[in_z.index(image_id)], tf, 0, None))
        if image_id == in_z[0]:
            assert torch.equal(x9[0:3], x9[3:6])  # the first slice repeats itself
    aug9 = SliceDataset(shuffled, png_dir, build_transform(DEFAULT_AUGMENT, 64, True), seed=3, channels=9)
    aug3 = SliceDataset(shuffled, png_dir, build_transform(DEFAULT_AUGMENT, 64, True), seed=3)
    assert torch.equal(aug9[1][0][3:6], aug3[1][0])  # one augmentation for all nine channels
    model = create_model("test_resnet", pretrained=False, in_chans=9).eval()
    assert model(normalize(torch.stack([ds9[0][0], ds9[1][0]]))).shape == (2, 6)


def test_nine_channel_runs_train_and_embed(processed):
    from ichpipe.stages.embed import embed_fold

    root, _, meta = processed
    cfg = _train_cfg(root, "nine_run", "preprocess.mode=2.5d_windows", "train.epochs=1", "embed.tta=[none,hflip]")
    result = train_fold(cfg, progress=False)
    assert np.isfinite(result.val_loss)
    embed_fold(cfg, progress=False)
    folder = root / "runs" / "nine_run" / f"fold{cfg.fold}" / "embeddings" / "epoch00"
    logits = np.load(folder / "oof_logits.npy")
    assert (folder / "done").exists() and logits.shape == ((meta.fold == cfg.fold).sum(), 6)
    assert np.isfinite(logits).all()


def test_two_trainings_of_one_fold_at_once_the_second_is_refused(processed):
    """Issue 31: two `make train fold=0` of one experiment both exited 0 and interleaved one run folder."""
    import signal
    import time

    root, _, _ = processed
    script = Path(__file__).resolve().parents[2] / "scripts" / "02_train_cnn.py"
    args = [sys.executable, str(script), "--config", str(Path(__file__).resolve().parents[2] / "configs" /
                                                          "default.yaml"),
            *TINY_OVERRIDES, *TINY_TRAIN, f"data.root={root}", "experiment=two_writers", "fold=0", "train.epochs=200"]
    run = root / "runs" / "two_writers" / "fold0"
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "config.yaml").exists():
            time.sleep(0.05)
        assert (run / "config.yaml").exists(), first.stderr.read() if first.poll() is not None else "no run folder"
        config = (run / "config.yaml").read_bytes()
        second = subprocess.run([*args[:-1], "train.epochs=3", "resume=true"], capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.startswith(f"error: {run}: stage 2 (train) of two_writers fold 0 (process {first.pid}) "
                                        "is writing this folder; wait until it ends") and second.stderr.count("\n") == 1
        assert (run / "config.yaml").read_bytes() == config  # was: the second's config beside the first's history
        assert len(list((run / "tb").glob("events.*"))) <= 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_every_resume_key_names_a_setting():
    from ichpipe.base.config import Config, get_value
    from ichpipe.stages.train import RESUME_KEYS

    cfg = Config()
    for key in RESUME_KEYS:  # a key ending in '.' names a whole section
        get_value(cfg, key.rstrip("."))  # AttributeError for a key the schema does not have (a typo: never checked)
    with pytest.raises(AttributeError):  # the check itself can fail
        get_value(cfg, "train.lrr")


def test_a_pseudo_label_round_trains_on_its_folds_test_labels_only(processed, monkeypatch):
    from ichpipe.base.paths import run_dir
    from ichpipe.stages import train as train_stage
    from tests.conftest import write_pseudo_source

    root, _, meta = processed
    write_pseudo_source(root, "pl_source", meta)  # fold k's test labels: 0.1 + 0.2 k everywhere
    seen = {}

    class Spy(train_stage.SliceDataset):
        def __init__(self, rows, *args, targets=None, **kwargs):
            super().__init__(rows, *args, targets=targets, **kwargs)
            if targets is not None:
                seen["labels"] = pd.DataFrame(self.labels, index=self.ids, columns=list(LABELS))

    monkeypatch.setattr(train_stage, "SliceDataset", Spy)
    fold = int(meta.fold.dropna().max())
    cfg = _train_cfg(root, "pl_round", "train.epochs=1", f"fold={fold}", "pseudo.source=pl_source")
    train_fold(cfg, progress=False)
    labels = seen["labels"]
    test_ids = meta.image_id[meta.split == "test"]
    train_rows = meta[meta.fold.notna() & (meta.fold != fold)].set_index("image_id")
    assert sorted(labels.index) == sorted([*train_rows.index, *test_ids])  # never a slice of the validated fold
    np.testing.assert_allclose(labels.loc[test_ids].to_numpy(), 0.1 + 0.2 * fold, rtol=1e-6)  # its own fold's
    np.testing.assert_array_equal(labels.loc[train_rows.index].to_numpy(), train_rows[list(LABELS)].to_numpy())
    record = json.loads((run_dir(cfg) / "pseudo.json").read_text())
    assert record["slices"] == len(test_ids) and record["source"].endswith("pl_source/blend/test_by_fold.parquet")
    # the source made again with other labels: its finished epochs learnt the former ones, a resume is refused
    write_pseudo_source(root, "pl_source", meta, values=lambda k, n: np.full((n, 6), 0.5))
    with pytest.raises(InputError, match="trained on other pseudo-labels than those of .*pl_source.*experiment=<new "
                                         "name>"):
        train_fold(cfg.model_copy(update={"resume": True}), progress=False)
