"""Run a model bundle on new CT studies: ``python -m ichpipe predict PATH --bundle B --out DIR``.

PATH is a folder (searched recursively) or a zip of DICOM files of one or many studies. Files are
grouped by StudyInstanceUID/SeriesInstanceUID; a series is kept when it is CT, not a localiser or
scout, axial (tilted gantries included) and has at least ``min_slices`` slices; anything else is
skipped with a one-line reason, and unreadable files are listed and skipped. Slices are ordered by
ImagePositionPatient along the slice normal. Each kept series goes through exactly the code of the
pipeline (stage 1's DICOM reading and windowing, the loader's resize/crop, stage 3's TTA, stage 4's
sequence model, stage 5's blend), in memory. Writes, into DIR (all at once: nothing half-written)::

    slices.csv     one row per slice: ids, z, the six probabilities, a 0/1 flag per class at the
                   bundle's operating threshold
    series.csv     one row per series: slices (and how many share their position with another); ``assessable``
                   (0 for a series that is not a head CT, ``not_assessable`` saying why: body part, or no skull
                   enclosing a brain-sized interior; such a series has no probabilities, slices.csv rows or
                   figure); per class the highest slice probability ``max_<class>``, the calibrated probability
                   that the series shows it ``series_<class>`` (a subtype's capped at any's), the number of
                   flagged slices, and the finding ``finding_<class>``: present (at the bundle's rule-in point,
                   specific out of fold), absent (below the flagging point), indeterminate (in between), or not
                   assessable (ichpipe.clinical.findings)
    skipped.csv    file or series, reason: what was left out and why
    series_<n>.png per assessable series: the flagged slices (at most 6, the most probable; or the three
                   most suspicious) with a Grad-CAM heatmap of the CNNs on one colour scale, and the six
                   probabilities along z with the flagging points
    series_<n>.dcm with ``--dicom-sc``: that figure as a DICOM Secondary Capture in the series' study
                   (highdicom), which a PACS viewer opens beside the CT
    sr_<n>.dcm     with ``--dicom-sr``: the series' findings as a DICOM Structured Report (Comprehensive 3D SR,
                   TID 1500; ichpipe.clinical.structured_report) in the series' study, which viewers and PACS read

The study is read by ichpipe.clinical.studies and run by ichpipe.clinical.predictor (for any stage that runs a
bundle); this module writes the outputs: the tables, the figures, the DICOM Secondary Captures and Structured
Reports, a submission.

This is a research tool, not a medical device: its output must not be used for diagnosis.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from pydicom.dataset import Dataset
from tqdm import tqdm

from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_dir, check_output_dir
from ichpipe.base.labels import LABELS
from ichpipe.clinical.predictor import Predictor, run_series
from ichpipe.clinical.series_figure import series_figure
from ichpipe.clinical.studies import find_series
from ichpipe.imaging.dicom import as_valid_uid, read_dataset, with_valid_uids
from ichpipe.networks.bundle_format import Bundle, load_bundle
from ichpipe.scoring.submission import write_checked


def write_secondary_capture(figure: Path, ref: Dataset, shown: list[Dataset], out: Path, series_number: int) -> None:
    """The series figure as a DICOM Secondary Capture in the original study of ``ref`` (a slice's header; highdicom),
    for a PACS viewer: its source images the slices it shows (``shown``: their headers), its text burned in, UIDs
    valid (``as_valid_uid``)."""
    import copy

    import cv2
    import highdicom as hd

    img = cv2.cvtColor(cv2.imread(str(figure)), cv2.COLOR_BGR2RGB)
    ref_ds = with_valid_uids(copy.deepcopy(ref))
    with warnings.catch_warnings():  # highdicom's remarks on the source study's own names are not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref_ds, pixel_array=img, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=hd.UID(),
            series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ichpipe")
    sc.SeriesDescription = "ichpipe ICH probabilities - research only, not for diagnosis"  # LO: <= 64 chars
    # an assessable series is a head (ichpipe.imaging.head): said, so that Laterality (type 2C, for paired body parts
    # only) is rightly absent
    sc.BodyPartExamined = "HEAD"
    sc.BurnedInAnnotation = "YES"  # the figure's titles, the study's UIDs among them
    sources = []
    for ds in shown:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = as_valid_uid(ds.SOPInstanceUID)
        sources.append(item)
    sc.SourceImageSequence = sources
    sc.save_as(out)


@dataclass(frozen=True)
class PredictResult:
    series: int  # predicted
    slices: int
    skipped: list[dict[str, str]]  # skipped.csv's rows: what (a file or a series), reason
    out: Path
    warnings: list[str]  # what was used but looks wrong (slices of one series at one position)
    seconds: float


@dataclass(frozen=True)
class KaggleResult:
    prediction: PredictResult
    file: Path  # the validated submission
    filled: int  # test images without a prediction, given the bundle's prior


def predict(path: str | os.PathLike, bundle_path: str | os.PathLike | Bundle, out: str | os.PathLike,
            min_slices: int = 1, figures: bool = True, progress: bool = True, device: torch.device | None = None,
            dicom_sc: bool = False, dicom_sr: bool = False) -> PredictResult:
    """Predict every usable series under ``path`` with the bundle; write the outputs into ``out`` at once.

    ``dicom_sc``: also each series' figure as a DICOM Secondary Capture (``series_<n>.dcm``) in its study.
    ``dicom_sr``: also each series' findings as a DICOM Structured Report (``sr_<n>.dcm``) in its study.
    """
    start = time.perf_counter()
    out = Path(out)
    # --out is replaced as a whole: never the study, a folder holding it or the bundle, nor a folder of the user's
    inputs = [path] if isinstance(bundle_path, Bundle) else [path, bundle_path]
    check_output_dir(out, inputs, "predict --out")
    with contextlib.ExitStack() as stack:
        bundle = bundle_path if isinstance(bundle_path, Bundle) else stack.enter_context(load_bundle(bundle_path))
        return _predict(path, bundle, out, inputs, min_slices, figures, progress, device, dicom_sc, dicom_sr, start)


def _predict(path, bundle: Bundle, out: Path, inputs: list, min_slices: int, figures: bool, progress: bool,
             device: torch.device | None, dicom_sc: bool, dicom_sr: bool, start: float) -> PredictResult:
    with tempfile.TemporaryDirectory(prefix="ichpipe_predict_") as work:
        series, skipped = find_series(path, Path(work), min_slices)
        if not series:
            reasons = "; ".join(f"{s['what']}: {s['reason']}" for s in skipped[:3]) or "no files"
            raise InputError(f"{path}: no usable CT series ({reasons})")
        predictor = Predictor(bundle, device)
        with atomic_dir(out, inputs, "predict --out") as tmp:
            slice_rows, series_rows = [], []
            for n, s in enumerate(tqdm(series, desc="predict", unit="series", disable=not progress)):
                result = run_series(predictor, s, skipped)
                if result is None:
                    continue
                draw = result.assessable and (figures or dicom_sc)  # a series that is no head CT gets no figure
                result.row["figure"] = f"series_{n}.png" if draw and figures else ""
                slice_rows += result.slices
                series_rows.append(result.row)
                headers = [read_dataset(f) for f in s.files] if dicom_sc or dicom_sr else []  # read once for both
                if draw:
                    shown = series_figure(tmp / f"series_{n}.png", s, result, predictor)
                if draw and dicom_sc:
                    write_secondary_capture(tmp / f"series_{n}.png", headers[0], [headers[i] for i in shown],
                                            tmp / f"series_{n}.dcm", 900 + n)
                if draw and not figures:
                    (tmp / f"series_{n}.png").unlink()
                if dicom_sr:
                    from ichpipe.clinical.structured_report import structured_report  # highdicom: only when asked for

                    report = structured_report(headers, pd.DataFrame(result.slices), result.row, bundle, 800 + n)
                    report.save_as(tmp / f"sr_{n}.dcm")
            pd.DataFrame(slice_rows).to_csv(tmp / "slices.csv", index=False)
            pd.DataFrame(series_rows).to_csv(tmp / "series.csv", index=False)
            pd.DataFrame(skipped, columns=["what", "reason"]).to_csv(tmp / "skipped.csv", index=False)
    warnings_ = [f"series {r['SeriesInstanceUID']}: {r['same_position_slices']} slices share their position with "
                 f"another slice (kept; a duplicate, or two series under one UID?)"
                 for r in series_rows if r["same_position_slices"]]
    return PredictResult(len(series_rows), len(slice_rows), skipped, out, warnings_, time.perf_counter() - start)


def predict_kaggle(data_dir: str | os.PathLike, bundle_path: str | os.PathLike, out_file: str | os.PathLike,
                   max_missing: float = 0.01, progress: bool = True) -> KaggleResult:
    """A submission for the competition's test set (``stage_2_test/``) from the bundle alone, validated."""
    from ichpipe.base.label_csv import read_long_csv
    from ichpipe.base.paths import DataPaths

    paths = DataPaths(data_dir)
    if not paths.sample_submission_csv.exists():
        raise InputError(f"{paths.sample_submission_csv}: not found; it lists the test images to predict")
    with load_bundle(bundle_path) as bundle, tempfile.TemporaryDirectory(prefix="ichpipe_kaggle_") as tmp:
        result = predict(paths.test_dir, bundle, Path(tmp) / "out", figures=False, progress=progress)
        slices = pd.read_csv(Path(tmp) / "out" / "slices.csv").set_index("SOPInstanceUID")[list(LABELS)]
        prior = bundle.info.prior
    sample_ids = pd.Index(read_long_csv(paths.sample_submission_csv).image_id.unique(), name="image_id")
    pred = slices.reindex(sample_ids)
    missing = ~sample_ids.isin(slices.index)
    if missing.sum() > max_missing * len(sample_ids):
        raise InputError(f"{paths.test_dir}: {int(missing.sum())} of {len(sample_ids)} test images have no "
                         f"prediction, more than {max_missing}; see the skipped files")
    pred.loc[missing] = prior
    out_file = Path(out_file)
    write_checked(pred, out_file, paths.sample_submission_csv, {"bundle": str(bundle_path),
                                                                "filled": int(missing.sum()),
                                                                   "model": "bundle"})
    return KaggleResult(result, out_file, int(missing.sum()))


@dataclass(frozen=True)
class DicomCheckResult:
    checks: list  # ichpipe.clinical.dicom_check.Check: one validator on one file
    cases: dict[str, str]  # name -> what the study is
    out: Path  # the check's folder: inputs/, a predict output folder per case, summary.md

    @property
    def errors(self) -> int:
        return sum(len(c.errors) for c in self.checks)


def dicom_check(data_root: str | os.PathLike, bundle_path: str | os.PathLike, out: str | os.PathLike,
                repo: Path) -> DicomCheckResult:
    """``make dicom-check``: predict (``--dicom-sr --dicom-sc``) on a synthetic negative and positive study, real
    CQ500 slices, CT_small (no head) and an all-air series, and every SR and Secondary Capture through the three
    validators of ichpipe.clinical.dicom_check; all written into ``out`` at once, with ``summary.md``."""
    from ichpipe.clinical.dicom_check import Check, run_check, tools, write_inputs

    out, data_root = Path(out), Path(data_root)
    commands = tools(repo)
    missing = [t for t, c in commands.items() if c is None]
    if missing:
        raise InputError(f"validator(s) not installed: {', '.join(missing)} (apt-get install dicom3tools dcmtk "
                         f"libpixelmed-java; or `make dicom-tools` for dciodvfy alone)")
    check_output_dir(out, [data_root, bundle_path], "dicom-check --out")
    checks, lines = [], []
    with load_bundle(bundle_path) as bundle, atomic_dir(out, [data_root, bundle_path], "dicom-check --out") as tmp:
        cases = write_inputs(data_root, tmp / "inputs")
        for name, (study, what) in cases.items():
            with warnings.catch_warnings():  # the synthetic set's ID_<hex> UIDs, mapped in what predict writes
                warnings.filterwarnings("ignore", message="Invalid value for VR UI")
                predict(study, bundle, tmp / name, progress=False, dicom_sc=True, dicom_sr=True)
            series = pd.read_csv(tmp / name / "series.csv")
            found = "; ".join("not assessable" if not r.assessable else ", ".join(
                f"{c} {r[f'finding_{c}']}" for c in LABELS) for _, r in series.iterrows())
            for f in sorted((tmp / name).glob("*.dcm")):
                for tool, command in commands.items():
                    if tool == "dciodvfy" or f.name.startswith("sr_"):
                        checks.append(run_check(tool, command, f, f.with_name(f"{f.stem}.{tool}.txt")))
            mine = [c for c in checks if c.file.parent.name == name]
            counts = [(sum(len(c.errors) for c in mine if c.tool == t),
                       sum(len(c.warnings) for c in mine if c.tool == t)) for t in commands]
            lines.append(f"| {name} | {what} | {found} | " + " | ".join(f"{e} / {w}" for e, w in counts) + " |")
        head = ["# DICOM check of predict's outputs", "",
                f"Bundle {bundle.info.experiment} (sha256 {bundle.digest[:12]}...). Per case: what predict found per "
                "series, and each validator's errors / warnings over its files (dciodvfy: every SR and Secondary "
                "Capture; dsrdump and PixelMed: every SR). Each tool's full output is beside the file it read.", "",
                "| case | study | findings | " + " | ".join(commands) + " |", "|---|---|---|" + "---|" * len(commands)]
        warned: dict[str, int] = {}
        for c in checks:
            for w in c.warnings:
                key = f"{c.tool}: {re.sub(r'<[^>]*>', '<...>', w)}"
                warned[key] = warned.get(key, 0) + 1
        tail = ["", "Warnings (each distinct line, values elided, and how often):", "",
                *[f"- {w} ({n}x)" for w, n in sorted(warned.items())]]
        errors = [f"- {c.tool} on {c.file.parent.name}/{c.file.name}: {e}" for c in checks for e in c.errors]
        tail += ["", "Errors:", "", *(errors or ["None."])]
        (tmp / "summary.md").write_text("\n".join(head + lines + tail) + "\n")
    checks = [Check(c.tool, out / c.file.relative_to(tmp), c.errors, c.warnings, out / c.output.relative_to(tmp))
              for c in checks]
    return DicomCheckResult(checks, {n: w for n, (_, w) in cases.items()}, out)
