"""File helpers shared by every stage: atomic writes and the competition's long ``ID,Label`` CSVs."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import reprlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ichpipe.labels import LABELS, SUBTYPES


class InputError(ValueError):
    """Bad input file; the message is one line naming the file and the problem."""


def first_line(exc: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first line of ``exc``'s message, cut at ``limit`` characters (pydicom, torch and pandas put whole tables
    and tracebacks after it); an empty message gives ``default`` (None: the exception's type name)."""
    lines = str(exc).splitlines()
    if not lines or not lines[0].strip():
        return type(exc).__name__ if default is None else default
    return lines[0][:limit]


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message: nested and long values abbreviated (reprlib: a few items a level, a few
    levels), never past ``limit`` characters, on one line; an aliased YAML value of billions of items costs nothing."""
    text = _REPR.repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40

# What one YAML document may hold once its aliases are expanded (the configs here hold a few hundred values): a
# 400-byte file of nested aliases expands to billions, which validation, a copy or an error message would build.
MAX_YAML_VALUES = 100_000
MAX_YAML_CHARS = 10_000_000


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that sets one key twice (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise _DuplicateKey(f"line {line}: key {quote(key)} is set twice in one mapping; say each "
                                            f"setting once")
                    seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """PyYAML's safe load of ``text``, refusing a key set twice in one mapping (a yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def bound_yaml(data, where: str, error: type[Exception] | None = None):
    """``data`` (a loaded YAML document) if it holds at most :data:`MAX_YAML_VALUES` values and
    :data:`MAX_YAML_CHARS` characters once its aliases are expanded, else a one-line ``error`` naming ``where``."""
    values, chars, stack = 0, 0, [data]
    while stack:  # every value as a reader would see it: an alias counts each time it appears
        value = stack.pop()
        values += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            chars += len(value)
        if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
            raise (error or InputError)(f"{where}: expands to more than {MAX_YAML_VALUES:,} values or "
                                        f"{MAX_YAML_CHARS:,} characters (nested aliases?); not a config")
    return data


def load_yaml(text: str, where: str, error: type[Exception] | None = None):
    """A YAML document from ``text`` (read from ``where``), safely (:func:`parse_yaml`, :func:`bound_yaml`); what
    is wrong with it is a one-line ``error`` (default InputError) naming ``where``."""
    error = error or InputError
    try:
        data = parse_yaml(text)
    except _DuplicateKey as exc:
        raise error(f"{where}, {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{where}: not valid YAML ({first_line(exc, 160)})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a config") from None
    return bound_yaml(data, where, error)


