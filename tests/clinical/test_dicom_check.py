"""make dicom-check's parts that run without the validators: reading a validator's verdict, refusing when one is
missing, the all-air series it predicts on."""

from __future__ import annotations

import stat

import numpy as np
import pydicom
import pytest

from ichpipe.base.errors import InputError
from ichpipe.clinical import dicom_check as D
from ichpipe.imaging.dicom import hounsfield
from ichpipe.imaging.head import cranial_interior


def _tool(tmp_path, name, text, status=0):
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{text}\nEND\nexit {status}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return [str(path)]


def test_a_validators_errors_and_warnings_are_read_from_its_output(tmp_path):
    f = tmp_path / "sr.dcm"
    f.write_bytes(b"")
    out = "Comprehensive3DSR\nError - Missing attribute Type 2C Conditional Element=<Laterality>\nWarning - dubious"
    check = D.run_check("dciodvfy", _tool(tmp_path, "dciodvfy", out, status=1), f, tmp_path / "o.txt")
    assert check.errors == ["Error - Missing attribute Type 2C Conditional Element=<Laterality>"]
    assert check.warnings == ["Warning - dubious"] and (tmp_path / "o.txt").read_text().startswith("Comprehensive")
    bad = D.run_check("dsrdump", _tool(tmp_path, "dsrdump", "E: Invalid Value\nF: dsrdump: error", status=1), f,
                      tmp_path / "d.txt")
    assert bad.errors == ["E: Invalid Value", "F: dsrdump: error"]
    silent = D.run_check("pixelmed", _tool(tmp_path, "java", "", status=3), f, tmp_path / "p.txt")
    assert silent.errors == ["pixelmed exited with status 3"]  # a crash is no pass


def test_dicom_check_refuses_without_its_validators(tmp_path, monkeypatch):
    from ichpipe.stages.predict import dicom_check

    monkeypatch.setattr(D, "tools", lambda repo: {"dciodvfy": ["x"], "dsrdump": None, "pixelmed": None})
    with pytest.raises(InputError, match=r"validator\(s\) not installed: dsrdump, pixelmed \(apt-get install"):
        dicom_check(tmp_path, tmp_path / "bundle", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_all_air_series(tmp_path):
    folder = D.air_series(tmp_path / "air", slices=3)
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 3
    series = {pydicom.dcmread(f).SeriesInstanceUID for f in files}
    assert len(series) == 1
    for f in files:
        ds = pydicom.dcmread(f)
        hu = hounsfield(ds.pixel_array, ds)
        assert np.all(hu == -1000) and cranial_interior(hu, None).brain_mm2 == 0
