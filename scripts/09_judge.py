#!/usr/bin/env python
"""An independent judge of the synthetic set: BLAST-CT v1, a 3-D CNN trained on real head CT.

    make judge [N=6]     (its own venv, .venv-judge; never part of make test)
    .venv-judge/bin/python scripts/09_judge.py [data.root=data] [--patients 6] [--blast-ct ../shared/blast-ct-v1]

Takes N series of the synthetic set (bleeds of every subtype and controls, untilted), writes each
as a NIfTI volume in HU, segments it with BLAST-CT (intraparenchymal, extra-axial, oedema,
intraventricular), and compares its calls slice by slice with the answer key: per-subtype slice
sensitivity (any bleed class found on the slice), which class it called, and specificity on the
slices without a bleed. A model that never saw our phantom finding our bleeds, and calling them
what they are, is evidence that they look like bleeds. Writes <work dir>/judge/judge.md and .csv.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.cli import stage_main
from ichpipe.dicom import read_slice
from ichpipe.io import atomic_path, write_text_atomic
from ichpipe.labels import SUBTYPES
from ichpipe.paths import data_paths

CLASSES = {1: "IPH", 2: "extra-axial", 4: "IVH"}  # BLAST-CT's bleed labels (3 = oedema)
OUTPUT_TILE = 120  # voxels of output per side: large tiles are several times faster on a CPU than the default


def add_arguments(parser) -> None:
    parser.add_argument("--patients", type=int, default=6, help="series to judge (default 6)")
    parser.add_argument("--blast-ct", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "blast-ct-v1"),
                        help="BLAST-CT v1 source folder (with blast_ct/data/saved_models/model_1.pt)")


def pick_series(table: pd.DataFrame, n: int) -> list[str]:
    """Series with bleeds, covering every subtype first, then controls: about 2/3 bleeding."""
    table = table[(table.tilt_deg == 0) & ~table.truncated & (table["size"] == 512)]
    per_series = table.groupby("SeriesInstanceUID")[list(SUBTYPES)].max()
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

    Minutes per series on a CPU: a finished prediction in ``job_dir`` is reused (a rerun resumes).
    """
    import SimpleITK as sitk
    import torch

    done = job_dir / "predictions" / "prediction.csv"
    if done.exists():
        return sitk.GetArrayFromImage(sitk.ReadImage(pd.read_csv(done).loc[0, "prediction"]))

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
    prediction = pd.read_csv(job_dir / "predictions" / "prediction.csv").loc[0, "prediction"]
    return sitk.GetArrayFromImage(sitk.ReadImage(prediction))


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
    lines = ["| subtype | slices | found | sensitivity | called IPH | called extra-axial | called IVH |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in SUBTYPES:
        pos = judged[judged[name] == 1]
        if not len(pos):
            lines.append(f"| {name} | 0 | - | - | - | - | - |")
            continue
        found = (pos.call != "").sum()
        by = [(pos.call == c).sum() for c in CLASSES.values()]
        lines.append(f"| {name} | {len(pos)} | {found} | {found / len(pos):.0%} | " + " | ".join(map(str, by)) + " |")
    neg = judged[judged["any"] == 0]
    spec = (neg.call == "").mean() if len(neg) else float("nan")
    lines += ["", f"Specificity on the {len(neg)} slices without a bleed: {spec:.1%} "
              f"({(neg.call != '').sum()} called bleeding)."]
    return lines


def run(cfg, args):
    paths = data_paths(cfg)
    table = pd.read_csv(paths.root / "synthetic_slices.csv")
    blast_dir = Path(args.blast_ct)
    if not (blast_dir / "blast_ct" / "data" / "saved_models" / "model_1.pt").exists():
        raise FileNotFoundError(f"{blast_dir}: no BLAST-CT v1 (blast_ct/data/saved_models/model_1.pt); give --blast-ct")
    out = paths.work / "judge"
    out.mkdir(parents=True, exist_ok=True)
    judged = []
    for k, series in enumerate(pick_series(table, args.patients)):
        rows = table[table.SeriesInstanceUID == series]
        folder = paths.train_dir if rows.split.iloc[0] == "train" else paths.test_dir
        start = time.perf_counter()
        image, rows = series_volume(rows, folder)
        seg = segment(image, blast_dir, out / "work" / series)
        calls = slice_calls(seg, image.GetSpacing()[0], cfg.synthetic.min_label_area_mm2)
        judged.append(rows.assign(call=calls)[["image_id", "SeriesInstanceUID", "slice_index", *SUBTYPES, "any", "call"]])
        print(f"[{k + 1}/{args.patients}] {series}: {len(rows)} slices, {sum(c != '' for c in calls)} called bleeding, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        lines = write_tables(pd.concat(judged, ignore_index=True), out)  # after every series: nothing lost
    print("\n".join(lines))


def write_tables(judged: pd.DataFrame, out: Path) -> list[str]:
    with atomic_path(out / "judge.csv") as tmp:
        judged.to_csv(tmp, index=False)
    lines = [f"# BLAST-CT v1 on {judged.SeriesInstanceUID.nunique()} synthetic series ({len(judged)} slices)", "",
             *summarise(judged)]
    write_text_atomic(out / "judge.md", "\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
