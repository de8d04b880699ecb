"""The model bundle's format and its reading (``make bundle`` writes one, ``predict`` and ``evaluate`` read it):
the manifest of sha256 sums checked on loading, a ``.tar.gz`` unpacked safely, every tensor file read with
``torch.load(weights_only=True)``. See ichpipe.bundle for what a bundle holds."""

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

from ichpipe.io import InputError, first_line, name_os_errors

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
    threshold: float
    recall: float | None  # the OOF recall it was chosen for; None: the class had no positive OOF slice (0.5)


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


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle directory (or its ``.tar.gz``) after checking every file against the manifest.

    A ``.tar.gz`` is unpacked into a temporary folder that the returned bundle owns (``close()``, or ``with``);
    a damaged, truncated or unsafe archive (a member outside the folder, a link) is a one-line InputError, and
    the temporary folder is removed on every way out."""
    path = Path(path)
    if not (path.is_file() and path.name.endswith(".tar.gz")):
        if path.is_file():
            raise InputError(f"{path}: not a model bundle (a bundle folder or its .tar.gz is expected)")
        return open_bundle_dir(path)
    target = Path(tempfile.mkdtemp(prefix="ichpipe_bundle_"))
    try:
        try:
            with tarfile.open(path) as tar, name_os_errors(target):
                tar.extractall(target, filter="data")  # no links or paths outside the folder
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


def open_bundle_dir(path: Path) -> Bundle:
    if not path.exists():
        raise InputError(f"{path}: bundle not found; make one with `make bundle`")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"{path}: not a model bundle (no {MANIFEST}); make one with `make bundle`")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{manifest_path}: not a readable manifest") from None
    for rel, digest in listed.items():
        file = path / rel
        if not file.is_file():
            raise InputError(f"{file}: listed in the bundle's manifest but missing")
        if sha256(file) != digest:
            raise InputError(f"{file}: changed since the bundle was made (sha256 differs from the manifest); "
                             f"refusing to load it")
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                   and p.name != MANIFEST and p.relative_to(path).as_posix() not in listed)
    if extra:
        raise InputError(f"{path / extra[0]}: not in the bundle's manifest; refusing to load it")
    raw = yaml.safe_load((path / "bundle.yaml").read_text())
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise InputError(f"{path}: bundle format {found}, this ichpipe reads format {FORMAT}")
    try:
        info = BundleInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{path / 'bundle.yaml'}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
    return Bundle(path, info)
