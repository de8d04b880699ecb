"""Bad input, round two (issue 23): no non-finite header value reaches a model, no name from the command line
leads outside its folder, every operating-system and archive error is one line, partial inputs are counted,
a killed run's leftovers are cleaned, and no stage replaces a finished result made with other settings."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from ichpipe.__main__ import main as ichpipe_main
from ichpipe.base import files as ichio
from ichpipe.base.cli import report_errors, stage_main
from ichpipe.base.config import STAGE_CONFIG, ConfigError, load_config
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_dir, atomic_path, sweep_temp_files
from ichpipe.base.label_csv import read_long_csv
from ichpipe.clinical.studies import MAX_MEMBER_BYTES, find_series
from ichpipe.imaging.dicom import DicomError, read_header
from ichpipe.networks.bundle_format import load_bundle
from ichpipe.stages.preprocess import PreprocessError, run_preprocess
from ichpipe.stages.search import read_space
from tests.conftest import _cfg

REPO = Path(__file__).resolve().parents[2]

# (field, value written, the reason's start): each makes a slice unusable
DAMAGED = [("RescaleSlope", "nan", "RescaleSlope = nan is not a finite number"),
           ("RescaleIntercept", "inf", "RescaleIntercept = inf is not a finite number"),
           ("PixelSpacing", ["nan", "0.5"], "PixelSpacing = nan is not a finite number"),
           ("ImagePositionPatient", ["0", "0", "inf"], "ImagePositionPatient = inf is not a finite number"),
           ("ImageOrientationPatient", ["1", "0", "0", "0", "7", "0"], "ImageOrientationPatient = 7.0 is not a finite "
                                                                       "number in [-1.01, 1.01]"),
           ("WindowWidth", "-nan", "WindowWidth = nan is not a finite number"),
           ("RescaleSlope", "0", "RescaleSlope = 0.0 is not a finite number in [1e-06, 1000]")]


def _damaged_copy(src: Path, folder: Path, stem: str, field: str, value) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = stem
    with warnings.catch_warnings():  # pydicom's remarks on the invalid values written on purpose
        warnings.simplefilter("ignore")
        setattr(ds, field, value)
        ds.save_as(folder / f"{stem}.dcm")
    return folder / f"{stem}.dcm"


def _dead_pid() -> int:
    """The id of a process that has ended (its slot not yet reused, for the moment of a test)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_non_finite_or_implausible_header_values_make_the_file_bad_in_stage_1_and_in_predict(tiny_data, tmp_path):
    src, truth = tiny_data
    root = tmp_path / "data"
    train_dir = root / "stage_2_train"
    train_dir.mkdir(parents=True)
    train = truth[(truth.split == "train") & ~truth.truncated]
    keep = train[train.PatientID.isin(train.PatientID.unique()[:2])].image_id.tolist()
    for image_id in keep:
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", train_dir)
    labels = pd.read_csv(src / "stage_2_train.csv")
    labels = labels[labels.ID.str.rsplit("_", n=1).str[0].isin(keep)]
    stems = [f"ID_00000bad{i}" for i in range(len(DAMAGED))]
    for stem, (field, value, _) in zip(stems, DAMAGED, strict=True):
        _damaged_copy(train_dir / f"{keep[0]}.dcm", train_dir, stem, field, value)
        # labelled like the slice they copy: before the fix, a NaN slope gave an all-black PNG trained on
        extra = labels[labels.ID.str.startswith(keep[0] + "_")].copy()
        extra["ID"] = extra.ID.str.replace(keep[0], stem)
        labels = pd.concat([labels, extra])
    labels.to_csv(root / "stage_2_train.csv", index=False)
    summary = run_preprocess(_cfg(root, "preprocess.size=32", "preprocess.max_bad_fraction=0.5",
                                  "preprocess.n_folds=2"), progress=False)
    assert summary.complete and summary.bad == len(DAMAGED)
    report = pd.read_csv(root / "processed" / "32" / "bad_files.csv")
    reasons = dict(zip(report.file.map(lambda f: Path(f).stem), report.reason, strict=True))
    for stem, (_, _, reason) in zip(stems, DAMAGED, strict=True):
        assert reasons[stem].startswith(reason), (stem, reasons[stem])
    meta = pd.read_parquet(root / "processed" / "metadata.parquet")
    assert sorted(meta.image_id) == sorted(keep)  # none of them reaches the table, so none is trained on
    # predict: the same check, the file in skipped.csv's rows with its reason
    study = tmp_path / "study"
    series = train[train.SeriesInstanceUID == train.SeriesInstanceUID.iloc[0]].image_id.tolist()
    study.mkdir()
    for image_id in series:
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", study)
    bad = _damaged_copy(study / f"{series[0]}.dcm", study, "ID_00000badp", "RescaleSlope", "nan")
    found, skipped = find_series(study, tmp_path / "work")
    assert [len(s.files) for s in found] == [len(series)]
    assert skipped == [{"what": str(bad), "reason": "RescaleSlope = nan is not a finite number in [1e-06, 1000]"}]
    # a file without the optional fields is still fine
    ds = pydicom.dcmread(study / f"{series[1]}.dcm")
    for name in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "PixelSpacing"):
        delattr(ds, name)
    ds.save_as(tmp_path / "plain.dcm")
    plain = read_header(tmp_path / "plain.dcm")
    assert math.isnan(plain["window_center"]) and math.isnan(plain["pixel_spacing"])  # absent: not a bad file
    ds.ImagePositionPatient = ["0", "0"]
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(DicomError, match=r"^ImagePositionPatient has 2 value\(s\), expected 3$"):
        read_header(tmp_path / "short.dcm")