def read_yaml_mapping(path: Path, error: type[Exception] | None = None) -> dict:
    """A YAML file whose top level is a mapping (an empty file: {}), read by :func:`load_yaml`; else a one-line
    ``error`` (default InputError) naming the file."""
    error = error or InputError
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text (UTF-8) file; a config is YAML text") from None
    data = load_yaml(text, str(path), error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping")
    return data


def load_tensors(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only, never pickled code. A file
    that holds other objects, or is damaged, is a one-line InputError naming it (torch's own message runs to many
    lines and suggests loading it unsafely)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():  # torch refused an object it would have to unpickle
            raise InputError(f"{path}: holds pickled Python objects, not only weights; ichpipe never loads those "
                             f"(they could run code)") from None
        raise InputError(f"{path}: cannot be read as saved weights (UnpicklingError: {first_line(exc, 160)})") \
            from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line, whatever torch raised
        raise InputError(f"{path}: cannot be read as saved weights ({type(exc).__name__}: {first_line(exc, 160)})") \
            from None


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


def umask() -> int:
    """The process's umask (read, then set back: there is no other way to read it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with name_os_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


OUTPUT_MARKER = ".ichpipe-output"  # in every folder that atomic_dir writes: what may be replaced as a whole


def _write_marker(folder: Path, what: str, complete: bool) -> None:
    (folder / OUTPUT_MARKER).write_text(json.dumps({"written_by": "ichpipe", "what": what, "complete": complete}) + "\n")


def _marker(folder: Path) -> dict | None:
    """The marker of a folder that atomic_dir wrote (None: not one of ours)."""
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "ichpipe" else None


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), what: str = "the output"
                     ) -> None:
    """A one-line InputError unless the folder ``path`` may be replaced as a whole: it is not one of ``inputs`` and
    holds none of them, and it is absent, empty or one that ichpipe wrote (its marker file). Nothing a user put
    there, or reads from there, is ever deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; give {what} a folder (it is replaced as a whole)")
    out = path.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if src == out or src.is_relative_to(out):
            raise InputError(f"{path}: holds the input {source}; give {what} another folder (it is replaced as a "
                             f"whole, and the input must stay)")
    if path.is_dir() and _marker(path) is None and any(path.iterdir()):
        raise InputError(f"{path}: holds files ichpipe did not write (no {OUTPUT_MARKER} marker); give {what} a new "
                         f"or empty folder: it is replaced as a whole")


def _dead_siblings(path: Path, kind: str) -> list[Path]:
    """The staging (``kind`` "tmp") or set-aside ("old") folders of ``path`` whose writer is gone."""
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.{kind}")
            if p.is_dir() and _PID.match(p.name) and not _writer_alive(p.name)]


def recover_dir(path: Path) -> None:
    """Finish or undo what a writer killed during :func:`atomic_dir` left beside ``path``. Killed while swapping
    (``path`` missing): the new folder, whole, if it was complete, else the former one, go back under ``path``.
    Then the dead writers' staging folders (those with our marker, or empty) and set-aside folders are removed."""
    if not path.exists():
        whole = [p for p in _dead_siblings(path, "tmp") if (_marker(p) or {}).get("complete")]
        whole += _dead_siblings(path, "old")
        if whole:
            os.rename(whole[0], path)
    for p in _dead_siblings(path, "tmp"):
        if _marker(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # only an empty one: a folder of someone else's files stays
                p.rmdir()
    for p in _dead_siblings(path, "old"):  # a name only atomic_dir gives, to a folder of ours it set aside
        shutil.rmtree(p, ignore_errors=True)


def _swap_in(staged: Path, path: Path) -> None:
    """``staged`` becomes ``path``: the former folder is renamed aside, the new one renamed in, then the former one
    removed. A kill at any point leaves the former folder or the new one whole (:func:`recover_dir`)."""
    aside = None
    if path.exists():
        aside = path.with_name(staged.name.removesuffix(".tmp") + ".old")
        os.rename(path, aside)
    os.rename(staged, path)
    if aside is not None:
        shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), what: str = "the output"
               ) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; it takes the place of ``path`` (whole) only if the block succeeds.

    ``path`` must be absent, empty or a folder that ichpipe wrote (its :data:`OUTPUT_MARKER`), and must neither be
    nor hold one of ``inputs`` (:func:`check_output_dir`): checked before the block runs and again before the swap.
    A crash in the block leaves the former ``path`` (or none); a kill during the swap leaves the former or the new
    folder whole, and the next run puts it back and removes the dead writer's staging folder.
    """
    path = Path(path)
    inputs = list(inputs)
    check_output_dir(path, inputs, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    with name_os_errors(path, always=True):  # named by the output asked for, not by the temporary name
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        _write_marker(tmp, what, complete=False)
        with name_os_errors(path):
            yield tmp
            check_output_dir(path, inputs, what)
            _write_marker(tmp, what, complete=True)
            _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_PID = re.compile(r"^\..+?\.(\d+)\.[^.]+\.(?:tmp|old)")


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


LOCK_FILE = ".ichpipe.lock"


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``folder``'s write lock (``flock`` on its :data:`LOCK_FILE`) while the block runs: a second process that
    asks for it is refused at once with a one-line InputError naming the first (``what``, its process id), so two
    runs never mix one folder. The system releases the lock when the holder ends, however it ends."""
    import fcntl

    folder = Path(folder)
    with name_os_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    with name_os_errors(lock), open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(200).strip() or "another process"
            raise InputError(f"{folder}: {holder} is writing this folder; wait until it ends (or stop it), or "
                             f"write elsewhere (experiment=<new name>)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{what} (process {os.getpid()})\n")
        f.flush()
        yield


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, modification time in ns) of an input: what tells a rerun, or a cache, that the file was replaced."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


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
        raise InputError(f"{path}: header must be 'ID,Label', found {quote(','.join(map(str, df.columns)))}")
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
    values = pd.to_numeric(df["Label"], errors="coerce")
    text = values.isna() & df["Label"].notna()
    if text.any():
        row = df[text].iloc[0]
        raise InputError(f"{path}: {int(text.sum())} labels are not numbers, e.g. {row['ID']} = {quote(row['Label'])}")
    df["Label"] = values
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
    """Wide labels (image_id index, six columns) of an ``ID,Label`` truth file; a value other than 0 or 1, or a
    subtype of 1 with ``any`` 0, is an error naming an example (it would otherwise be trained on, or scored
    against)."""
    labels = long_to_wide(read_long_csv(path), path)
    found = non_binary_labels(labels)
    if found:
        n, image, column, value = found
        raise InputError(f"{path}: {n} images have a label that is not 0 or 1, e.g. {image}_{column}={value:g}")
    above = labels[list(SUBTYPES)].gt(labels["any"], axis=0)  # 'any' is 1 wherever a subtype is
    if above.any().any():
        image = above.index[above.any(axis=1)][0]
        sub = above.columns[above.loc[image].to_numpy()][0]
        raise InputError(f"{path}: {int(above.any(axis=1).sum())} images have a subtype labelled 1 but any = 0, e.g. "
                         f"{image}_{sub}=1 with {image}_any=0; 'any' must be 1 wherever a subtype is")
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
