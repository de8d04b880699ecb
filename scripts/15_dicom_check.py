#!/usr/bin/env python
"""predict's DICOM outputs through three independent validators (dciodvfy, dsrdump, PixelMed's SR validator) on a
synthetic negative and positive study, real CQ500 slices, CT_small (no head) and an all-air series; writes
summary.md and each tool's output into DATA_DIR/dicom_check (ichpipe.stages.predict.dicom_check). Exits 1 on
any validator error.

    python scripts/15_dicom_check.py [--config configs/demo/cpu_small.yaml] [data.root=data] [--bundle B]
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.base.config import REPO_ROOT
from ichpipe.base.paths import bag_dir, data_paths
from ichpipe.stages.predict import dicom_check


def add_arguments(parser):
    parser.add_argument("--bundle", help="the bundle (default: the experiment's, as `make bundle` writes it)")


def run(cfg, args):
    r = dicom_check(cfg.data.root, args.bundle or bag_dir(cfg) / "bundle", data_paths(cfg).dicom_check,
                    REPO_ROOT)
    print((r.out / "summary.md").read_text())
    print(f"{len(r.checks)} checks of {len(r.cases)} cases, {r.errors} error(s) -> {r.out}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
