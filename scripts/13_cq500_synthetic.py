#!/usr/bin/env python
"""The synthetic test set as CQ500 (a folder per study, reads.csv with three simulated readers who each err on a
finding with probability 0.1): what `make evaluate` reads. Written to DATA_DIR/cq500_synthetic.

    python scripts/13_cq500_synthetic.py [--config configs/demo/cpu_small.yaml] [data.root=data]
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.base.paths import data_paths
from ichpipe.synthetic.cq500 import write_cq500_copy

DISAGREE = 0.1  # each simulated reader errs on a finding of a study with this probability


def run(cfg, args):
    out = data_paths(cfg).cq500_copy
    r = write_cq500_copy(cfg.data.root, out, disagree=DISAGREE, seed=cfg.synthetic.seed)
    print(f"{r['studies']} test studies ({r['slices']} slices) as CQ500 under {out}, with reads.csv (three readers, "
          f"each wrong on a finding with probability {DISAGREE})")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run))
