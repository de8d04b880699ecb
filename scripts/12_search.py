#!/usr/bin/env python
"""Hyperparameter search (Optuna: TPE, median pruning on per-epoch validation loss) on one fold.

    python scripts/12_search.py --config configs/demo/cpu_small.yaml --space configs/search/cpu_demo.yaml
    python scripts/12_search.py ... --storage postgresql://user:pass@host/db   # share a study across machines

Each trial is a run folder runs/<name>_tNNN/fold<k>/; the study (runs/<name>/study.db) resumes after a
kill. Writes runs/<name>/trials.csv, trials.md, best.yaml and the plots (see src/ichpipe/search.py).
"""

import sys

from ichpipe.base.cli import stage_main


def add_arguments(parser):
    parser.add_argument("--space", required=True, help="search space YAML (configs/search/*.yaml)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: sqlite in runs/<name>/)")


def run(cfg, args):
    from ichpipe.stages.search import run_search
    from ichpipe.stages.train import train_fold  # each trial is a stage-2 run

    result = run_search(args.config, args.space, args.overrides, args.storage, train_fold=train_fold)
    print(result.table)
    print(f"best trial {result.best}: val {result.best_value:.4f}  {result.params}")
    print(f"written: {result.out}/trials.csv, trials.md, best.yaml, {', '.join(result.figures)}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
