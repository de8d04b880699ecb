#!/usr/bin/env python
"""Stage 1: DICOMs → 3-window PNGs, metadata table and patient folds under <data root>/processed/.

    python scripts/01_preprocess.py [--config configs/demo/cpu_small.yaml] [--shard I/N] [preprocess.size=256]

Resumable: rerun after a kill and it finishes the job. --shard I/N processes chunk k when k % N == I
(one task of a cluster array job); the run that finds every chunk done writes the table.
"""

import sys

from ichpipe.base.cli import stage_main
from ichpipe.base.config import ConfigError
from ichpipe.stages.preprocess import run_preprocess


def add_arguments(parser):
    parser.add_argument("--shard", default="0/1", help="I/N: process this shard of the chunks only")


def parse_shard(text):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard: need 0 <= I < N, got {text!r}")
    return i, n


def run(cfg, args):
    summary = run_preprocess(cfg, parse_shard(args.shard))
    if summary.labels_without_dicom:
        print(f"warning: {summary.labels_without_dicom} labelled images have no DICOM file (within "
              f"preprocess.max_bad_fraction={cfg.preprocess.max_bad_fraction}); they are left out")
    print(f"preprocess: {summary.processed} files processed, {summary.skipped} already done, "
          f"in {summary.seconds:.1f} s -> {summary.out_dir}")
    if not summary.complete:
        print(f"{summary.pending_chunks} chunks are still to do (other shards); rerun to assemble the table")
        return 0
    print(f"metadata: {summary.images} images in {summary.metadata}; {summary.bad} bad files "
          f"listed in {summary.out_dir}/bad_files.csv")
    if summary.same_position:
        print(f"warning: {summary.same_position} slices share their series' position with another slice (kept; "
              f"listed in {summary.out_dir}/same_position.csv)")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
