#!/usr/bin/env python
"""Stage 3: per-slice embeddings and logits of the fold's OOF and test slices, per epoch checkpoint.

    python scripts/03_embed.py --config configs/demo/cpu_small.yaml fold=0 [embed.tta=[none,hflip]]

Writes runs/<experiment>/fold<k>/embeddings/epoch<NN>/ (see src/ichpipe/embed.py); finished
checkpoints are skipped on a rerun.
"""

import sys

from ichpipe.base.cli import stage_main


def run(cfg, args):
    from ichpipe.stages.embed import embed_fold  # torch & co. load after the config is read: a bad one fails at once

    folders = embed_fold(cfg)
    print(f"fold {cfg.fold}: embedded {len(folders)} checkpoint(s) with TTA {'+'.join(cfg.embed.tta)}"
          + (f" -> {folders[-1].rsplit('/', 1)[0]}" if folders else " (all were done already)"))


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, per_fold=True))
