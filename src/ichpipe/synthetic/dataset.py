"""Write a synthetic dataset in the RSNA competition's exact layout.

    <root>/stage_2_train/ID_<hex>.dcm        one axial CT slice per file, names in no slice order
    <root>/stage_2_test/ID_<hex>.dcm
    <root>/stage_2_train.csv                  ID_<hex>_<label>,0|1 (six rows per image, a few duplicated)
    <root>/stage_2_sample_submission.csv      every test row, Label 0.5
    <root>/synthetic_test_labels.csv          synthetic only: the test set's answer key (ID,Label)
    <root>/synthetic_slices.csv               synthetic only: one row per file with its geometry and quirks
    <root>/synthetic_example_study.zip        synthetic only: one test study's DICOMs, for `predict`

The whole plan (patients, studies, bleeds, quirks) is drawn from one seeded generator in the main
process; each series is then rendered and written by a worker from its own seed, so the bytes of
every file depend on the seed alone, not on the number of workers.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ichpipe.base.config import SyntheticConfig
from ichpipe.base.files import atomic_path
from ichpipe.base.label_csv import wide_to_long
from ichpipe.base.labels import LABELS, SUBTYPES
from ichpipe.base.parallel import n_workers, run_pool
from ichpipe.base.paths import DataPaths, png_path
from ichpipe.imaging.dicom import slice_position
from ichpipe.imaging.png import write_mask
from ichpipe.synthetic.anatomy import Patient, sample_patient
from ichpipe.synthetic.bleeds import Bleed, sample_bleed
from ichpipe.synthetic.geometry import SliceGeometry
from ichpipe.synthetic.phantom import render_slice
from ichpipe.synthetic.realism import shortcut_score, slice_measures

_ID_BITS = {"image": 36, "patient": 32, "study": 40, "series": 40}  # 9, 8, 10, 10 hex digits as Kaggle's
_ID_SALT = {"image": 0x9E3779B1, "patient": 0x85EBCA77, "study": 0xC2B2AE3D, "series": 0x27D4EB2F}


def synthetic_id(kind: str, key: int, seed: int) -> str:
    """``ID_<hex>`` from a bijective mix of ``key``: distinct keys never collide, and look random."""
    bits = _ID_BITS[kind]
    mask = (1 << bits) - 1
    x = (key * 0x5851F42D + _ID_SALT[kind] + seed * 0x2545F491) & mask
    for mult in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9):  # odd multipliers and xorshifts are bijections
        x = (x * (mult & mask | 1)) & mask
        x ^= x >> (bits // 2)
    return f"ID_{x:0{bits // 4}x}"


@dataclass
class SeriesSpec:
    """Everything a worker needs to render and write one series (picklable)."""

    patient_index: int
    study_index: int
    split: str  # "train" or "test"
    patient: Patient
    bleeds: list[Bleed]
    n_slices: int
    z_start: float  # head-frame height of the first slice (mm)
    spacing: float  # mm between slices
    size: int
    pixel_mm: float
    center_px: tuple[float, float]
    angle: float
    noise_hu: float
    storage: str  # "int16" | "uint12" | "quirk12"
    multivalue_window: bool
    fov_padding: bool
    tilt: float = 0.0  # gantry tilt (radians)
    thickness: float = 5.0  # mm
    motion_slices: list[int] = field(default_factory=list)  # slices with patient motion
    truncate_slices: list[int] = field(default_factory=list)
    seed: int = 0
    dataset_seed: int = 0

    @property
    def key(self) -> int:
        return self.patient_index * 8 + self.study_index


def plan_dataset(cfg: SyntheticConfig) -> list[SeriesSpec]:
    """Draw every patient, study, bleed and quirk from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    n_test = int(round(cfg.n_patients * cfg.test_fraction))
    test_patients = set(rng.choice(cfg.n_patients, size=n_test, replace=False).tolist())
    specs: list[SeriesSpec] = []
    for p in range(cfg.n_patients):
        patient = sample_patient(rng, cfg.anatomy)
        control = rng.random() < cfg.control_rate
        n_studies = 2 if rng.random() < cfg.second_study_rate else 1
        for s in range(n_studies):
            bleeds = []
            if not control:
                for sub in SUBTYPES:
                    if rng.random() < cfg.bleed_rates.get(sub, 0.0):
                        bleeds.append(sample_bleed(rng, sub, patient, faint=rng.random() < cfg.faint_rate))
            n = int(rng.integers(cfg.slices_min, cfg.slices_max + 1))
            c = patient.semi_axes[2]
            z0, z1 = -rng.uniform(0.8, 0.9) * c, rng.uniform(0.88, 0.97) * c
            size = int(rng.choice([640, 768])) if rng.random() < cfg.rate_non512 else cfg.size
            quirk12 = rng.random() < cfg.rate_12bit_quirk
            padding = not quirk12 and rng.random() < cfg.rate_fov_padding
            storage = "quirk12" if quirk12 else ("int16" if padding or rng.random() < 0.5 else "uint12")
            fov_mm = rng.uniform(220, 250)
            spacing = (z1 - z0) / (n - 1)
            motion: list[int] = []
            if rng.random() < cfg.rate_motion:  # a run of a few slices where the head moved
                first = int(rng.integers(n))
                motion = list(range(first, min(n, first + int(rng.integers(1, 5)))))
            specs.append(SeriesSpec(
                patient_index=p, study_index=s, split="test" if p in test_patients else "train",
                patient=patient, bleeds=bleeds, n_slices=n, z_start=z0, spacing=spacing,
                size=size, pixel_mm=fov_mm / size,
                center_px=(size / 2 + rng.normal(0, 0.04 * size), size / 2 + rng.normal(0, 0.04 * size)),
                angle=rng.normal(0, 0.12), noise_hu=rng.uniform(3.5, 7.0), storage=storage,
                multivalue_window=bool(rng.random() < cfg.rate_multivalue_window), fov_padding=padding,
                tilt=float(np.radians(rng.uniform(8, 25))) if rng.random() < cfg.rate_gantry_tilt else 0.0,
                thickness=float(np.clip(spacing, 2.5, 5.0)), motion_slices=motion,
                seed=int(rng.integers(2**31)), dataset_seed=cfg.seed,
            ))
    train = [sp for sp in specs if sp.split == "train"]
    for i in rng.choice(len(train), size=min(cfg.n_truncated, len(train)), replace=False):
        train[i].truncate_slices = [int(rng.integers(train[i].n_slices))]
    return specs


