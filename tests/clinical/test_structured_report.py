"""predict --dicom-sr: a series' findings as a DICOM Comprehensive 3D SR (TID 1500) that reads back equal to the
tables it came from, and validates with dciodvfy, DCMTK's dsrdump and PixelMed's SR validator where they are installed
(Debian's dicom3tools, dcmtk and libpixelmed-java; not in CI: `make dicom-check` runs them on predict's outputs)."""

from __future__ import annotations

import types
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichpipe.base.labels import LABELS
from ichpipe.clinical.dicom_check import run_check, tools
from ichpipe.clinical.structured_report import FINDINGS, read_findings, structured_report
from ichpipe.networks.bundle_format import OperatingThreshold

REPO = Path(__file__).resolve().parents[2]


OP = OperatingThreshold(threshold=0.3, recall=0.95, series_sensitivity=0.97, series_specificity=0.40, rule_in=0.6,
                        rule_in_sensitivity=0.80, rule_in_specificity=0.95, series=200, positive_series=60)


def _series(tops=None):
    """Two slices of a CQ500 head CT (pydicom's test files) as one series, with made-up probabilities: per class its
    highest slice probability ``tops`` (default: any and subdural 0.61, past the rule-in point 0.6 on the first
    slice; intraventricular 0.35, flagged at 0.3 but not ruled in; the rest 0.11, absent)."""
    tops = tops or {"any": 0.61, "subdural": 0.61, "intraventricular": 0.35}
    sources = [pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True) for n in ("693_UNCR.dcm", "693_J2KI.dcm")]
    sources[1].SeriesInstanceUID = sources[0].SeriesInstanceUID
    rows = []
    for i, ds in enumerate(sources):
        row = {"SOPInstanceUID": str(ds.SOPInstanceUID)}
        for name in LABELS:
            row[name] = tops.get(name, 0.11) - 0.01 * i
            row[f"flag_{name}"] = int(row[name] >= OP.threshold)
        rows.append(row)
    series_row = {**{f"max_{n}": tops.get(n, 0.11) for n in LABELS},
                  **{f"series_{n}": 0.7 if n in tops else 0.05 for n in LABELS}}
    info = types.SimpleNamespace(experiment="demo", git={"commit": "abc123", "dirty": False},
                                 thresholds=dict.fromkeys(LABELS, OP))
    return sources, pd.DataFrame(rows), series_row, types.SimpleNamespace(info=info, digest="ab" * 32)


def test_the_report_reads_back_as_written(tmp_path):
    sources, slices, series_row, bundle = _series()
    path = tmp_path / "sr.dcm"
    structured_report(sources, slices, series_row, bundle, 801).save_as(path)
    findings = read_findings(path)
    first, second = str(sources[0].SOPInstanceUID), str(sources[1].SOPInstanceUID)
    assert findings["subdural"]["finding"] == "present" and findings["subdural"]["probability"] == 0.7
    assert findings["subdural"]["slices"] == {first: pytest.approx(0.61), second: pytest.approx(0.60)}
    assert "0.6100 at or above the rule-in point 0.6000 (OOF series specificity 0.95" in findings["subdural"]["why"]
    # flagged at the flagging point (specificity 0.40 out of fold) but below the rule-in point: not called present
    assert findings["intraventricular"]["finding"] == "indeterminate"
    assert "too unspecific to call a finding" in findings["intraventricular"]["why"]
    for name in ("epidural", "intraparenchymal", "subarachnoid"):
        assert findings[name]["finding"] == "absent" and findings[name]["slices"] == {}
        assert findings[name]["probability"] == 0.05 and "sensitivity 0.97" in findings[name]["why"]
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    for key in ("PatientID", "StudyInstanceUID", "PatientName"):  # patient and study from the source series
        assert sr[key].value == sources[0][key].value
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID and sr.SOPInstanceUID != sources[0].SOPInstanceUID
    assert "not for diagnosis" in sr.SeriesDescription and sr.DeidentificationMethod  # CQ500 is de-identified
    texts, names = set(), set()  # every TEXT item in the content tree, every concept name
    sr.walk(lambda ds, elem: texts.add(elem.value) if elem.keyword == "TextValue" else None)
    sr.walk(lambda ds, elem: names.add((ds.CodeValue, ds.CodeMeaning)) if elem.keyword == "CodeMeaning" else None)
    # the algorithm, identified: name, version, the bundle's sha256, its operating points; the intended use
    assert {"ichpipe demo", "abc123", f"bundle sha256 {'ab' * 32}", "flagging point 0.3000",
            "rule-in point 0.6000", "Research use only, not for diagnosis."} <= texts
    assert not any("threshold" in t for t in texts if t.startswith("ichpipe "))  # tracking identifiers: names only
    # the series' calibrated probability and the slices' uncalibrated scores are named apart
    assert {("122157", "Probability"), ("246262008", "Score")} <= names
    assert FINDINGS["any"].value == "1386000" and FINDINGS["subarachnoid"].value == "21454007"  # SNOMED CT
    assert ("25045-6", "CT unspecified body region") in names  # procedure reported: a code of CID 100


