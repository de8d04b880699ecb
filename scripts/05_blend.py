#!/usr/bin/env python
"""Stage 5: blend folds, bags and TTA; print the CV table; write validated submissions.

    python scripts/05_blend.py --config configs/demo/cpu_small.yaml [blend.lstm_weight=0.7]

Writes runs/<experiment>/cv.md and cv.json, and submissions/<date>_<experiment>[-cnn]_cv<oof>.csv.gz
with a YAML of configs, git commit and CV scores beside each (see src/ichpipe/blend.py).
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.stages.blend import run_blend


def run(cfg, args):
    result = run_blend(cfg)
    print(result.table)
    print(f"CV table: {result.cv_dir}/cv.md and cv.json")
    for model, w in result.written.items():
        note = f" ({w.filled} test images had no prediction: filled with the prior)" if w.filled else ""
        done = "written and validated" if w.new else "already there (the same predictions)"
        print(f"{done} ({model}, OOF {w.cv:.4f}): {w.path}{note}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run))
