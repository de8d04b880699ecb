"""The model bundle's format and its reading (``make bundle`` writes one, ``predict`` and ``evaluate`` read it):
the manifest of sha256 sums checked on loading, a ``.tar.gz`` unpacked safely, every tensor file read with
``torch.load(weights_only=True)``. See ichpipe.stages.bundle for what a bundle holds."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ichpipe.base.errors import InputError, first_line, quote
from ichpipe.base.files import LOCK_FILE, OUTPUT_MARKER, name_os_errors
from ichpipe.base.yaml_io import load_yaml

FORMAT = 1


MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundlePreprocess(_Part):
    """Stage 1's settings the images are made with."""

    windows: list[list[float]]
    size: int
    mode: str


class BundleInput(_Part):
    """The network input as stage 3 made it: size, border crop, TTA views, batch."""

    image_size: int
    crop_border: bool
    tta: list[str]
    batch_size: int


class BundleBlend(_Part):
    epoch_weights: dict[int, float]
    fold_weights: dict[int, float]
    lstm_weight: float
    clip: float


class OperatingThreshold(_Part):
    """A class's operating points, chosen and measured on the experiment's OOF predictions by ``make_bundle``.

    ``threshold`` flags slices (a slice at or above it is drawn and listed) and rules the class out: a series whose
    highest slice is below it is reported absent. ``rule_in`` rules it in: a series whose highest slice is at or above
    it is reported present; in between, indeterminate. The figures are measured on the OOF series (a series
    positive when one of its slices is; flagged when its highest slice probability reaches the point). Bundles made
    before these were measured have None: nothing is then reported present."""

    threshold: float
    recall: float | None  # the OOF slice recall it was chosen for; None: the class had no positive OOF slice (0.5)
    series_sensitivity: float | None = None  # at ``threshold``
    series_specificity: float | None = None
    rule_in: float | None = None  # the lowest point (not below ``threshold``) with the specificity asked for
    rule_in_sensitivity: float | None = None
    rule_in_specificity: float | None = None
    series: int | None = None  # OOF series measured on
    positive_series: int | None = None


class SeriesCalibration(_Part):
    """Platt scaling of a series' highest slice probability: sigmoid(slope x logit(p) + intercept)."""

    slope: float
    intercept: float

    def apply(self, p: float) -> float:
        """The series-level probability of a series whose highest slice probability is ``p``."""
        q = min(max(p, 1e-6), 1 - 1e-6)
        return 1.0 / (1.0 + math.exp(-(self.slope * math.log(q / (1 - q)) + self.intercept)))


class BundleInfo(_Part):
    """``bundle.yaml``: what the models expect and how to combine them. Written by ``make_bundle``, checked field
    by field when a bundle is loaded."""

    format: int
    experiment: str
    created: Any  # ISO date and time (YAML may read it as a datetime)
    git: dict[str, Any]
    backbone: str
    fp16: bool
    preprocess: BundlePreprocess
    input: BundleInput
    folds: list[int]
    epochs: dict[int, list[int]]
    lstm: bool
    blend: BundleBlend
    prior: list[float]
    thresholds: dict[str, OperatingThreshold]
    series_calibration: dict[str, SeriesCalibration]
    cv: dict[str, dict[str, float | None]]
    config: dict[str, Any]  # the resolved config of the experiment

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False)


@dataclass
class Bundle:
    root: Path
    info: BundleInfo
    # removes the temporary folder a .tar.gz was unpacked into: once, at close(), collection or interpreter exit
    cleanup: weakref.finalize | None = None

    def close(self) -> None:
        """Remove the folder a ``.tar.gz`` bundle was unpacked into (a bundle folder has none)."""
        if self.cleanup is not None:
            self.cleanup()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def digest(self) -> str:
        """The bundle's sha256: of its manifest, which lists the sha256 of every file in it."""
        return sha256(self.root / MANIFEST)

    def cnn_path(self, fold: int, epoch: int) -> Path:
        return self.root / "cnn" / f"fold{fold}_epoch{epoch:02d}.pt"

    def lstm_path(self, fold: int, epoch: int) -> Path:
        return self.root / "lstm" / f"fold{fold}_epoch{epoch:02d}.pt"


