#!/usr/bin/env python
"""A model bundle on labelled studies (ichpipe.stages.evaluate): the same as `python -m ichpipe evaluate`.

    python scripts/11_evaluate.py STUDIES --bundle data/runs/demo/bundle --labels STUDIES/reads.csv --out eval/

A research tool, not a medical device: not for diagnosis.
"""

import sys

from ichpipe.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