# Pixel storage styles: (PixelRepresentation, BitsStored, RescaleIntercept).
_STORAGE = {"int16": (1, 16, -1024.0), "uint12": (0, 12, -1024.0), "quirk12": (0, 12, 0.0)}


def encode_pixels(hu: np.ndarray, storage: str) -> np.ndarray:
    """Stored pixel values whose modality LUT (or, for ``quirk12``, the known fix) gives back ``hu``."""
    hu = np.rint(hu)
    if storage == "int16":
        return np.clip(hu + 1024, -32768, 32767).astype(np.int16)
    if storage == "uint12":
        return np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    if storage == "quirk12":  # the real data's broken files: HU wrapped into 12 bits, intercept 0
        return (np.clip(hu, -1000, 3095).astype(np.int32) % 4096).astype(np.uint16)
    raise ValueError(f"unknown storage {storage!r}")


def make_dicom(pixels: np.ndarray, spec: SeriesSpec, ids: dict[str, str], z_patient: float) -> Dataset:
    """A CT Image Storage dataset carrying the tags of the competition's files.

    ``z_patient`` is the slice's position along its normal (for an axial series, ImagePositionPatient's z).

    The UIDs are Kaggle's ``ID_<hex>`` strings, not valid DICOM UIDs, exactly as in the real files,
    so value validation is off while they are set; ``save_as`` writes them unchecked.
    """
    with pydicom.config.disable_value_validation():
        return _make_dicom(pixels, spec, ids, z_patient)


