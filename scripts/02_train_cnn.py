#!/usr/bin/env python
"""Stage 2: train the CNN of one fold on the preprocessed PNGs.

    python scripts/02_train_cnn.py --config configs/cnn/cpu_small.yaml fold=0 [resume=true] [train.lr=3e-4]
    torchrun --nproc_per_node 4 scripts/02_train_cnn.py --config configs/cnn/resnext101_384.yaml fold=0

Writes <data root>/runs/<experiment>/fold<k>/ (checkpoints per epoch, OOF predictions, TensorBoard).
"""

import sys

from ichpipe.cli import stage_main


def run(cfg, args):
    from ichpipe.train import train_fold  # torch & co. load after the config is read: a bad one fails at once

    m = train_fold(cfg)
    if m["rank"] != 0:  # under torchrun, rank 0 reports for all
        return
    if "val_loss" in m:
        print(f"fold {cfg.fold}: validation weighted log loss {m['val_loss']:.4f} after epoch {m['epoch'] + 1} "
              f"(prior-only baseline {m['prior_loss']:.4f}); run folder {m['run_dir']}")
    else:
        print(f"fold {cfg.fold}: nothing to do, every epoch is done; run folder {m['run_dir']}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, per_fold=True))
