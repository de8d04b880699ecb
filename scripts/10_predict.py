#!/usr/bin/env python
"""A model bundle on new CT studies (ichpipe.stages.predict): the same as `python -m ichpipe predict`.

    python scripts/10_predict.py STUDY --bundle data/runs/demo/bundle --out predictions [--dicom-sr] [--dicom-sc]
    python scripts/10_predict.py --kaggle DATA_DIR --bundle B --out submission.csv.gz

A research tool, not a medical device: not for diagnosis.
"""

import sys

from ichpipe.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
