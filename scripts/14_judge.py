#!/usr/bin/env python
"""An independent judge of the synthetic set: BLAST-CT v1, a 3-D CNN trained on real head CT.

    make judge [N=6]     (its own venv, .venv-judge; never part of make test)
    .venv-judge/bin/python scripts/14_judge.py [data.root=data] [--patients 6] [--blast-ct ../shared/blast-ct-v1]

Takes N series of the synthetic set (bleeds of every subtype and controls, untilted), writes each
as a NIfTI volume in HU, segments it with BLAST-CT (intraparenchymal, extra-axial, oedema,
intraventricular), and compares its calls slice by slice with the answer key: per-subtype slice
sensitivity (any bleed class found on the slice), which class it called, and specificity on the
slices without a bleed. A model that never saw our phantom finding our bleeds, and calling them
what they are, is evidence that they look like bleeds. Writes <work dir>/judge/judge.md and .csv.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from ichpipe.base.cli import stage_main
from ichpipe.base.labels import SUBTYPES
from ichpipe.base.paths import data_paths
from ichpipe.synthetic.judge import pick_series, segment, series_volume, slice_calls, write_tables


def add_arguments(parser) -> None:
    parser.add_argument("--patients", type=int, default=6, help="series to judge (default 6)")
    parser.add_argument("--subtype", choices=SUBTYPES, default=None,
                        help="judge only series with this subtype (tables in judge/<subtype>/; segmentations shared)")
    parser.add_argument("--blast-ct",
                        default=str(Path(__file__).resolve().parents[1].parent / "shared" / "blast-ct-v1"),
                        help="BLAST-CT v1 source folder (with blast_ct/data/saved_models/model_1.pt)")


def run(cfg, args):
    paths = data_paths(cfg)
    table = pd.read_csv(paths.synthetic_table)
    blast_dir = Path(args.blast_ct)
    if not (blast_dir / "blast_ct" / "data" / "saved_models" / "model_1.pt").exists():
        raise FileNotFoundError(f"{blast_dir}: no BLAST-CT v1 (blast_ct/data/saved_models/model_1.pt); give --blast-ct")
    cache = paths.work / "judge" / "work"  # BLAST-CT's segmentations, reused by every selection
    out = paths.work / "judge" / (args.subtype or "")
    out.mkdir(parents=True, exist_ok=True)
    judged = []
    chosen = pick_series(table, args.patients, args.subtype)
    for k, series in enumerate(chosen):
        rows = table[table.SeriesInstanceUID == series]
        folder = paths.train_dir if rows.split.iloc[0] == "train" else paths.test_dir
        start = time.perf_counter()
        image, rows = series_volume(rows, folder)
        seg = segment(image, blast_dir, cache / series)
        calls = slice_calls(seg, image.GetSpacing()[0], cfg.synthetic.min_label_area_mm2)
        judged.append(rows.assign(call=calls)[["image_id", "SeriesInstanceUID", "slice_index", "faint", *SUBTYPES,
                                               "any",
                                               "call"]])
        print(f"[{k + 1}/{len(chosen)}] {series}: {len(rows)} slices, {sum(c != '' for c in calls)} called bleeding, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        lines = write_tables(pd.concat(judged, ignore_index=True), out)  # after every series: nothing lost
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