# Bounds on a bundle archive, checked from its headers before anything is written: its members, the bytes they
# unpack to against the archive's own size (weights barely compress; a member of zeros 1000x), and the disk.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_RATIO = 20
MAX_MANIFEST_BYTES = 1 << 20


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle directory (or its ``.tar.gz``) after checking every file against the manifest.

    A ``.tar.gz`` is checked before anything is unpacked (:func:`_unpack_archive`: its members' count, names and
    sizes against the manifest inside it), then unpacked into a temporary folder that the returned bundle owns
    (``close()``, or ``with``); a damaged, truncated or unsafe archive is a one-line InputError, and the temporary
    folder is removed on every way out."""
    path = Path(path)
    if not (path.is_file() and path.name.endswith(".tar.gz")):
        if path.is_file():
            raise InputError(f"{path}: not a model bundle (a bundle folder or its .tar.gz is expected)")
        return open_bundle_dir(path)
    target = Path(tempfile.mkdtemp(prefix="ichpipe_bundle_"))
    try:
        try:
            with tarfile.open(path) as tar, name_os_errors(target):
                _unpack_archive(path, tar, target)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            reason = first_line(exc)
            raise InputError(f"{path}: not a readable bundle archive, truncated, damaged or unsafe "
                             f"({type(exc).__name__}: {reason}); make it again with `make bundle ... --archive`") \
                from None
        dirs = [p for p in target.iterdir() if p.is_dir()]
        if len(dirs) != 1:
            raise InputError(f"{path}: not a bundle archive (one folder expected inside)")
        bundle = open_bundle_dir(dirs[0])
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    bundle.cleanup = weakref.finalize(bundle, shutil.rmtree, target, True)
    return bundle


def _unpack_archive(path: Path, tar: tarfile.TarFile, target: Path) -> None:
    """The files of the bundle archive ``tar`` into ``target``, after reading only its headers (and its manifest)
    to check: at most :data:`MAX_ARCHIVE_MEMBERS` members, one top folder, plain files and folders only, every file
    named in the manifest, and their size within :data:`MAX_ARCHIVE_RATIO` x the archive's and the free disk."""
    members = []
    for member in tar:  # headers only: the data is read past, not written
        members.append(member)
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise InputError(f"{path}: more than {MAX_ARCHIVE_MEMBERS:,} members; not a model bundle")
    outside = [m.name for m in members if Path(m.name).is_absolute() or ".." in Path(m.name).parts]
    if outside:
        raise InputError(f"{path}: member {quote(outside[0])} lies outside the bundle's folder; refusing the archive "
                         f"(nothing was unpacked)")
    tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
    odd = [m.name for m in members if not (m.isfile() or m.isdir())]
    if len(tops) != 1 or odd:
        raise InputError(f"{path}: not a bundle archive ("
                         + (f"{quote(odd[0])} is a link or device" if odd else "one folder expected inside") + ")")
    top = tops.pop()
    files = {Path(m.name).relative_to(top).as_posix(): m for m in members if m.isfile()}
    manifest = files.get(MANIFEST)
    if manifest is None or manifest.size > MAX_MANIFEST_BYTES:
        raise InputError(f"{path}: no {MANIFEST} of at most {MAX_MANIFEST_BYTES >> 20} MiB inside; not a model bundle")
    listed = _manifest_files(tar.extractfile(manifest).read(), f"{path}:{manifest.name}")
    extra = sorted(set(files) - set(listed) - {MANIFEST})
    if extra:
        raise InputError(f"{path}: {quote(extra[0])} is not in the bundle's manifest; refusing to unpack it")
    total = sum(m.size for m in files.values())
    if total > MAX_ARCHIVE_RATIO * max(path.stat().st_size, 1):
        raise InputError(f"{path}: unpacks to {total / 2**20:.0f} MiB, more than {MAX_ARCHIVE_RATIO}x the archive's "
                         f"size; not a model bundle (an archive bomb?)")
    free = shutil.disk_usage(target).free
    if total > free:
        raise InputError(f"{path}: unpacks to {total / 2**20:.0f} MiB, but {target.parent} has {free / 2**20:.0f} MiB "
                         f"free; set TMPDIR to a folder with more room")
    tar.extractall(target, members=[m for m in members if m.isdir() or m in files.values()], filter="data")


def _manifest_files(text: bytes | str, where: Path | str) -> dict[str, str]:
    """The ``files`` of a manifest (relative name -> sha256); a name that is not a plain relative path inside the
    bundle (``../outside.txt``, ``/etc/x``) is a one-line InputError."""
    try:
        listed = json.loads(text)["files"]
        if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k,
                                                   v in listed.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(f"{where}: not a readable manifest") from None
    for rel in listed:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts or "\\" in rel or rel == MANIFEST:
            raise InputError(f"{where}: lists {quote(rel)}, which is not a file inside the bundle; refusing it")
    return listed


def open_bundle_dir(path: Path) -> Bundle:
    if not path.exists():
        raise InputError(f"{path}: bundle not found; make one with `make bundle`")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"{path}: not a model bundle (no {MANIFEST}); make one with `make bundle`")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InputError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a bundle's manifest")
    listed = _manifest_files(manifest_path.read_bytes(), manifest_path)
    for rel, digest in listed.items():
        file = path / rel
        if not file.is_file() or file.is_symlink():
            raise InputError(f"{file}: listed in the bundle's manifest but missing (or a link)")
        if sha256(file) != digest:
            raise InputError(f"{file}: changed since the bundle was made (sha256 differs from the manifest); "
                             f"refusing to load it")
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                   and p.name not in (MANIFEST, OUTPUT_MARKER, LOCK_FILE)
                   and p.relative_to(path).as_posix() not in listed)
    if extra:
        raise InputError(f"{path / extra[0]}: not in the bundle's manifest; refusing to load it")
    if "bundle.yaml" not in listed:
        raise InputError(f"{manifest_path}: does not list bundle.yaml; not a model bundle")
    raw = load_yaml((path / "bundle.yaml").read_text(encoding="utf-8", errors="replace"), str(path / "bundle.yaml"))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise InputError(f"{path}: bundle format {quote(found)}, this ichpipe reads format {FORMAT}")
    try:
        info = BundleInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{path / 'bundle.yaml'}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
    return Bundle(path, info)
