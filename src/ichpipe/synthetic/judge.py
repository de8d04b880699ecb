"""BLAST-CT v1 as an independent judge of the synthetic set (``scripts/14_judge.py``, ``make judge``).

The pure parts (which series, per-slice calls, the table) run in the main venv and are tested there;
the volume writer and the segmentation import SimpleITK and BLAST-CT lazily, which only the judge's
own venv has.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.base.files import atomic_path, write_text_atomic
from ichpipe.base.labels import SUBTYPES
from ichpipe.imaging.dicom import read_slice

CLASSES = {1: "IPH", 2: "extra-axial", 4: "IVH"}  # BLAST-CT's bleed labels (3 = oedema)
# voxels of output per side: large tiles are several times faster on a CPU than the default; 126 covers a 250 mm
# field of view (251 voxels at BLAST-CT's 1 mm) in two tiles per side, where 120 took three (twice the work)
OUTPUT_TILE = 126


def pick_series(table: pd.DataFrame, n: int, subtype: str | None = None) -> list[str]:
    """Series with bleeds, covering every subtype first, then controls: about 2/3 bleeding. With
    ``subtype``: the first ``n`` series that hold that subtype (a larger sample of one kind of bleed)."""
    table = table[(table.tilt_deg == 0) & ~table.truncated & (table["size"] == 512)]
    per_series = table.groupby("SeriesInstanceUID")[list(SUBTYPES)].max()
    if subtype is not None:
        return list(per_series.index[per_series[subtype] > 0][:n])
    chosen: list[str] = []
    for name in sorted(SUBTYPES, key=lambda s: per_series[s].sum()):  # rarest subtype first
        for series in per_series.index[per_series[name] > 0]:
            if series not in chosen:
                chosen.append(series)
                break
    bleeding = [s for s in per_series.index[per_series.max(axis=1) > 0] if s not in chosen]
    controls = list(per_series.index[per_series.max(axis=1) == 0])
    n_bleed = max(len(chosen), int(round(n * 2 / 3)))
    chosen += bleeding[: max(0, n_bleed - len(chosen))]
    return chosen[:n_bleed] + controls[: max(0, n - n_bleed)]


def series_volume(rows: pd.DataFrame, folder: Path):
    """A SimpleITK image (z, y, x) of one series in HU, spacing from the DICOMs."""
    import SimpleITK as sitk

    rows = rows.sort_values("slice_index")
    slices = [read_slice(folder / f"{i}.dcm") for i in rows.image_id]
    hu = np.stack([sl.hounsfield().astype(np.float32) for sl in slices])
    hu[hu < -1024] = -1024  # padding outside the scan circle reads as air
    pixel = float(slices[0].meta["pixel_spacing"])
    z = np.array([sl.meta["z"] for sl in slices])
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((pixel, pixel, float(np.median(np.diff(z)))))
    return image, rows


def segment(image, blast_dir: Path, job_dir: Path):
    """BLAST-CT's segmentation of ``image`` (same grid) with its first ensemble member.

    Minutes per series on a CPU: a finished prediction in ``job_dir`` is reused (a rerun resumes), but
    only for the same volume: a regenerated series keeps its UID, so the input's fingerprint must match.
    """
    import SimpleITK as sitk
    import torch

    done = job_dir / "predictions" / "prediction.csv"
    stamp = job_dir / "input.sha1"
    fingerprint = segmentation_stamp(sitk.GetArrayViewFromImage(image), image.GetSpacing())
    if done.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        return sitk.GetArrayFromImage(sitk.ReadImage(pd.read_csv(done).loc[0, "prediction"]))
    done.unlink(missing_ok=True)

    sys.path.insert(0, str(blast_dir))
    from blast_ct.nifti.savers import NiftiPatchSaver
    from blast_ct.read_config import get_model, get_test_loader
    from blast_ct.trainer.inference import ModelInference

    config = json.loads((blast_dir / "blast_ct" / "data" / "config.json").read_text())
    model = get_model(config)
    config["test"]["input_patch_size"] = list(model.calculate_input_size((OUTPUT_TILE,) * 3))
    config["test"]["batch_size"] = 1
    config["test"]["num_workers"] = 0
    job_dir.mkdir(parents=True, exist_ok=True)
    nifti = job_dir / "image.nii.gz"
    sitk.WriteImage(image, str(nifti))
    pd.DataFrame({"id": ["im_0"], "image": [str(nifti)]}).to_csv(job_dir / "test.csv", index=False)
    loader = get_test_loader(config, model, str(job_dir / "test.csv"), use_cuda=False)
    saver = NiftiPatchSaver(str(job_dir), loader, write_prob_maps=False)
    weights = blast_dir / "blast_ct" / "data" / "saved_models" / "model_1.pt"
    ModelInference(str(job_dir), torch.device("cpu"), model, saver, str(weights), "segmentation")(loader)
    prediction = pd.read_csv(done).loc[0, "prediction"]
    write_text_atomic(stamp, fingerprint + "\n")
    return sitk.GetArrayFromImage(sitk.ReadImage(prediction))


def volume_fingerprint(voxels: np.ndarray, spacing) -> str:
    """SHA-1 of a volume's voxels and spacing: which input a stored segmentation belongs to."""
    digest = hashlib.sha1(np.ascontiguousarray(voxels).tobytes())
    digest.update(repr(tuple(round(float(x), 6) for x in spacing)).encode())
    return digest.hexdigest()


