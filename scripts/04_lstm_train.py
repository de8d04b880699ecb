#!/usr/bin/env python
"""Stage 4: a bidirectional LSTM over each series' slices, on one fold's CNN embeddings.

    python scripts/04_lstm_train.py --config configs/demo/cpu_small.yaml fold=0 [lstm.epochs=20]

Trains nested-CV LSTMs (see src/ichpipe/sequence.py for how leakage is avoided) on every embedded
checkpoint of the fold and writes runs/<experiment>/fold<k>/lstm/epoch<NN>/; finished checkpoints
are skipped on a rerun.
"""

import sys

from ichpipe.base.cli import stage_main


def run(cfg, args):
    from ichpipe.stages.sequence import train_sequence_fold  # torch loads after the config is read

    results = train_sequence_fold(cfg)
    for name, r in results.items():
        print(f"fold {cfg.fold} {name}: OOF weighted log loss  CNN {r.cnn:.4f}  ->  LSTM {r.lstm:.4f}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, per_fold=True))
