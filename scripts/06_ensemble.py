#!/usr/bin/env python
"""Ensemble of experiments: combine several experiments' stage-5 predictions into one submission.

    python scripts/06_ensemble.py --config configs/demo/cpu_small.yaml --members demo demo_mobilenet
    python scripts/06_ensemble.py --config configs/ensemble/demo.yaml      # members in the YAML

Checks that every member was trained on today's fold table, aligns predictions by image id, scores
the equal mean, per-class fitted weights and a second-level stacker out of fold, and writes
runs/<ensemble.name>/cv.md and submissions/<date>_<ensemble.name>_cv<oof>.csv.gz (see
src/ichpipe/ensemble.py).
"""

import sys

from ichpipe.base.cli import stage_main


def add_arguments(parser):
    parser.add_argument("--members", nargs="+", default=None, help="experiment names (default: ensemble.members)")


def run(cfg, args):
    from ichpipe.stages.ensemble import run_ensemble

    if args.members:
        cfg.ensemble.members = args.members
    result = run_ensemble(cfg)
    print(result.table)
    weights = result.detail.get("weights")
    if weights:
        print(f"weights ({weights['space']} space, fitted on every fold):")
        for label, per in weights["per_class"].items():
            print(f"  {label:17s} " + "  ".join(f"{m} {w:.2f}" for m, w in per.items()))
    note = " (a member: no combiner beat it out of fold)" if result.final in result.members else ""
    print(f"CV table: {result.cv_dir}/cv.md; final = {result.final}{note}")
    print(f"written and validated: {result.path}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