def test_a_subtype_is_not_present_without_any():
    from ichpipe.clinical.findings import series_findings

    _, _, row, bundle = _series({"any": 0.45, "subdural": 0.9})
    found = series_findings(row, bundle.info.thresholds)
    assert found["any"].state == "indeterminate"
    assert found["subdural"].state == "indeterminate" and "but intracranial hemorrhage (any) is indeterminate" in \
        found["subdural"].why


def test_a_series_that_is_not_a_head_reports_no_finding(tmp_path):
    sources, _, _, bundle = _series()
    row = {"not_assessable": "BodyPartExamined CHEST, not a head"}
    path = tmp_path / "sr.dcm"
    structured_report(sources, pd.DataFrame(), row, bundle, 801).save_as(path)
    findings = read_findings(path)
    for name in LABELS:
        assert findings[name] == {"finding": "not assessable", "why": "not assessable: BodyPartExamined CHEST, not a "
                                  "head", "probability": None, "slices": {}}
    sr = pydicom.dcmread(path)
    names = set()
    sr.walk(lambda ds, elem: names.add(ds.CodeValue) if elem.keyword == "CodeMeaning" else None)
    assert "126010" not in names and "373121007" in names  # no Imaging Measurements; each class Not Evaluated


def test_invalid_source_uids_are_mapped_to_valid_ones(tmp_path):
    """The competition's UIDs are ID_<hex>: the SR refers to them by valid UIDs that stand for them, always the same."""
    from ichpipe.imaging.dicom import as_valid_uid

    sources, slices, row, bundle = _series()
    sources[0].StudyInstanceUID = sources[1].StudyInstanceUID = "ID_5e1cc3b5d1"
    sources[0].SOPInstanceUID, sources[1].SOPInstanceUID = "ID_0a1b2c", "ID_0a1b2d"
    slices["SOPInstanceUID"] = ["ID_0a1b2c", "ID_0a1b2d"]
    path = tmp_path / "sr.dcm"
    structured_report(sources, slices, row, bundle, 801).save_as(path)
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == as_valid_uid("ID_5e1cc3b5d1") and sr.StudyInstanceUID.startswith("2.25.")
    assert as_valid_uid("ID_5e1cc3b5d1") == as_valid_uid("ID_5e1cc3b5d1") != as_valid_uid("ID_5e1cc3b5d2")
    uids = set()
    sr.walk(lambda ds, elem: uids.add(str(elem.value)) if elem.VR == "UI" else None)
    assert not [u for u in uids if u.startswith("ID_")]
    assert set(read_findings(path)["subdural"]["slices"]) == {as_valid_uid("ID_0a1b2c"), as_valid_uid("ID_0a1b2d")}


AVAILABLE = {tool: command for tool, command in tools(REPO).items() if command}


@pytest.mark.skipif(not AVAILABLE, reason="no DICOM validator installed (apt-get install dicom3tools dcmtk "
                                          "libpixelmed-java, or make dicom-tools)")
@pytest.mark.parametrize("kind", ["findings", "not assessable"])
def test_the_report_validates(tmp_path, kind):
    """Each installed validator (dciodvfy, dsrdump, PixelMed's SR validator) reports no error."""
    sources, slices, series_row, bundle = _series()
    if kind == "not assessable":
        slices, series_row = pd.DataFrame(), {"not_assessable": "BodyPartExamined CHEST, not a head"}
    path = tmp_path / "sr.dcm"
    structured_report(sources, slices, series_row, bundle, 801).save_as(path)
    for tool, command in AVAILABLE.items():
        check = run_check(tool, command, path, tmp_path / f"{tool}.txt")
        assert not check.errors, (tool, check.errors)
        if tool == "pixelmed":
            assert "Found Root Template TID_1500" in (tmp_path / f"{tool}.txt").read_text()
            assert not [w for w in check.warnings if "not in template" in w]
