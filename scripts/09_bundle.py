#!/usr/bin/env python
"""Pack a finished experiment into a portable model bundle (see src/ichpipe/bundle.py).

    python scripts/09_bundle.py --config configs/demo/cpu_small.yaml [--out DIR] [--fp16] [--archive]

Default DIR: <work dir>/runs/<experiment>/bundle. Run it on a new study with
`python -m ichpipe predict PATH --bundle DIR --out OUT`.
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.base.paths import bag_dir
from ichpipe.stages.bundle import make_bundle


def add_arguments(parser):
    parser.add_argument("--out", help="the bundle folder (default: runs/<experiment>/bundle)")
    parser.add_argument("--fp16", action="store_true", help="store the CNN weights in half precision")
    parser.add_argument("--archive", action="store_true", help="also write <out>.tar.gz")


def run(cfg, args):
    out = make_bundle(cfg, args.out or bag_dir(cfg) / "bundle", fp16=args.fp16, archive=args.archive)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"bundle of {cfg.experiment}: {out} ({size:.1f} MB)" + (f", archive {out}.tar.gz" if args.archive else ""))


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
