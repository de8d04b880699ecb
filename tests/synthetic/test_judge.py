"""The judge's pure parts (make judge itself needs its own venv and BLAST-CT, so it is never run here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichpipe.base.labels import SUBTYPES
from ichpipe.synthetic.judge import pick_series, segmentation_stamp, slice_calls, summarise, volume_fingerprint


def _table(series_labels: dict[str, dict], **overrides) -> pd.DataFrame:
    rows = []
    for uid, spec in series_labels.items():
        for i in range(4):
            row = {"SeriesInstanceUID": uid, "slice_index": i, "tilt_deg": 0.0, "truncated": False, "size": 512,
                   "faint": spec.get("faint", False), **{s: int(i == 1 and s in spec.get("subtypes",
                                                                                         ())) for s in SUBTYPES}}
            row.update(overrides.get(uid, {}))
            rows.append(row)
    table = pd.DataFrame(rows)
    table["any"] = table[list(SUBTYPES)].max(axis=1)
    return table


def test_pick_series_covers_every_subtype_then_controls_and_skips_odd_series():
    labels = {f"s{k}": {"subtypes": (name,)} for k, name in enumerate(SUBTYPES)}
    labels.update({"tilted": {"subtypes": ("epidural",)}, "c1": {}, "c2": {}, "c3": {}, "c4": {}})
    table = _table(labels, tilted={"tilt_deg": 12.0})
    chosen = pick_series(table, 8)
    assert chosen[:5] == [f"s{k}" for k in range(5)]  # all five subtypes first, each from its own series
    assert chosen[5:] == ["c1", "c2", "c3"]  # the rest controls; the tilted series never
    assert "tilted" not in pick_series(table, 20)
    labels["s9"] = {"subtypes": ("subdural", "epidural")}
    table = _table(labels, tilted={"tilt_deg": 12.0})
    assert pick_series(table, 5, "subdural") == ["s4", "s9"]  # only series with it, never the tilted one
    assert pick_series(table, 1, "epidural") == ["s0"]


def test_slice_calls_take_the_largest_class_above_the_minimum_area():
    seg = np.zeros((3, 20, 20), dtype=np.uint8)
    seg[0, :5, :5] = 1  # 25 px IPH
    seg[0, 10:13, 10:13] = 2  # 9 px extra-axial
    seg[1, :2, :2] = 4  # 4 px IVH: below 6 mm2 at 1 mm pixels
    seg[2, :10, :10] = 3  # oedema is no bleed
    assert slice_calls(seg, pixel_mm=1.0, min_area_mm2=6.0) == ["IPH", "", ""]
    assert slice_calls(seg, pixel_mm=2.0, min_area_mm2=6.0) == ["IPH", "IVH", ""]


def test_summary_counts_sensitivity_acute_series_and_specificity():
    judged = pd.DataFrame({
        "faint": [False, False, True, True, False, False, False, False],
        "subdural": [1, 1, 1, 1, 0, 0, 0, 0],
        "call": ["extra-axial", "IPH", "", "", "", "", "", "IPH"],
    })
    for name in SUBTYPES:
        if name not in judged:
            judged[name] = 0
    judged["any"] = judged[list(SUBTYPES)].max(axis=1)
    lines = summarise(judged)
    row = next(line for line in lines if line.startswith("| subdural"))
    assert row == "| subdural | 4 | 2 | 50% | 2 / 2 | 1 | 1 | 0 |"
    assert "| epidural | 0 |" in "\n".join(lines)
    assert lines[-1] == "Specificity on the 4 slices without a bleed: 75.0% (1 called bleeding)."


def test_a_stored_segmentation_belongs_to_one_volume():
    voxels = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    same = volume_fingerprint(voxels.copy(), (0.5, 0.5, 5.0))
    assert same == volume_fingerprint(voxels, (0.5, 0.5, 5.0))
    changed = voxels.copy()
    changed[2, 3, 3] += 1  # a regenerated series keeps its UID but not its voxels
    assert volume_fingerprint(changed, (0.5, 0.5, 5.0)) != same
    assert volume_fingerprint(voxels, (0.5, 0.5, 4.0)) != same
    # a segmentation made with another tiling is not reused either (its output differs where the tiles start)
    assert segmentation_stamp(voxels, (0.5, 0.5, 5.0), 120) != segmentation_stamp(voxels, (0.5, 0.5, 5.0), 126)
    assert segmentation_stamp(voxels, (0.5, 0.5, 5.0), 126).startswith(same)