def save_dicom(ds: Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as a DICOM file (preamble and file meta) without re-validating the ``ID_`` UIDs."""
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)


def _make_dicom(pixels: np.ndarray, spec: SeriesSpec, ids: dict[str, str], z_patient: float) -> Dataset:
    pixel_rep, bits_stored, intercept = _STORAGE[spec.storage]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ids["image"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ids["image"]
    ds.Modality = "CT"
    ds.PatientID = ids["patient"]
    ds.StudyInstanceUID = ids["study"]
    ds.SeriesInstanceUID = ids["series"]
    ds.StudyID = ""
    half = spec.size * spec.pixel_mm / 2
    ct, st = np.cos(spec.tilt), np.sin(spec.tilt)
    # top-left pixel: in-plane (-half, -half) on the tilted plane whose distance along the normal
    # (0, sin, cos) is z_patient
    digits = 6 if spec.tilt else 4  # tilted: enough digits that the projection on the normal is z to 1e-5
    ds.ImagePositionPatient = [f"{-half:.4f}", f"{-half * ct + z_patient * st:.{digits}f}",
                               f"{half * st + z_patient * ct:.{digits}f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", f"{ct:.6f}", f"{-st:.6f}"] if spec.tilt else ["1", "0", "0", "0",
                                                                                                    "1", "0"]
    ds.SliceThickness = f"{spec.thickness:.2f}"
    if spec.tilt:
        ds.GantryDetectorTilt = f"{np.degrees(spec.tilt):.1f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{spec.pixel_mm:.6g}", f"{spec.pixel_mm:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_rep
    if spec.multivalue_window:
        ds.WindowCenter, ds.WindowWidth = ["40", "600"], ["80", "2800"]
    else:
        ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.PixelData = pixels.tobytes()
    return ds


def _write_series(spec: SeriesSpec, train_dir: str, test_dir: str, min_area_mm2: float, masks_dir: str) -> list[dict]:
    """Render and write every slice of one series (and the masks of its slices with blood); return one metadata
    row per file."""
    rng = np.random.default_rng(spec.seed)
    out_dir = Path(train_dir if spec.split == "train" else test_dir)
    seed = spec.dataset_seed
    ids = {"patient": synthetic_id("patient", spec.patient_index, seed),
           "study": synthetic_id("study", spec.key, seed), "series": synthetic_id("series", spec.key, seed)}
    table_z = rng.uniform(-200, 100)  # the head's height in the scanner's frame
    rows = []
    min_px = min_area_mm2 / spec.pixel_mm**2
    for i in range(spec.n_slices):
        z = spec.z_start + i * spec.spacing
        geo = SliceGeometry(spec.size, spec.pixel_mm, spec.center_px, spec.angle, z, tilt=spec.tilt,
                            thickness=spec.thickness, motion=0.25 if i in spec.motion_slices else 0.0)
        hu, _, masks = render_slice(spec.patient, spec.bleeds, geo, rng, spec.noise_hu, spec.fov_padding)
        labels = {sub: int(sub in masks and masks[sub].sum() >= min_px) for sub in SUBTYPES}
        hu = np.rint(hu)  # what the file stores: the measures see what a reader of the DICOM sees
        measures = {"shortcut_score": shortcut_score(hu)}
        if i == spec.n_slices // 2 + spec.n_slices // 8:  # a mid-series slice (lateral ventricles' level)
            blood = np.logical_or.reduce(list(masks.values())) if masks else None
            measures.update(slice_measures(hu, spec.pixel_mm, blood))
        labels["any"] = int(any(labels.values()))
        image_id = synthetic_id("image", spec.key * 256 + i, seed)
        if labels["any"]:
            write_mask(png_path(Path(masks_dir), image_id), masks, labels)
        ds = make_dicom(encode_pixels(hu, spec.storage), spec, {**ids, "image": image_id}, table_z + z)
        path = out_dir / f"{image_id}.dcm"
        with atomic_path(path) as tmp:
            save_dicom(ds, tmp)
        truncated = i in spec.truncate_slices
        if truncated:  # the competition's one corrupt file: pixel data shorter than declared
            os.truncate(path, path.stat().st_size - spec.size * spec.size)
        rows.append({"image_id": image_id, "split": spec.split, "PatientID": ids["patient"],
                     "StudyInstanceUID": ids["study"], "SeriesInstanceUID": ids["series"],
                     "slice_index": i, "z": float(f"{slice_position(ds):.4f}"),  # as a reader of the file computes it
                     "size": spec.size, "storage": spec.storage,
                     "multivalue_window": spec.multivalue_window, "fov_padding": spec.fov_padding,
                     "truncated": truncated, "faint": any(b.faint for b in spec.bleeds),
                     "tilt_deg": round(float(np.degrees(spec.tilt)), 2), "motion": i in spec.motion_slices,
                     **labels, **measures})
    return rows


def _write_series_star(args):
    return _write_series(*args)


def generate_dataset(cfg: SyntheticConfig, root: str | os.PathLike, workers: int = 0,
                     progress: bool = True) -> pd.DataFrame:
    """Write the synthetic competition layout under ``root``; return the per-file table."""
    paths = DataPaths(root)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    paths.test_dir.mkdir(parents=True, exist_ok=True)
    paths.masks_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*paths.train_dir.glob("*.dcm"), *paths.test_dir.glob("*.dcm"), *paths.masks_dir.glob("*.png")):
        stale.unlink()  # a smaller dataset over a larger one must not leave extra files
    specs = plan_dataset(cfg)
    jobs = [(sp, str(paths.train_dir), str(paths.test_dir), cfg.min_label_area_mm2, str(paths.masks_dir))
            for sp in specs]
    n_files = sum(sp.n_slices for sp in specs)
    results = run_pool(_write_series_star, jobs, n_workers(workers), total=n_files, size=len, desc="synthetic",
                       unit="dcm", progress=progress, ordered=True)
    rows: list[dict] = [row for series_rows in results for row in series_rows]
    table = pd.DataFrame(rows).sort_values("image_id", kind="stable").reset_index(drop=True)
    _write_csvs(table, paths, cfg)
    return table




def existing_set(root: str | os.PathLike, cfg: SyntheticConfig) -> str | None:
    """Why the synthetic set of ``cfg`` is not (whole) under ``root``, or None when it is: the set's
    ``synthetic_config.yaml`` is written last, so a set without it, of other settings or with files missing
    is not the one asked for."""
    from ichpipe.base.config import load_config

    done = DataPaths(root).synthetic_config
    if not done.exists():
        return f"no {done.name}"
    if load_config(done).synthetic != cfg:
        return f"its {done.name} holds other synthetic settings"
    missing = missing_files(root)
    return f"{len(missing)} files missing, e.g. {missing[0]}" if missing else None


def _write_csvs(table: pd.DataFrame, paths: DataPaths, cfg: SyntheticConfig) -> None:
    train = table[table.split == "train"].set_index("image_id")
    test = table[table.split == "test"].set_index("image_id")
    train_long = wide_to_long(train[list(LABELS)])
    if cfg.n_duplicate_images:  # the real stage_2_train.csv repeats a few images' six rows
        dup_images = train.index[np.linspace(0, len(train) - 1, min(cfg.n_duplicate_images, len(train))).astype(int)]
        extra = train_long[train_long["ID"].str.rpartition("_")[0].isin(dup_images)]
        train_long = pd.concat([train_long, extra], ignore_index=True)
    with atomic_path(paths.train_csv) as tmp:
        train_long.to_csv(tmp, index=False)
    test_long = wide_to_long(test[list(LABELS)])
    with atomic_path(paths.test_labels_csv) as tmp:
        test_long.to_csv(tmp, index=False)
    with atomic_path(paths.sample_submission_csv) as tmp:
        test_long.assign(Label=0.5).to_csv(tmp, index=False)
    with atomic_path(paths.synthetic_table) as tmp:
        table.to_csv(tmp, index=False)
    if len(test):  # one test study as a zip of its DICOMs: what `make demo` gives `predict` to read
        study = test.StudyInstanceUID.min()
        with atomic_path(paths.example_study) as tmp, zipfile.ZipFile(tmp, "w") as z:
            for image_id in sorted(test.index[test.StudyInstanceUID == study]):
                # same bytes every run
                info = zipfile.ZipInfo(f"{study}/{image_id}.dcm", date_time=(2019, 9, 1, 0, 0, 0))
                z.writestr(info, (paths.test_dir / f"{image_id}.dcm").read_bytes(), zipfile.ZIP_DEFLATED)


def missing_files(root: str | os.PathLike) -> list[str]:
    """What a finished synthetic set lacks: its CSVs, every DICOM its per-file table lists and the bleed mask of every
    slice with blood (empty = complete)."""
    paths = DataPaths(root)
    table_path = paths.synthetic_table
    csvs = [paths.train_csv, paths.test_labels_csv, paths.sample_submission_csv, table_path]
    missing = [str(p) for p in csvs if not p.exists()]
    if missing:
        return missing
    table = pd.read_csv(table_path, usecols=["image_id", "split", "any"])
    if (table.split == "test").any() and not paths.example_study.exists():
        return [str(paths.example_study)]
    folder = np.where(table.split == "train", str(paths.train_dir), str(paths.test_dir))
    files = [Path(d) / f"{i}.dcm" for d, i in zip(folder, table.image_id, strict=True)]
    files += [paths.mask(i) for i in table.image_id[table["any"] == 1]]  # sets before 2026-12-06 lack them
    return [str(f) for f in files if not f.is_file() or f.stat().st_size == 0]