def segmentation_stamp(voxels: np.ndarray, spacing, tile: int = OUTPUT_TILE) -> str:
    """What a stored segmentation was made from: the volume's fingerprint and the tiling (DeepMedic's subsampled
    pathway makes the output depend on where the tiles start)."""
    return f"{volume_fingerprint(voxels, spacing)} tile {tile}"


def slice_calls(seg: np.ndarray, pixel_mm: float, min_area_mm2: float) -> list[str]:
    """Per slice: the bleed class BLAST-CT called (most voxels), or '' for none."""
    calls = []
    min_px = min_area_mm2 / pixel_mm**2
    for sl in seg:
        counts = {name: int((sl == k).sum()) for k, name in CLASSES.items()}
        best = max(counts, key=counts.get)
        calls.append(best if counts[best] >= min_px else "")
    return calls


def summarise(judged: pd.DataFrame) -> list[str]:
    """The judge's table: per subtype, slices found (all, and in series whose bleeds are all acute), the
    class called; then specificity on the slices without a bleed."""
    lines = ["| subtype | slices | found | sensitivity | acute series: found / slices | called IPH | called "
             "extra-axial "
             "| called IVH |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SUBTYPES:
        pos = judged[judged[name] == 1]
        if not len(pos):
            lines.append(f"| {name} | 0 | - | - | - | - | - | - |")
            continue
        found = (pos.call != "").sum()
        acute = pos[~pos.faint.astype(bool)]
        by = [(acute.call != "").sum(), len(acute), *[(pos.call == c).sum() for c in CLASSES.values()]]
        lines.append(f"| {name} | {len(pos)} | {found} | {found / len(pos):.0%} | {by[0]} / {by[1]} | "
                     + " | ".join(map(str, by[2:])) + " |")
    neg = judged[judged["any"] == 0]
    spec = (neg.call == "").mean() if len(neg) else float("nan")
    lines += ["", f"Specificity on the {len(neg)} slices without a bleed: {spec:.1%} "
              f"({(neg.call != '').sum()} called bleeding)."]
    return lines


def write_tables(judged: pd.DataFrame, out: Path) -> list[str]:
    with atomic_path(out / "judge.csv") as tmp:
        judged.to_csv(tmp, index=False)
    lines = [f"# BLAST-CT v1 on {judged.SeriesInstanceUID.nunique()} synthetic series ({len(judged)} slices)", "",
             *summarise(judged)]
    write_text_atomic(out / "judge.md", "\n".join(lines) + "\n")
    return lines
