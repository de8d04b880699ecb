#!/usr/bin/env python
"""Upload a submission to Kaggle with the official CLI (`kaggle competitions submit`).

    python scripts/08_submit.py --config configs/demo/cpu_small.yaml [--file submissions/X.csv.gz]

Default file: the final-blend submission that the experiment's current stage-5 results name
(runs/<experiment>/blend/submissions.json under this data root), unchanged since (its sha256). A file edited after
ichpipe wrote it (its YAML's sha256 no longer matches) is refused. The message
names the experiment, the model, the OOF score and the git commit (from the YAML beside the file).
The file is validated first; the API token is read by the kaggle CLI only.
"""

import sys
from pathlib import Path

import yaml

from ichpipe.base.cli import stage_main
from ichpipe.base.paths import DataPaths
from ichpipe.scoring.submission import (
    check_unchanged,
    current_submission,
    info_path,
    kaggle_cli,
    submit_to_kaggle,
    validate_submission,
)


def add_arguments(parser):
    parser.add_argument("--file", help="the submission to upload (default: the experiment's newest)")


def run(cfg, args):
    path = Path(args.file) if args.file else current_submission(cfg)
    check_unchanged(path)  # a file edited after ichpipe wrote it is not uploaded under ichpipe's message
    beside = info_path(path)
    info = yaml.safe_load(beside.read_text()) if beside.exists() else {}
    cv = info.get("cv", {}).get("oof", {}).get("weighted")
    message = f"ichpipe {info.get('experiment', cfg.experiment)}: {info.get('model', 'submission')}" + (
        f", OOF {cv:.4f}" if cv is not None else "") + (
        f", git {info['git']['commit'][:10]}" if info.get("git", {}).get("commit") else "")
    sample = DataPaths(cfg.data.root).sample_submission_csv
    validate_submission(path, sample)  # before saying "uploading": a bad file is one error line, nothing else
    kaggle_cli()  # and a missing token or CLI too
    root = f" (data root {info['work_dir']})" if info.get("work_dir") else ""
    print(f"uploading {path}{root} to {cfg.blend.competition}: {message!r}")
    code = submit_to_kaggle(path, sample, cfg.blend.competition, message)
    if code:
        print(f"error: kaggle competitions submit exited with {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run, add_arguments))
