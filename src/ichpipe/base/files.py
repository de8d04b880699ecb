"""Files written so that nothing half-written is ever left, nothing of the user's is ever deleted, and no two
processes write one folder: atomic files and folders, output-folder ownership, write locks, the temporary files a
killed writer left, inputs' stamps, weights saved and loaded without pickled code."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ichpipe.base.errors import InputError, first_line


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
    (folder / OUTPUT_MARKER).write_text(json.dumps({"written_by": "ichpipe", "what": what,
                                                    "complete": complete}) + "\n")


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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
