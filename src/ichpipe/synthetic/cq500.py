"""A CQ500-layout copy of the synthetic test set: what `ichpipe evaluate` reads on real external data.

CQ500 (qure.ai, 491 head CTs) comes as one folder per study, ``CQ500CT<n> CQ500CT<n>/Unknown Study/CT <series>/
CT<nnnnnn>.dcm``, and ``reads.csv``: one row per study (``name`` = ``CQ500-CT-<n>``, ``Category``) with three
radiologists' calls per finding (``R1:ICH``, ``R1:IPH``, ``R1:IVH``, ``R1:SDH``, ``R1:EDH``, ``R1:SAH``, ...,
``R3:SAH``). The copy links (or copies) the synthetic test DICOMs into that layout and simulates the three readers:
each calls ICH on a study correctly (the answer key: a study shows a class when any of its slices does) or wrongly
with probability ``disagree``; a reader who calls ICH calls each subtype correctly or wrongly, again with
probability ``disagree``; one who does not calls none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_dir
from ichpipe.base.labels import CQ500_FINDINGS
from ichpipe.base.paths import DataPaths

READERS = ("R1", "R2", "R3")


def write_cq500_copy(root: str | os.PathLike, out: str | os.PathLike, disagree: float = 0.1, seed: int = 0) -> dict:
    """The synthetic test set under ``root`` as CQ500 under ``out`` (replaced as a whole); returns counts."""
    root = Path(root)
    table_path = DataPaths(root).synthetic_table
    if not table_path.exists():
        raise InputError(f"{table_path}: not found; the CQ500 copy is made from a synthetic set (make synthetic)")
    if not 0 <= disagree < 0.5:
        raise InputError(f"disagree={disagree}: the readers' error rate must be in [0, 0.5)")
    table = pd.read_csv(table_path)
    test = table[table.split == "test"].sort_values(["StudyInstanceUID", "SeriesInstanceUID", "slice_index"])
    if test.empty:
        raise InputError(f"{table_path}: the synthetic set has no test studies")
    rng = np.random.default_rng(seed)
    reads = []
    with atomic_dir(Path(out), [root / "stage_2_test", table_path], "the CQ500 copy") as tmp:
        for n, (_, rows) in enumerate(test.groupby("StudyInstanceUID", sort=True)):
            folder = tmp / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study"
            for k, (_, series) in enumerate(rows.groupby("SeriesInstanceUID", sort=True)):
                target = folder / f"CT PLAIN {k}"
                target.mkdir(parents=True)
                for i, image_id in enumerate(series.image_id):
                    _link(root / "stage_2_test" / f"{image_id}.dcm", target / f"CT{i:06d}.dcm")
            truth = {code: int(rows[label].max()) for code, label in CQ500_FINDINGS.items()}
            read = {"name": f"CQ500-CT-{n}", "Category": "B1"}
            for reader in READERS:
                ich = int(truth["ICH"] ^ (rng.random() < disagree))
                for code, value in truth.items():  # a reader who sees no bleed calls no subtype
                    read[f"{reader}:{code}"] = ich if code == "ICH" else ich * int(value ^ (rng.random() < disagree))
            reads.append(read)
        pd.DataFrame(reads).to_csv(tmp / "reads.csv", index=False)
    return {"studies": len(reads), "slices": len(test), "out": str(out)}


def _link(src: Path, dst: Path) -> None:
    """A hard link (no extra disk), a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
