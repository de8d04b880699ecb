#!/usr/bin/env python
"""Real head CT next to the synthetic set, in the brain and bone windows, to judge by eye.

    python eda/03_real_vs_synthetic.py [data.root=data] [--compare OTHER_ROOT]

Left: two real slices from pydicom's test data (a mid-level slice, 693_UNCR.dcm, and a tilted
skull-base slice, J2K_pixelrep_mismatch.dcm). Right: one synthetic series of the set at the skull
base, mid-level and near the vertex, read back from its DICOMs; with ``--compare``, the same series of a
second set made with the same seed (the other ``synthetic.anatomy``) beside it. Each image is titled with the
realism measures of ``ichpipe.synthetic.realism``. Writes <work dir>/eda/real_vs_synthetic.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom

from ichpipe.base.cli import stage_main
from ichpipe.base.config import load_config
from ichpipe.base.paths import data_paths
from ichpipe.imaging.dicom import hounsfield, read_slice
from ichpipe.synthetic.realism import slice_measures

WINDOWS = {"brain 40/80": (40, 80), "bone 600/2800": (600, 2800)}
LEVELS = {"skull base": 0.22, "mid": 0.62, "vertex": 0.9}  # relative position in the series (foot to head)


def real_slices() -> list[tuple[str, np.ndarray, float]]:
    from pydicom.data import get_testdata_file

    out = []
    for name, title in (("693_UNCR.dcm", "real: mid-level"), ("J2K_pixelrep_mismatch.dcm",
                                                              "real: skull base (tilted)")):
        ds = pydicom.dcmread(get_testdata_file(name))
        out.append((title, hounsfield(ds.pixel_array, ds).astype(np.float32), float(ds.PixelSpacing[0])))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--compare", metavar="ROOT", default=None,
                        help="data root of a second synthetic set of the same seed (the other anatomy), shown beside")


def anatomy_of(root: Path) -> str:
    """The anatomy a synthetic set was written with (its saved config), or '' for an older set."""
    saved = root / "synthetic_config.yaml"
    return str(load_config(saved).synthetic.anatomy) if saved.exists() else ""


def synthetic_slices(cfg, series_uid: str | None = None) -> tuple[str, list[tuple[str, np.ndarray, float]]]:
    """The set's longest untilted, still train series (or ``series_uid``) at three levels."""
    paths = data_paths(cfg)
    table = pd.read_csv(paths.synthetic_table)
    train = table[(table.split == "train") & ~table.truncated]
    ok = train[(train.tilt_deg == 0) & ~train.motion]  # an untilted, still series if there is one
    ok = ok if len(ok) else train
    if series_uid is None:
        series_uid = ok.groupby("SeriesInstanceUID").size().idxmax()
    series = table[table.SeriesInstanceUID == series_uid].sort_values("slice_index")
    if series.empty:
        raise ValueError(f"{paths.synthetic_table}: no series {series_uid} (made with another seed?)")
    name = anatomy_of(paths.root)
    out = []
    for level, frac in LEVELS.items():
        row = series.iloc[int(round(frac * (len(series) - 1)))]
        sl = read_slice(paths.train_dir / f"{row.image_id}.dcm")
        out.append((f"{name or 'synthetic'}: {level}", sl.hounsfield().astype(np.float32),
                    float(sl.meta["pixel_spacing"])))
    return series_uid, out


def run(cfg, args):
    series_uid, panels = synthetic_slices(cfg)
    panels = real_slices() + panels
    if args.compare:
        other = load_config(args.config, [*args.overrides, f"data.root={args.compare}"])
        panels += synthetic_slices(other, series_uid)[1]
    fig, axes = plt.subplots(len(WINDOWS), len(panels), figsize=(3.2 * len(panels), 6.6))
    for col, (title, hu, pixel) in enumerate(panels):
        m = slice_measures(hu, pixel)
        for row, (wname, (c, w)) in enumerate(WINDOWS.items()):
            ax = axes[row, col]
            ax.imshow(np.clip((hu - (c - w / 2)) / w, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{title}\n20-50 HU {m['brain_20_50']:.2f}, bone {m['bone_300']:.2f}\n"
                             f"noise corr {m['noise_correlation']:.2f}, edge {m['edge_width_mm']:.1f} mm", fontsize=8)
            if col == 0:
                ax.set_ylabel(wname)
    fig.suptitle("Real head CT (left) and the synthetic set (right"
                 + (", both anatomies: the same patient and series)" if args.compare else ")"), fontsize=11)
    fig.tight_layout()
    out = data_paths(cfg).work / "eda"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "real_vs_synthetic.png"
    fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    path.with_suffix(".tmp.png").replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