@pytest.mark.parametrize("override, message", [
    ("experiment=../../etc", "experiment: must be a plain folder name (letters, digits, '_', '.', '-'; not starting "
                             "with '.'; at most 100), got '../../etc'"),
    ("experiment=", "experiment: must be a plain folder name"),
    ("experiment=a/b", "experiment: must be a plain folder name"),
    ("experiment=..", "experiment: must be a plain folder name"),
    ("ensemble.name=/tmp/x", "ensemble.name: must be a plain folder name"),
    ("ensemble.members=[demo,../other]", "ensemble.members[1]: must be a plain folder name"),
    ("preprocess.name=../32", "preprocess.name: must be a plain folder name"),
    ("train.lr=-1", "train.lr: must be above 0.0, got -1.0"),
    ("train.lr=0", "train.lr: must be above 0.0, got 0.0"),
    ("train.weight_decay=-1", "train.weight_decay: must be at least 0.0, got -1.0"),
    ("lstm.lr=-1e-3", "lstm.lr: must be above 0.0"),
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("blend.lstm_weight=.inf", "blend.lstm_weight: must be a finite number, got inf"),
    ("train.label_smoothing=2", "train.label_smoothing: must be between 0.0 and 1.0, got 2.0"),
])
def test_names_and_numbers_are_checked_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(STAGE_CONFIG, [override])


def test_a_refused_setting_makes_no_run_folder(processed, tmp_path):
    root, _, _ = processed
    work = tmp_path / "work"
    for override in ("train.lr=-1", "train.weight_decay=-1", "experiment=../../escaped"):
        res = subprocess.run([sys.executable, str(REPO / "scripts" / "02_train_cnn.py"), f"data.root={root}",
                              f"data.work_dir={work}", "fold=0", override], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert not work.exists() and not (tmp_path / "escaped").exists()  # was: config, folds.json, checkpoints/


def test_a_search_name_is_a_plain_folder_name(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: ../outside\nspace: {train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}\n")
    with pytest.raises(InputError, match=re.escape(f"{space}: name: must be a plain folder name")):
        read_space(space)


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    target = tmp_path / "runs" / "x" / "last.pt"

    def full_disk():  # a write onto a full disk names no file: the atomic write names its target
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")

    assert report_errors(full_disk) == 2
    assert capsys.readouterr().err == (f"error: {target}: No space left on device; free some space there, or write "
                                       "the outputs elsewhere with data.work_dir=PATH (TMPDIR for temporary files)\n")
    assert not list(target.parent.iterdir())  # nothing half-written

    def staging_dir_cannot_be_made():
        with atomic_dir(Path("/proc/ichpipe-out")):
            pass

    assert report_errors(staging_dir_cannot_be_made) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /proc/ichpipe-out: ") and err.count("\n") == 1


MINIMAL_INFO = {
    "format": 1, "experiment": "x", "created": "2026-12-06T00:00:00", "git": {}, "backbone": "test_resnet",
    "fp16": False, "preprocess": {"windows": [[40, 80]], "size": 32, "mode": "2.5d"},
    "input": {"image_size": 32, "crop_border": False, "tta": ["none"], "batch_size": 8}, "folds": [0],
    "epochs": {0: [0]}, "lstm": False, "blend": {"epoch_weights": {}, "fold_weights": {}, "lstm_weight": 0.0,
                                                  "clip": 1e-5},
    "prior": [0.1] * 6, "thresholds": {}, "series_calibration": {}, "cv": {}, "config": {}}


def _bundle_dir(folder: Path, info: dict | None = None) -> Path:
    """The smallest folder that load_bundle opens: bundle.yaml and its manifest."""
    folder.mkdir(parents=True)
    (folder / "bundle.yaml").write_text(yaml.safe_dump(info or MINIMAL_INFO))
    digest = hashlib.sha256((folder / "bundle.yaml").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "files": {"bundle.yaml": digest}}))
    return folder


