"""Kaggle submission files: write them, validate them against the sample submission, upload them.

    python -m ichpipe.submission validate FILE --sample data/stage_2_sample_submission.csv
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.io import InputError, atomic_path, wide_to_long
from ichpipe.labels import LABELS

N_EXAMPLES = 5  # offending IDs named per failure message


class SubmissionError(InputError):
    """A submission that Kaggle would reject; ``problems`` holds one line per failed check."""

    def __init__(self, path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


def submission_csv(predictions: pd.DataFrame) -> str:
    """(image id × six labels) probabilities as the text of Kaggle's ``ID,Label`` CSV."""
    missing = [c for c in LABELS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack label columns {missing}")
    return wide_to_long(predictions).to_csv(index=False, float_format="%.6g")


def write_submission(predictions: pd.DataFrame | str, path: str | os.PathLike) -> Path:
    """Write (image id × six labels) probabilities, or their `submission_csv` text, as Kaggle's ``ID,Label``
    CSV (gzip if ``.gz``)."""
    path = Path(path)
    text = predictions if isinstance(predictions, str) else submission_csv(predictions)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wt", newline="") as f:
                f.write(text)
        else:
            tmp.write_text(text)
    return path


def _examples(ids) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:N_EXAMPLES])) + (" ..." if len(ids) > N_EXAMPLES else "")


def check_submission(path: str | os.PathLike, sample_path: str | os.PathLike) -> list[str]:
    """Every reason Kaggle would reject ``path`` (empty list: valid), one line each."""
    path, sample_path = Path(path), Path(sample_path)
    for p in (path, sample_path):
        if not p.exists():
            raise InputError(f"{p}: file not found")
    try:
        sub = pd.read_csv(path, dtype={"ID": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as exc:
        return [f"not a readable CSV ({str(exc).splitlines()[0]})"]
    try:
        sample = pd.read_csv(sample_path, dtype={"ID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise InputError(f"{sample_path}: the sample submission is not a readable CSV "
                         f"({str(exc).splitlines()[0]})") from None
    if "ID" not in sample.columns or sample.empty:
        raise InputError(f"{sample_path}: not a sample submission (needs an 'ID' column and rows; found "
                         f"{','.join(map(str, sample.columns))!r}, {len(sample)} rows)")
    problems: list[str] = []
    if list(sub.columns) != ["ID", "Label"]:
        return [f"header must be 'ID,Label', found {','.join(map(str, sub.columns))!r}"]
    dup = sub["ID"][sub["ID"].duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate IDs: {_examples(dup.unique())}")
    values = pd.to_numeric(sub["Label"], errors="coerce")
    nan = sub["ID"][values.isna()]
    if len(nan):
        problems.append(f"{len(nan)} empty, NaN or non-numeric labels: {_examples(nan)}")
    out = sub["ID"][(values < 0) | (values > 1) | np.isinf(values)]
    if len(out):
        problems.append(f"{len(out)} labels outside [0, 1]: {_examples(out)}")
    ids, expected = set(sub["ID"].dropna()), set(sample["ID"])
    missing = sorted(expected - ids)
    if missing:
        problems.append(f"{len(missing)} IDs of the sample submission are missing: {_examples(missing)}")
    extra = sorted(ids - expected)
    if extra:
        problems.append(f"{len(extra)} IDs are not in the sample submission: {_examples(extra)}")
    return problems


def validate_submission(path: str | os.PathLike, sample_path: str | os.PathLike) -> None:
    """Raise :class:`SubmissionError` listing every problem; return quietly if ``path`` is valid."""
    problems = check_submission(path, sample_path)
    if problems:
        raise SubmissionError(path, problems)


def kaggle_credentials(env: dict | None = None) -> str | None:
    """Where the official ``kaggle`` CLI would find an API token (never its value), or None.

    Same order as the CLI: ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` in the environment, else
    ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR``, ``~/.kaggle`` or ``$XDG_CONFIG_HOME/kaggle``.
    """
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "the KAGGLE_USERNAME and KAGGLE_KEY environment variables"
    home = Path(env.get("HOME") or Path.home())
    if env.get("KAGGLE_CONFIG_DIR"):
        candidates = [Path(env["KAGGLE_CONFIG_DIR"])]
    else:
        candidates = [home / ".kaggle", Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    for folder in candidates:
        if (folder / "kaggle.json").is_file():
            return str(folder / "kaggle.json")
    return None


NO_CREDENTIALS = ("no Kaggle API token: create one at kaggle.com > Settings > API > Create New Token and save "
                  "kaggle.json as ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY")


def kaggle_cli() -> str:
    """The ``kaggle`` executable, after checking that it has a token to use; else a one-line InputError (checked
    before anything is said to be uploading)."""
    if kaggle_credentials() is None:
        raise InputError(NO_CREDENTIALS)
    exe = shutil.which("kaggle") or shutil.which("kaggle", path=str(Path(sys.executable).parent))
    if exe is None:
        raise InputError("the kaggle CLI is not installed; run `make setup`")
    return exe


def submit_to_kaggle(path: str | os.PathLike, sample_path: str | os.PathLike, competition: str,
                     message: str) -> int:
    """Validate ``path``, then upload it with ``kaggle competitions submit``; returns the CLI's exit code.

    The CLI reads the token itself: this function only checks that one exists, and never reads,
    prints or copies it.
    """
    validate_submission(path, sample_path)
    exe = kaggle_cli()
    return subprocess.run([exe, "competitions", "submit", "-c", competition, "-f", str(path), "-m", message]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ichpipe.submission", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser("validate", help="check a submission CSV against the sample submission")
    val.add_argument("file")
    val.add_argument("--sample", required=True, help="stage_2_sample_submission.csv")
    args = parser.parse_args(argv)
    try:
        problems = check_submission(args.file, args.sample)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        for line in problems:
            print(f"invalid: {args.file}: {line}", file=sys.stderr)
        return 1
    print(f"valid: {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
