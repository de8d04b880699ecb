#!/usr/bin/env python
"""The experiment report: Figure 1, PR curves at a target recall, calibration, training curves.

    python scripts/07_report.py --config configs/demo/cpu_small.yaml [report.model=cnn_bagged]

Reads the OOF predictions of `make submission`, the metadata, PNGs and TensorBoard logs; writes
runs/<experiment>/report/ (figures and report.md; see src/ichpipe/report.py).
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.stages.report import run_report


def run(cfg, args):
    result = run_report(cfg)
    for name, op in result.operating_points.items():
        print(f"{name:<17} threshold {op.threshold:.4g}: recall {op.recall:.3f}, precision {op.precision:.3f}, "
              f"specificity {op.specificity:.3f}, missed {op.fn} of {op.tp + op.fn}")
    print(f"report: {result.dir}/report.md")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run))
