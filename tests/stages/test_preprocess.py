"""Stage 1 on the tiny synthetic set: PNG contents, metadata, z order, bad files, resume, shards, 2.5D."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.imaging.dicom import hounsfield
from ichpipe.imaging.png import read_png
from ichpipe.imaging.windowing import apply_window
from ichpipe.scoring.folds import fold_table_id, record_fold_table
from ichpipe.stages.preprocess import PreprocessError, run_preprocess
from tests.conftest import TINY_OVERRIDES, _cfg

REPO = Path(__file__).resolve().parents[2]


def test_metadata_table(processed, tiny_data):
    root, summary, meta = processed
    _, truth = tiny_data
    assert summary.complete and summary.bad == 1  # the truncated file
    usable = truth[~truth.truncated]
    assert sorted(meta.image_id) == sorted(usable.image_id)
    merged = meta.merge(usable, on="image_id", suffixes=("", "_truth"))
    for col in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "split"):
        assert (merged[col] == merged[f"{col}_truth"]).all()
    np.testing.assert_allclose(merged.z, merged.z_truth, atol=1e-4)
    # order within a series comes from ImagePositionPatient; the generator wrote slices bottom to top,
    # so the expected index is the generation order among the usable files
    expected = merged.groupby("SeriesInstanceUID").slice_index_truth.rank(method="first").astype(int) - 1
    assert (merged.slice_index == expected).all()
    assert (merged.series_length == merged.groupby("SeriesInstanceUID").image_id.transform("size")).all()
    train = merged[merged.split == "train"]
    for name in LABELS:
        assert (train[name] == train[f"{name}_truth"]).all()
    assert merged.loc[merged.split == "test", list(LABELS)].isna().all().all()
    assert (merged.fixed_12bit == (merged.storage == "quirk12")).all()
    assert (merged.multivalue_window == merged.multivalue_window_truth).all()
    assert (merged.rows == merged["size"]).all()


def test_png_channels_are_the_three_windows(processed):
    root, _, meta = processed
    row = meta[(meta.rows == 512) & meta.fixed_12bit].iloc[0]  # a broken 12-bit file, fixed
    ds = pydicom.dcmread(root / f"stage_2_{row.split}" / f"{row.image_id}.dcm")
    hu = hounsfield(ds.pixel_array, ds)
    assert hu.min() >= -1000 and np.percentile(hu, 1) == -1000  # air is air after the fix
    png = read_png(root / "processed" / "512" / f"{row.image_id}.png")
    assert png.shape == (512, 512, 3)
    for i, (c, w) in enumerate([(40, 80), (80, 200), (40, 380)]):
        np.testing.assert_array_equal(png[..., i], apply_window(hu, c, w))


def test_non_512_inputs_are_resized(processed):
    root, _, meta = processed
    row = meta[meta.rows != 512].iloc[0]
    assert read_png(root / "processed" / "512" / f"{row.image_id}.png").shape == (512, 512, 3)


def _labels_of(src: Path, root: Path, image_ids: list[str]) -> None:
    """``root``'s stage_2_train.csv: the rows of ``src``'s for these images only (a subset copied as a whole)."""
    labels = pd.read_csv(src / "stage_2_train.csv")
    labels[labels.ID.str.rsplit("_", n=1).str[0].isin(image_ids)].to_csv(root / "stage_2_train.csv", index=False)


def test_bad_files_are_reported_and_left_out(tiny_data, tmp_path):
    src, truth = tiny_data
    root = tmp_path / "data"
    train_dir = root / "stage_2_train"
    train_dir.mkdir(parents=True)
    keep = truth[(truth.split == "train") & ~truth.truncated].head(30).image_id.tolist()
    truncated = truth[truth.truncated].image_id.item()
    for image_id in [*keep, truncated]:
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", train_dir)
    _labels_of(src, root, [*keep, truncated])
    (train_dir / "ID_000000bad.dcm").write_text("this is not a DICOM file")
    template = train_dir / f"{keep[0]}.dcm"
    for stem, change in [("ID_00000nopx", lambda d: d.__delattr__("PixelData")),
                         ("ID_00000nopt", lambda d: d.__delattr__("PatientID")),
                         ("ID_00000nolb", lambda d: None)]:
        ds = pydicom.dcmread(template)
        ds.SOPInstanceUID = stem
        change(ds)
        ds.save_as(train_dir / f"{stem}.dcm")
    with pytest.raises(PreprocessError, match=r"^5 of 35 files are unusable, more than "
                                              r"preprocess.max_bad_fraction=0.05; see .*bad_files.csv$"):
        run_preprocess(_cfg(root, "preprocess.max_bad_fraction=0.05"), progress=False)
    report = pd.read_csv(root / "processed" / "512" / "bad_files.csv")
    reasons = dict(zip(report.file.map(lambda f: Path(f).stem), report.reason, strict=True))
    assert reasons.pop("ID_000000bad").startswith("not a readable DICOM file")
    assert reasons.pop("ID_00000nopx") == "not an image: no PixelData"
    assert reasons.pop("ID_00000nopt") == "missing required tag(s) PatientID"
    assert reasons.pop("ID_00000nolb") == "no labels in stage_2_train.csv"
    assert reasons.pop(truncated).startswith("pixel data cannot be decoded: The number of bytes of pixel data is less")
    assert not reasons
    # a failed stage leaves no table for later stages to use
    assert not (root / "processed" / "metadata.parquet").exists()
    summary = run_preprocess(_cfg(root, "preprocess.max_bad_fraction=0.2"), progress=False)  # tolerated
    assert summary.complete and summary.bad == 5 and summary.processed == 0
    meta = pd.read_parquet(root / "processed" / "metadata.parquet")
    assert sorted(meta.image_id) == sorted(keep)


def test_folds_that_runs_were_trained_on_are_not_rewritten(processed, tmp_path):
    root, _, _ = processed
    data = _linked_root(root, tmp_path)
    run_preprocess(_cfg(data, "preprocess.size=32"), progress=False)
    meta = pd.read_parquet(data / "processed" / "metadata.parquet")
    before = fold_table_id(meta)
    # no run yet: the folds may change freely
    run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.n_folds=3"), progress=False)
    assert fold_table_id(pd.read_parquet(data / "processed" / "metadata.parquet")) != before
    run_preprocess(_cfg(data, "preprocess.size=32"), progress=False)
    assert fold_table_id(pd.read_parquet(data / "processed" / "metadata.parquet")) == before
    record_fold_table(data / "runs" / "exp" / "fold0", meta)  # a run trained on these folds
    for change in ("preprocess.n_folds=3", "preprocess.fold_seed=1"):
        with pytest.raises(PreprocessError, match=rf"give fold table [0-9a-f]{{16}}, but 1 run folder\(s\) were "
                                                  rf"trained on the current table {before}, e.g. .*runs/exp/fold0"):
            run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.name=other", change), progress=False)
        assert fold_table_id(pd.read_parquet(data / "processed" / "metadata.parquet")) == before
    # the same folds under another output name are fine; replacing them must be asked for
    run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.name=same_folds"), progress=False)
    run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.n_folds=3", "preprocess.replace_folds=true"),
                   progress=False)
    assert pd.read_parquet(data / "processed" / "metadata.parquet").fold.nunique() == 3


def _linked_root(root: Path, tmp_path: Path) -> Path:
    """A fresh data root whose competition files are links to the tiny set's (no processed/ yet)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("stage_2_train", "stage_2_test", "stage_2_train.csv"):
        os.symlink(root / name, data / name)
    return data


