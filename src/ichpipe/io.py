"""File helpers shared by every stage: atomic writes and the competition's long ``ID,Label`` CSVs."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ichpipe.labels import LABELS, SUBTYPES

_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad input file; the message is one line naming the file and the problem."""


def first_line(exc: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first line of ``exc``'s message, cut at ``limit`` characters (pydicom, torch and pandas put whole tables
    and tracebacks after it); an empty message gives ``default`` (None: the exception's type name)."""
    lines = str(exc).splitlines()
    if not lines or not lines[0].strip():
        return type(exc).__name__ if default is None else default
    return lines[0][:limit]


def read_yaml_mapping(path: Path, error: type[Exception] | None = None) -> dict:
    """A YAML file whose top level is a mapping (an empty file: {}); else a one-line ``error`` (default
    InputError) naming the file."""
    error = error or InputError
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping")
    return data


@contextlib.contextmanager
def name_os_errors(path: Path, always: bool = False) -> Iterator[None]:
    """An OSError without a file name (a write onto a full disk names none), or any with ``always`` (one that
    names a temporary name), is raised again naming ``path``: the one-line error of the entry points then says
    which output could not be written."""
    try:
        yield
    except OSError as exc:
        if (always or exc.filename is None) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _temp_prefix(path: Path) -> str:
    """The start of a temporary name beside ``path``: hidden, and holding the writer's process id (see
    :func:`_writer_alive`)."""
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash (or a kill) leaves at most a stray ``.tmp`` file, never a half-written ``path``.
    The temporary name keeps the final suffix so that writers which dispatch on it (``.png``,
    ``.csv.gz``) behave as they would on the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with name_os_errors(path, always=True):  # named by the output asked for, not by the temporary name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with name_os_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it takes the place of ``path`` (whole) only if the block succeeds.

    A crash leaves the former ``path`` (or none) and no half-filled folder under its name; the staging folder a
    killed run left beside it is removed by the next one (its writer's process id is in its name: one whose
    process is gone on this machine).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a killed run's staging folder
        if stale.is_dir() and not _writer_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    with name_os_errors(path, always=True):  # named by the output asked for, not by the temporary name
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        with name_os_errors(path):
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_PID = re.compile(r"^\..+?\.(\d+)\.[^.]+\.tmp")


def _writer_alive(name: str) -> bool:
    """Whether the process that made the temporary file or folder ``name`` (its id is in the name) still runs
    on this machine; names without an id (older versions) count as left by a dead one."""
    m = _PID.match(name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def sweep_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when its process was killed mid-write
    (those of live processes stay). Returns how many were removed."""
    removed = 0
    for p in Path(folder).glob(".*.tmp*"):
        if p.is_file() and not _writer_alive(p.name):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically. The bytes are made in memory and written by Python: torch's own
    file writer reports a full disk as a RuntimeError naming no file, this as the OSError naming ``path`` that the
    entry points turn into one line."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_long_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ``ID,Label`` file (train labels, predictions, submissions) into long form.

    Returns columns ``ID`` (row id), ``image_id``, ``label`` and ``Label`` (float). Exact duplicate
    rows, which the real ``stage_2_train.csv`` contains, are dropped; the same row id with two
    different values is an error.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"ID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({first_line(exc)})") from None
    if list(df.columns) != ["ID", "Label"]:
        raise InputError(f"{path}: header must be 'ID,Label', found {','.join(map(str, df.columns))!r}")
    if df.empty:
        raise InputError(f"{path}: has no rows, only its header")
    df = df.drop_duplicates()
    dup = df["ID"].duplicated(keep=False)
    if dup.any():
        ids = ", ".join(df.loc[dup, "ID"].unique()[:5])
        raise InputError(f"{path}: {dup.sum()} rows give one ID two different labels, e.g. {ids}")
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any() or not parts[1].isin(LABELS).all():
        bad = df.loc[parts[1].isna() | ~parts[1].isin(LABELS), "ID"].head(5).tolist() if parts.shape[1] == 2 else df["ID"].head(5).tolist()
        raise InputError(f"{path}: IDs must be 'ID_<image>_<label>' with a competition label, e.g. {bad}")
    df["image_id"] = parts[0]
    df["label"] = parts[1]
    df["Label"] = pd.to_numeric(df["Label"], errors="coerce")
    return df.reset_index(drop=True)


def long_to_wide(df: pd.DataFrame, path: str | os.PathLike = "<labels>") -> pd.DataFrame:
    """Pivot long ``ID,Label`` rows to one row per image and one column per label (Kaggle order)."""
    wide = df.pivot(index="image_id", columns="label", values="Label")
    missing = [c for c in LABELS if c not in wide.columns]
    if missing or wide.isna().any().any():
        incomplete = wide.index[wide.reindex(columns=list(LABELS)).isna().any(axis=1)][:5].tolist()
        raise InputError(f"{path}: every image needs all six labels; incomplete images e.g. {incomplete}")
    wide = wide[list(LABELS)]
    wide.columns.name = None
    return wide


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Wide labels (image_id index, six columns) of an ``ID,Label`` truth file; a value other than 0 or 1 is
    an error naming an example (a 2, -1 or 0.5 would otherwise be trained on, or scored against)."""
    labels = long_to_wide(read_long_csv(path), path)
    found = non_binary_labels(labels)
    if found:
        n, image, column, value = found
        raise InputError(f"{path}: {n} images have a label that is not 0 or 1, e.g. {image}_{column}={value:g}")
    return labels


def non_binary_labels(wide: pd.DataFrame) -> tuple[int, str, str, float] | None:
    """(images with a label that is not 0 or 1 (NaN included), first such image, its column, its value) of
    a wide label frame indexed by image id; None when every label is 0 or 1."""
    values = wide[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(bad.any(axis=1).sum()), str(wide.index[row]), LABELS[col], float(values[row, col])


def wide_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """One row per image and label column → the ``ID,Label`` long form, six rows per image."""
    values = wide[list(LABELS)].to_numpy()
    ids = np.char.add(np.repeat(wide.index.to_numpy().astype(str), len(LABELS)),
                      np.tile(np.array([f"_{c}" for c in LABELS]), len(wide)))
    return pd.DataFrame({"ID": ids, "Label": values.reshape(-1)})


def read_png(path: str | os.PathLike) -> np.ndarray:
    """RGB (or greyscale) uint8 array of a PNG written by stage 1."""
    import cv2  # here: most users of this module read no image

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{path}: not a readable PNG")
    return img[..., ::-1] if img.ndim == 3 else img


def write_mask(path: Path, masks: dict[str, np.ndarray], labels: dict[str, int]) -> None:
    """A slice's bleed masks as one PNG (lossless, mostly zeros: a few KB): bit k where subtype k (``SUBTYPES``
    order) is, for the subtypes the slice is labelled with (the synthetic answer key's ``synthetic_masks/``)."""
    import cv2

    bits = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for k, sub in enumerate(SUBTYPES):
        if labels[sub]:
            bits |= masks[sub].astype(np.uint8) << k
    ok, png = cv2.imencode(".png", bits)
    if not ok:
        raise OSError(f"{path}: could not encode the mask")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())


def read_mask(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The boolean mask of each subtype (``SUBTYPES``) of a mask written by :func:`write_mask`."""
    import cv2

    bits = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bits is None:
        raise InputError(f"{path}: not a readable mask PNG")
    return {sub: (bits >> k & 1).astype(bool) for k, sub in enumerate(SUBTYPES)}
