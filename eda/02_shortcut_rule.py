#!/usr/bin/env python
"""A one-line "bleed detector" as a baseline the models must beat: the share of head pixels at 55-90 HU.

    python eda/02_shortcut_rule.py [data.root=data] [--max-images N]

Reads the train DICOMs (the synthetic set or the real competition's), scores each slice with
``ichpipe.synthetic.realism.shortcut_score`` and prints the rule's ROC AUC for every label against
stage_2_train.csv. On the real data it is a weak detector; a synthetic set on which it scores like
a trained CNN is too easy to tell us anything (issue 12: AUC(any) must stay <= 0.75). Writes
<work dir>/eda/shortcut_rule.csv (image, score) and shortcut_rule.md.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichpipe.base.cli import stage_main
from ichpipe.base.files import atomic_path, write_text_atomic
from ichpipe.base.label_csv import read_labels
from ichpipe.base.labels import LABELS
from ichpipe.base.parallel import n_workers, run_pool
from ichpipe.base.paths import data_paths
from ichpipe.imaging.dicom import DicomError, read_slice
from ichpipe.synthetic.realism import SHORTCUT_HU, shortcut_score


def _score(path: str) -> tuple[str, float]:
    try:
        sl = read_slice(path)
    except DicomError:
        return path, float("nan")  # damaged files are preprocess's business, not the rule's
    return sl.image_id, shortcut_score(sl.hounsfield().astype(np.float32))


def add_arguments(parser) -> None:
    parser.add_argument("--max-images", type=int, default=0,
                        help="score a random sample of this many train images (0 = all; the real set has 752k)")


def run(cfg, args):
    paths = data_paths(cfg)
    labels = read_labels(paths.train_csv)
    files = sorted(paths.train_dir.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{paths.train_dir}: no .dcm files")
    if args.max_images and len(files) > args.max_images:
        pick = np.random.default_rng(0).choice(len(files), args.max_images, replace=False)
        files = [files[i] for i in sorted(pick)]
    results = run_pool(_score, [str(f) for f in files], n_workers(cfg.data.workers), total=len(files),
                       size=lambda _: 1, desc="55-90 HU rule", unit="dcm")
    scores = pd.DataFrame(results, columns=["image_id", "score"]).dropna()
    table = scores.join(labels, on="image_id", how="inner")
    lines = [f"# The 55-90 HU rule ({len(table)} train images of {paths.train_dir})", "",
             f"Score: share of head pixels (largest region above -300 HU, holes filled) at "
             f"{SHORTCUT_HU[0]:g}-{SHORTCUT_HU[1]:g} HU. ROC AUC per label (0.5 = no better than chance):", "",
             "| label | positives | AUC |", "|---|---:|---:|"]
    for name in LABELS:
        y = table[name].to_numpy()
        auc = roc_auc_score(y, table.score) if 0 < y.sum() < len(y) else float("nan")
        lines.append(f"| {name} | {int(y.sum())} | {auc:.3f} |")
    out = paths.work / "eda"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "shortcut_rule.csv") as tmp:
        scores.to_csv(tmp, index=False)
    write_text_atomic(out / "shortcut_rule.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'shortcut_rule.md'}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
