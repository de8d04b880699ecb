#!/usr/bin/env python
"""Stage 4 under the name users know: the same as scripts/04_lstm_train.py (same arguments, same outputs).

    python scripts/lstm_train.py [--config configs/demo/cpu_small.yaml] fold=0 [lstm.epochs=20]
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).with_name("04_lstm_train.py"))
    runpy.run_path(sys.argv[0], run_name="__main__")