def _ours(temp: Path) -> list[Path]:
    """What this project left in the temporary folder (torch may add a cache folder of its own there)."""
    return [p for p in temp.iterdir() if not p.name.startswith("torchinductor")]


def test_bundle_archives_damaged_unsafe_or_good_leave_no_temporary_folder(tmp_path, monkeypatch, capsys):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    good = tmp_path / "b.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(_bundle_dir(tmp_path / "bundle"), arcname="bundle")
    with load_bundle(good) as bundle:
        assert bundle.info.backbone == "test_resnet" and bundle.root.parent.parent == temp
    assert not _ours(temp)  # was: unpacked into a mkdtemp folder never removed
    bundle = load_bundle(good)
    del bundle  # never closed: removed when collected
    assert not _ours(temp)

    wrong = _bundle_dir(tmp_path / "wrong", {**MINIMAL_INFO, "input": {**MINIMAL_INFO["input"], "image_size": "big"}})
    with pytest.raises(InputError, match=rf"^{re.escape(str(wrong / 'bundle.yaml'))}: input.image_size: Input should "
                                         r"be a valid integer.*\(1 problem\(s\)\)$"):
        load_bundle(wrong)  # a typed bundle.yaml: checked field by field when loaded

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"^{re.escape(str(truncated))}: not a readable bundle archive, truncated, "
                                         r"damaged or unsafe \((EOFError|ReadError)"):
        load_bundle(truncated)  # was: an EOFError traceback
    assert not _ours(temp)

    unsafe = tmp_path / "unsafe.tar.gz"
    (tmp_path / "evil.txt").write_text("x")
    with tarfile.open(unsafe, "w:gz") as tar:
        tar.add(tmp_path / "bundle", arcname="bundle")
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with pytest.raises(InputError, match=r"unsafe.tar.gz: member '../evil.txt' lies outside the bundle's folder; "
                                         r"refusing the archive \(nothing was unpacked\)$"):
        load_bundle(unsafe)  # was: tarfile's traceback
    assert not _ours(temp)

    # through the entry point: one line each, exit code 2
    study = tmp_path / "study"
    study.mkdir()
    out_file = tmp_path / "taken"
    out_file.write_text("a file")
    for args, message in (
            (["--bundle", str(truncated), "--out", str(tmp_path / "o")], f"error: {truncated}: not a readable bundle "),
            (["--bundle", str(good), "--out", str(out_file)], f"error: {out_file}: exists and is not a folder"),
            (["--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "o")], f"error: {tmp_path / 'none'}: bundle "
                                                                                  "not found")):
        assert ichpipe_main(["predict", str(study), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        ichpipe_main(["predict", str(study), "--bundle", str(good), "--out", str(tmp_path / "o"), "--min-slices", "-3"])
    assert exit_.value.code == 2 and "argument --min-slices: must be at least 1, got -3" in capsys.readouterr().err
    assert not _ours(temp)


def test_a_zip_bomb_is_not_unpacked_past_the_limit(tiny_data, tmp_path):
    src, truth = tiny_data
    one = truth[(truth.split == "train") & ~truth.truncated].image_id.iloc[0]
    study = tmp_path / "study.zip"
    with zipfile.ZipFile(study, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(src / "stage_2_train" / f"{one}.dcm", f"s/{one}.dcm")
        with z.open("s/bomb.dcm", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range((MAX_MEMBER_BYTES >> 20) + 8):
                member.write(block)
    assert study.stat().st_size < 2 << 20
    work = tmp_path / "work"
    work.mkdir()
    found, skipped = find_series(study, work)
    assert [s.ids for s in found] == [[one]]
    assert skipped == [{"what": f"{study}:s/bomb.dcm", "reason": f"{(MAX_MEMBER_BYTES >> 20) + 8} MiB unpacked, more "
                                                                  "than 64 MiB: not a CT slice"}]
    assert sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) < 1 << 20  # was: 2 GiB written first


def test_labels_without_dicom_are_counted_and_refused_above_the_limit(tiny_data, tmp_path, capsys):
    src, truth = tiny_data
    root = tmp_path / "data"
    (root / "stage_2_train").mkdir(parents=True)
    train = truth[(truth.split == "train") & ~truth.truncated]
    shutil.copy(src / "stage_2_train.csv", root)  # every label, a third of the files: a partial download
    files = train.image_id.tolist()
    copied = files[: len(files) // 3]
    for image_id in copied:
        shutil.copy(src / "stage_2_train" / f"{image_id}.dcm", root / "stage_2_train")
    labelled = read_long_csv(root / "stage_2_train.csv").image_id.nunique()
    with pytest.raises(PreprocessError, match=rf"stage_2_train.csv: {labelled - len(copied)} of {labelled} labelled "
                                              rf"images have no DICOM in .*, more than preprocess.max_bad_fraction="
                                              r"0.01; is the download or unzip complete\?$"):
        run_preprocess(_cfg(root, "preprocess.size=32"), progress=False)
    assert not (root / "processed").exists()  # refused before any work
    # within the limit: counted, said, and the run goes on
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "01_preprocess.py"), f"data.root={root}",
                          "preprocess.size=32", "preprocess.n_folds=2", "preprocess.max_bad_fraction=0.9",
                          "data.workers=1"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert (f"warning: {labelled - len(copied)} labelled images have no DICOM file (within "
            "preprocess.max_bad_fraction=0.9); they are left out") in res.stdout
    header_only = tmp_path / "labels.csv"
    header_only.write_text("ID,Label\n")
    with pytest.raises(InputError, match=f"^{re.escape(str(header_only))}: has no rows, only its header$"):
        read_long_csv(header_only)  # was: "IDs must be ... e.g. []"


def test_a_killed_writer_s_temporary_files_and_staging_folders_are_removed_by_the_next_run(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    folder = tmp_path / "embeddings" / "epoch00"
    folder.mkdir(parents=True)
    stale = folder / f".oof_emb.npy.{dead}.abcd1234.tmp.npy"
    live = folder / f".oof_emb.npy.{alive}.efgh5678.tmp.npy"
    old_style = folder / ".oof_logits.npy.ijkl9012.tmp.npy"
    for p in (stale, live, old_style):
        p.write_bytes(b"partial")
    assert sweep_temp_files(folder) == 2
    assert not stale.exists() and not old_style.exists() and live.exists()  # a live writer's file stays
    staging = tmp_path / f".bundle.{dead}.mnop3456.tmp"
    (staging / "cnn").mkdir(parents=True)
    (staging / ichio.OUTPUT_MARKER).write_text('{"written_by": "ichpipe", "complete": false}')  # a staging folder
    other = tmp_path / f".bundle.{alive}.qrst7890.tmp"
    other.mkdir()
    with atomic_dir(tmp_path / "bundle") as tmp:
        assert f".bundle.{os.getpid()}." in tmp.name
        (tmp / "x").write_text("1")
    assert not staging.exists() and other.exists() and (tmp_path / "bundle" / "x").read_text() == "1"
    with atomic_path(tmp_path / "y.txt") as tmp:
        assert tmp.name.startswith(f".y.txt.{os.getpid()}.") and ichio._writer_alive(tmp.name)


def test_scripts_and_the_makefile_share_one_default_config(capsys):
    makefile = (REPO / "Makefile").read_text()
    (default,) = re.findall(r"^CONFIG\s*\?=\s*(\S+)$", makefile, flags=re.M)
    assert REPO / default == STAGE_CONFIG
    seen = {}
    assert stage_main("", lambda cfg, args: seen.update(cfg=cfg), argv=[]) == 0  # as `python scripts/x.py`
    assert seen["cfg"] == load_config(STAGE_CONFIG)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "04_lstm_train.py"), "--help"], capture_output=True,
                         text=True, cwd=REPO)
    assert "default: configs/demo/cpu_small.yaml" in " ".join(res.stdout.split())