def _pngs(folder: Path) -> list[Path]:
    """Finished PNGs only: a kill can leave a hidden temporary '.<name>.png.<random>.tmp.png'."""
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _pngs(folder)}


def test_resume_after_kill_gives_the_uninterrupted_result(processed, tmp_path):
    root, _, meta = processed
    reference = _digests(root / "processed" / "512")
    data = _linked_root(root, tmp_path)
    cmd = [sys.executable, str(REPO / "scripts" / "01_preprocess.py"), "--config",
           str(REPO / "configs" / "default.yaml"),
           *TINY_OVERRIDES, f"data.root={data}",
           "data.workers=1", "preprocess.chunk_size=8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = data / "processed" / "512"
    deadline = time.time() + 120
    while time.time() < deadline and len(_pngs(out)) < 20:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (data / "processed" / "metadata.parquet").exists(), "the run ended before it was killed"
    assert 20 <= len(_pngs(out)) < len(reference)
    # resume with the default chunk size: the killed run's chunks of 8 do not count as done,
    # but its finished PNGs are kept
    summary = run_preprocess(_cfg(data), progress=False)
    assert summary.complete and summary.skipped >= 20
    assert _digests(out) == reference
    assert not list(out.glob(".*.tmp*"))  # a temp file the kill left mid-write is swept
    pd.testing.assert_frame_equal(pd.read_parquet(data / "processed" / "metadata.parquet"), meta)


def test_shards_split_the_work_and_the_last_one_assembles(processed, tmp_path):
    root, _, meta = processed
    data = _linked_root(root, tmp_path)
    first = run_preprocess(_cfg(data, "preprocess.chunk_size=16"), shard=(0, 2), progress=False)
    assert not first.complete and first.pending_chunks > 0
    assert 0 < len(_pngs(data / "processed" / "512")) < len(meta)
    second = run_preprocess(_cfg(data, "preprocess.chunk_size=16"), shard=(1, 2), progress=False)
    assert second.complete
    assert first.processed + second.processed == first.files
    pd.testing.assert_frame_equal(pd.read_parquet(data / "processed" / "metadata.parquet"), meta)


def test_changed_windows_need_a_new_folder(processed):
    root, _, _ = processed
    with pytest.raises(PreprocessError, match=r"preprocess.windows=.*set preprocess.name"):
        run_preprocess(_cfg(root, "preprocess.windows=[[40,80],[80,200],[600,2800]]"), progress=False)


def test_25d_mode_stacks_neighbouring_brain_windows(processed):
    root, _, meta = processed
    run_preprocess(_cfg(root, "preprocess.mode=2.5d", "preprocess.size=128"), progress=False)
    series = meta[meta.SeriesInstanceUID == meta.SeriesInstanceUID.iloc[0]].sort_values("slice_index")
    ids = series.image_id.tolist()
    folder = root / "processed" / "128_2.5d"
    brain = [read_png(folder / "brain" / f"{i}.png") for i in ids]
    mid = read_png(folder / f"{ids[3]}.png")
    for channel, neighbour in enumerate((2, 3, 4)):
        np.testing.assert_array_equal(mid[..., channel], brain[neighbour])
    first = read_png(folder / f"{ids[0]}.png")
    np.testing.assert_array_equal(first[..., 0], brain[0])  # the edge repeats itself


def test_stray_temp_files_of_a_killed_write_are_swept(processed, tmp_path):
    root, _, _ = processed
    data = _linked_root(root, tmp_path)
    out = data / "processed" / "512"
    out.mkdir(parents=True)
    stray = out / ".ID_000000000.png.abc123.tmp.png"  # what atomic_path leaves when killed mid-write
    stray.write_bytes(b"half a png")
    run_preprocess(_cfg(data), progress=False)
    assert not stray.exists()


def test_a_file_named_unlike_its_sop_instance_uid_is_reported_and_leaves_no_png(tiny_data, tmp_path):
    src, truth = tiny_data
    root = tmp_path / "data"
    (root / "stage_2_train").mkdir(parents=True)
    train = truth[(truth.split == "train") & ~truth.truncated]
    good = train.image_id.iloc[0]
    other = train[train.PatientID != train.PatientID.iloc[0]].image_id.iloc[0]  # two patients: two folds
    for image_id in (good, other):
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", root / "stage_2_train")
    shutil.copy(src / "stage_2_train" / f"{good}.dcm", root / "stage_2_train" / "ID_0000renamed.dcm")
    _labels_of(src, root, [good, other])
    summary = run_preprocess(_cfg(root, "preprocess.max_bad_fraction=0.4", "preprocess.n_folds=2"), progress=False)
    assert summary.complete and summary.bad == 1
    report = pd.read_csv(root / "processed" / "512" / "bad_files.csv")
    assert report.reason.tolist() == [f"SOPInstanceUID {good} differs from the file name"]
    assert _pngs(root / "processed" / "512") == sorted(root / "processed" / "512" / f"{i}.png" for i in (good, other))


def test_resume_goes_by_the_files_not_the_chunk_markers(processed, tmp_path):
    root, _, full = processed
    data = tmp_path / "data"
    data.mkdir()
    for name in ("stage_2_train", "stage_2_train.csv"):
        os.symlink(root / name, data / name)
    first = run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.chunk_size=16"), progress=False)
    assert (pd.read_parquet(data / "processed" / "metadata.parquet").split == "test").sum() == 0
    # the test set arrives after the first run: its files are processed, the train PNGs are not redone
    os.symlink(root / "stage_2_test", data / "stage_2_test")
    second = run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.chunk_size=16"), progress=False)
    n_test = len(list((root / "stage_2_test").glob("*.dcm")))
    assert second.processed == n_test and first.files + n_test == second.files
    meta = pd.read_parquet(data / "processed" / "metadata.parquet")
    assert (meta.split == "test").sum() == (full.split == "test").sum() > 0
    # a deleted and a truncated PNG are rebuilt, nothing else
    out = data / "processed" / "32"
    gone, cut = out / f"{meta.image_id[0]}.png", out / f"{meta.image_id[5]}.png"
    whole = cut.read_bytes()
    gone.unlink()
    cut.write_bytes(whole[: len(whole) // 2])
    third = run_preprocess(_cfg(data, "preprocess.size=32", "preprocess.chunk_size=16"), progress=False)
    assert third.processed == 2 and gone.exists() and cut.read_bytes() == whole


def test_labels_are_checked_before_the_dicom_pass(processed, tmp_path):
    root, _, _ = processed
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(root / "stage_2_train", data / "stage_2_train")
    with pytest.raises(PreprocessError, match=r"stage_2_train.csv: not found; the training DICOMs need their labels"):
        run_preprocess(_cfg(data, "preprocess.size=32"), progress=False)
    labels = pd.read_csv(root / "stage_2_train.csv").drop_duplicates().reset_index(drop=True)
    labels.loc[3, "Label"] = 2
    labels.loc[10, "Label"] = -1
    labels.to_csv(data / "stage_2_train.csv", index=False)
    with pytest.raises(InputError, match=r"2 images have a label that is not 0 or 1, e.g. ID_\w+=(2|-1)$"):
        run_preprocess(_cfg(data, "preprocess.size=32"), progress=False)
    assert not list((data / "processed" / "32").glob("*.png"))  # refused before any work


def _two_patients(src: Path, truth: pd.DataFrame, root: Path) -> list[str]:
    """A data root with copies (not links: they are changed) of two training patients' files and their labels."""
    (root / "stage_2_train").mkdir(parents=True)
    train = truth[(truth.split == "train") & ~truth.truncated]
    ids = train[train.PatientID.isin(train.PatientID.unique()[:2])].image_id.tolist()
    for image_id in ids:
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", root / "stage_2_train")
    _labels_of(src, root, ids)
    return ids


def test_a_dicom_replaced_after_stage_1_is_rendered_again(tiny_data, tmp_path):
    """Issue 31: a DICOM replaced under its name (new pixels) kept its old PNG ("318 already done")."""
    src, truth = tiny_data
    root = tmp_path / "data"
    ids = _two_patients(src, truth, root)
    cfg = _cfg(root, "preprocess.size=32", "preprocess.n_folds=2")
    run_preprocess(cfg, progress=False)
    out = root / "processed" / "32"
    before = {i: (out / f"{i}.png").read_bytes() for i in ids}
    # new pixels, same name and size (a fresh modification time)
    path = root / "stage_2_train" / f"{ids[3]}.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array[::-1]).tobytes()  # the slice upside down
    ds.save_as(path)
    assert path.stat().st_size == (src / "stage_2_train" / f"{ids[3]}.dcm").stat().st_size
    # new pixels and another size, with the old modification time put back (a copy that keeps times, cp -p)
    other = root / "stage_2_train" / f"{ids[7]}.dcm"
    old = other.stat()
    ds = pydicom.dcmread(other)
    ds.PixelData = (ds.pixel_array[:, ::-1]).tobytes()
    ds.ImageComments = "replaced"
    ds.save_as(other)
    os.utime(other, ns=(old.st_atime_ns, old.st_mtime_ns))
    again = run_preprocess(cfg, progress=False)
    assert again.processed == 2 and again.skipped == len(ids) - 2
    after = {i: (out / f"{i}.png").read_bytes() for i in ids}
    assert [i for i in ids if after[i] != before[i]] == [ids[3], ids[7]]
    np.testing.assert_array_equal(read_png(out / f"{ids[3]}.png"), read_png_bytes(before[ids[3]])[::-1])
    assert run_preprocess(cfg, progress=False).processed == 0  # and then it is current


def read_png_bytes(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]


def test_slices_of_one_series_at_one_position_are_kept_and_listed(tiny_data, tmp_path):
    """Issue 31: two slices of one series at the same position were both kept without a word."""
    src, truth = tiny_data
    root = tmp_path / "data"
    ids = _two_patients(src, truth, root)
    ds = pydicom.dcmread(root / "stage_2_train" / f"{ids[2]}.dcm")
    ds.SOPInstanceUID = "ID_00000twin"
    ds.save_as(root / "stage_2_train" / "ID_00000twin.dcm")
    labels = pd.read_csv(root / "stage_2_train.csv")
    twin = labels[labels.ID.str.startswith(f"{ids[2]}_")].assign(ID=lambda d: d.ID.str.replace(ids[2], "ID_00000twin"))
    pd.concat([labels, twin]).to_csv(root / "stage_2_train.csv", index=False)
    summary = run_preprocess(_cfg(root, "preprocess.size=32", "preprocess.n_folds=2"), progress=False)
    assert summary.complete and summary.same_position == 2
    listed = pd.read_csv(root / "processed" / "32" / "same_position.csv")
    assert sorted(listed.image_id) == sorted([ids[2], "ID_00000twin"]) and listed.z.nunique() == 1
    meta = pd.read_parquet(root / "processed" / "metadata.parquet")
    assert {ids[2], "ID_00000twin"} <= set(meta.image_id)  # both kept: each has its labels
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "01_preprocess.py"), "--config",
                          str(REPO / "configs" / "default.yaml"), *TINY_OVERRIDES, f"data.root={root}",
                          "preprocess.size=32", "preprocess.n_folds=2", "data.workers=1"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and ("warning: 2 slices share their series' position with another slice (kept; "
                                    f"listed in {root / 'processed' / '32'}/same_position.csv)") in res.stdout
