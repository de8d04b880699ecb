#!/usr/bin/env python
"""Write the synthetic RSNA-format dataset under the data root.

    python scripts/00_make_synthetic.py [--config configs/demo/cpu_small.yaml] [synthetic.n_patients=200]
                                        [data.root=data]
"""

import sys
import time

from ichpipe.base.cli import stage_main
from ichpipe.base.config import save_config
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import data_paths
from ichpipe.synthetic.dataset import existing_set, generate_dataset
from ichpipe.synthetic.realism import format_summary, set_summary


def run(cfg, args):
    done = data_paths(cfg).synthetic_config
    why = existing_set(cfg.data.root, cfg.synthetic)
    if why is None:
        print(f"{cfg.data.root}: the synthetic set of this config is already there (delete {done} to write it again)")
        return 0
    if "missing" in why:
        print(f"{cfg.data.root}: the synthetic set is incomplete ({why}); writing it again")
    start = time.perf_counter()
    table = generate_dataset(cfg.synthetic, cfg.data.root, workers=cfg.data.workers)
    elapsed = time.perf_counter() - start
    save_config(cfg, done)
    train = table[table.split == "train"]
    prevalence = ", ".join(f"{name} {100 * train[name].mean():.2f}%" for name in LABELS)
    print(f"wrote {len(train)} train and {len(table) - len(train)} test DICOMs of "
          f"{table.PatientID.nunique()} patients / {table.SeriesInstanceUID.nunique()} series under "
          f"{cfg.data.root} in {elapsed:.1f} s")
    print(f"train prevalence: {prevalence}")
    print(f"realism (issue 12 targets; the 55-90 HU rule over train slices, the rest medians of mid-series slices; "
          f"{len(table) / elapsed:.1f} slices/s):")
    print("\n".join(format_summary(set_summary(table))))


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run))
