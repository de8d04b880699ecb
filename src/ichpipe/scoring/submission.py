"""Kaggle submission files: write them, validate them against the sample submission, upload them.

    python -m ichpipe validate FILE --sample data/stage_2_sample_submission.csv
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ichpipe.base.config import Config
from ichpipe.base.errors import InputError, first_line, quote
from ichpipe.base.files import atomic_path, name_os_errors
from ichpipe.base.label_csv import read_long_csv, wide_to_long
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import blend_dir, data_paths
from ichpipe.scoring.results import SUBMISSIONS_FILE

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
        return [f"not a readable CSV ({first_line(exc)})"]
    try:
        sample = pd.read_csv(sample_path, dtype={"ID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise InputError(f"{sample_path}: the sample submission is not a readable CSV "
                         f"({first_line(exc)})") from None
    if "ID" not in sample.columns or sample.empty:
        raise InputError(f"{sample_path}: not a sample submission (needs an 'ID' column and rows; found "
                         f"{quote(','.join(map(str, sample.columns)))}, {len(sample)} rows)")
    problems: list[str] = []
    if list(sub.columns) != ["ID", "Label"]:
        return [f"header must be 'ID,Label', found {quote(','.join(map(str, sub.columns)))}"]
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


def info_path(submission: str | os.PathLike) -> Path:
    """The YAML written beside a submission (``X.csv.gz`` or ``X.csv`` -> ``X.yaml``)."""
    p = Path(submission)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".csv") + ".yaml")


def submissions_dir(cfg: Config) -> Path:
    """``blend.out_dir``: relative to the work folder (``data.work_dir``, else the data root) unless absolute."""
    out = Path(cfg.blend.out_dir)
    return out if out.is_absolute() else data_paths(cfg).work / out


@dataclass(frozen=True)
class Written:
    """A submission that :func:`write_checked` wrote (``new``) or found already written with the same text."""

    path: Path
    sha256: str  # of the CSV's text (before gzip), as its YAML records it
    new: bool


def text_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a submission's CSV text (gunzipped for ``.gz``), as :func:`write_checked` records it."""
    path = Path(path)
    digest = hashlib.sha256()
    with name_os_errors(path), (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: not a readable submission ({first_line(exc)})") from None
    return digest.hexdigest()


def check_unchanged(path: str | os.PathLike) -> None:
    """A one-line InputError when the YAML beside the submission ``path`` records another sha256 than its text has
    now (edited after stage 5 wrote it); a file without that YAML (the user's own) passes."""
    path = Path(path)
    beside = info_path(path)
    if not beside.exists():
        return
    try:
        info = yaml.safe_load(beside.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{beside}: not readable YAML ({first_line(exc)})") from None
    recorded = info.get("sha256") if isinstance(info, dict) else None
    if recorded and text_sha256(path) != recorded:
        raise InputError(f"{path}: changed since ichpipe wrote it (its sha256 differs from {beside.name}); run `make "
                         f"submission` again, or upload your edited file yourself with the kaggle CLI")


def write_checked(pred: pd.DataFrame, path: Path, sample: Path, info: dict) -> Written:
    """Write ``pred`` as a submission and ``info`` as the YAML beside it, together or not at all.

    Both go to temporary names; the submission must pass validation; then the YAML is renamed into
    place and the submission after it. A failure before (a NaN, a full disk) leaves neither; `make
    submit` only takes a submission whose YAML is there. The YAML records the sha256 of the CSV's
    text: when a complete submission of the same experiment and model with the same text is already
    in the folder (a rerun that changed nothing, the same day or another), that one is kept and returned and
    nothing is written.
    """
    text = submission_csv(pred)
    digest = hashlib.sha256(text.encode()).hexdigest()
    same = _same_submission(path.parent, info, digest)
    if same is not None:
        return Written(same, digest, False)
    with atomic_path(path) as tmp, atomic_path(info_path(path)) as tmp_info:
        write_submission(text, tmp)
        problems = check_submission(tmp, sample)
        if problems:
            raise SubmissionError(path, problems)
        tmp_info.write_text(yaml.safe_dump({**info, "sha256": digest}, sort_keys=False))
    return Written(path, digest, True)


def completed_submissions(out_dir: Path):
    """(YAML path, its contents, its submission) of every complete submission in ``out_dir``."""
    for p in sorted(out_dir.glob("*.yaml")) if out_dir.exists() else []:
        try:
            info = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, OSError):
            continue
        sub = p.with_name(str(info.get("file", "")))
        if isinstance(info, dict) and sub.is_file() and info_path(sub) == p:
            yield p, info, sub


def _same_submission(out_dir: Path, info: dict, digest: str) -> Path | None:
    if "experiment" not in info:
        return None
    for _, old, sub in completed_submissions(out_dir):
        if (old.get("experiment"), old.get("model"), old.get("work_dir"), old.get("sha256")) == (
                info["experiment"], info.get("model"), info.get("work_dir"), digest) and text_sha256(sub) == digest:
            return sub  # the same text, unedited since
    return None


def sweep_leftovers(out_dir: Path, experiment: str) -> None:
    """What a killed blend of ``experiment`` left: temporary files, and submissions without their YAML."""
    if not out_dir.exists():
        return
    for p in out_dir.glob(".*.tmp*"):
        if _experiment_of_name(p.name.lstrip(".").split(".tmp")[0]) == experiment:
            p.unlink(missing_ok=True)
    for p in out_dir.glob("*.csv.gz"):
        if _experiment_of_name(p.name) == experiment and not info_path(p).exists():
            p.unlink(missing_ok=True)


def _experiment_of_name(name: str) -> str | None:
    """``<date>_<experiment>[-cnn]_cv<score>.csv.gz[...]`` → experiment (None for other names)."""
    stem, sep, _ = name.rpartition("_cv")
    date, under, rest = stem.partition("_")
    if not sep or not under or len(date) != 10:
        return None
    return rest.removesuffix("-cnn")


def current_submission(cfg: Config) -> Path:
    """The final submission that the current results name (``submissions.json`` in the blend folder: the last
    blend's, whatever the files' dates), checked unchanged since; else a one-line error. For an ensemble's config
    (``ensemble.members`` set) the ensemble's final combiner, else the experiment's final blend."""
    ensemble = bool(cfg.ensemble.members)
    listing = blend_dir(cfg, cfg.ensemble.name if ensemble else None) / SUBMISSIONS_FILE
    model = "final" if ensemble else "blend"
    if not listing.exists():
        raise InputError(f"{listing}: not found; run `make {'ensemble' if ensemble else 'submission'}` first (data "
                         f"root {data_paths(cfg).work})")
    entry = json.loads(listing.read_text()).get(model)
    if not entry:
        raise InputError(f"{listing}: names no submission of {model!r}; run it again")
    path = Path(entry["file"])
    if not path.is_file():
        raise InputError(f"{path}: not found, though the current results ({listing.parent}) name it; make them again")
    if text_sha256(path) != entry["sha256"]:
        raise InputError(f"{path}: changed since ichpipe wrote it (sha256 differs from {listing}); make it again, or "
                         f"upload your edited file yourself with the kaggle CLI")
    return path


def fill_missing(pred: pd.DataFrame, sample_ids: pd.Index, fill: np.ndarray) -> tuple[pd.DataFrame, int]:
    """Predictions for every image of the sample submission; images without one get ``fill`` (the prior)."""
    out = pred.reindex(sample_ids)
    missing = ~sample_ids.isin(pred.index)  # a NaN prediction stays NaN: validation must refuse it
    out.loc[missing] = fill
    return out, int(missing.sum())


def sample_image_ids(paths) -> pd.Index:
    """The test images a submission must cover: those of the sample submission."""
    if not paths.sample_submission_csv.exists():
        raise InputError(f"{paths.sample_submission_csv}: not found; it lists the test images to predict")
    return pd.Index(read_long_csv(paths.sample_submission_csv).image_id.unique(), name="image_id")

