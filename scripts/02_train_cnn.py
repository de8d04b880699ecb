#!/usr/bin/env python
"""Stage 2: train the CNN of one fold on the preprocessed PNGs.

    python scripts/02_train_cnn.py --config configs/demo/cpu_small.yaml fold=0 [resume=true] [train.lr=3e-4]
    torchrun --nproc_per_node 4 scripts/02_train_cnn.py --config configs/real/resnext101_384.yaml fold=0

Writes <data root>/runs/<experiment>/fold<k>/ (checkpoints per epoch, OOF predictions, TensorBoard).
"""

import sys

from ichpipe.base.cli import stage_main


def run(cfg, args):
    from ichpipe.stages.train import train_fold  # torch & co. load after the config is read: a bad one fails at once

    result = train_fold(cfg)
    if result.rank != 0:  # under torchrun, rank 0 reports for all
        return
    if result.last is not None:
        print(f"fold {cfg.fold}: validation weighted log loss {result.last.val_loss:.4f} after epoch "
              f"{result.last.epoch + 1} (prior-only baseline {result.prior_loss:.4f}); run folder {result.run_dir}")
    else:
        print(f"fold {cfg.fold}: nothing to do, every epoch is done; run folder {result.run_dir}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, per_fold=True))
