"""New CT studies as `predict` (and an evaluation) reads them: a folder or a zip of DICOM files grouped into
series, the usable ones (CT, axial, not a localiser) in z order, what was skipped and why, and a series' images
made exactly as stage 1 makes its PNGs."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichpipe.base.errors import InputError, first_line
from ichpipe.base.files import OUTPUT_MARKER, name_os_errors
from ichpipe.base.paths import neighbour_positions
from ichpipe.imaging.dicom import DicomError, as_dicom_error, quiet_reads, read_dataset, read_header, read_slice
from ichpipe.imaging.head import Interior, cranial_interior, why_not_a_head_image, why_not_a_head_part
from ichpipe.imaging.windowing import render_slice
from ichpipe.networks.bundle_format import BundlePreprocess


@dataclass
class Series:
    study: str
    series: str
    patient: str
    files: list[Path] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    z: list[float] = field(default_factory=list)
    body_part: str = ""  # BodyPartExamined of its first file ("" where the header has none)
    # per readable slice, what its bone encloses (ichpipe.imaging.head): filled by render_series
    interiors: list[Interior] = field(default_factory=list)

    def why_not_assessable(self) -> str | None:
        """Why this series is not a head CT the models can assess (None: it is), from its header's body part and,
        once render_series has read it, its images."""
        return why_not_a_head_part(self.body_part) or why_not_a_head_image(self.interiors)


# Bounds on a zip of studies, so that unpacking it cannot fill the disk: a member larger than MAX_MEMBER_BYTES unpacked
# is no CT slice (512 x 512 x 2 bytes is 0.5 MiB; a 2048-px multi-frame 8 MiB) and is left out, with a reason, after
# reading at most that much of it (a zip bomb's members claim small sizes, so the limits hold on the bytes actually
# written); a member that unpacks to more than MAX_ZIP_RATIO x its compressed size (DICOM compresses 2-5x) is left
# out the same way once past 1 MiB; the whole zip may unpack to at most MAX_ZIP_RATIO x its own size, and hold at
# most MAX_ZIP_MEMBERS members (a CT study is a few hundred files), and must fit the free disk by its own account.
MAX_MEMBER_BYTES = 64 << 20
MAX_ZIP_RATIO = 100
MAX_ZIP_MEMBERS = 200_000
_RATIO_FROM = 1 << 20  # the per-member ratio is checked past this many bytes (a small file may compress well)


def unzip_study(path: Path, workdir: Path, skipped: list[dict]) -> None:
    """Every member of the zip ``path`` into ``workdir``, one by one, streamed, within the bounds above: never outside
    ``workdir``; a member over a bound is not read further and goes to ``skipped``; a zip over a bound as a whole
    (members, total, the disk) is a one-line InputError."""
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise InputError(f"{path}: {len(members):,} members, more than {MAX_ZIP_MEMBERS:,}; not a zip of studies")
        claimed = sum(min(m.file_size, MAX_MEMBER_BYTES) for m in members)
        workdir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(workdir).free
        if claimed > free:
            raise InputError(f"{path}: unpacks to {claimed / 2**20:.0f} MiB, but {workdir.parent} has "
                             f"{free / 2**20:.0f} MiB free; set TMPDIR to a folder with more room")
        budget = MAX_ZIP_RATIO * max(path.stat().st_size, 1)
        for member in members:
            target = (workdir / member.filename).resolve()
            if member.is_dir() or not target.is_relative_to(workdir.resolve()):
                continue
            what = f"{path}:{member.filename}"
            if member.file_size > MAX_MEMBER_BYTES:
                skipped.append({"what": what, "reason": f"{member.file_size / 2**20:.0f} MiB unpacked, more than "
                                                        f"{MAX_MEMBER_BYTES >> 20} MiB: not a CT slice"})
                continue
            written, reason = _unpack_member(z, member, target, budget)
            budget -= written
            if reason:
                skipped.append({"what": what, "reason": reason})
            if budget < 0:
                raise InputError(f"{path}: unpacks to more than {MAX_ZIP_RATIO}x its own size; not a zip of studies "
                                 f"(a zip bomb?)")


def _unpack_member(z: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int) -> tuple[int, str]:
    """(bytes written, why it was left out or ""): one member streamed to ``target``, stopped (and removed) past
    :data:`MAX_MEMBER_BYTES`, past :data:`MAX_ZIP_RATIO` x its compressed size, or past the zip's ``budget``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = min(MAX_MEMBER_BYTES, budget)
    written, reason = 0, ""
    try:
        with z.open(member) as src, open(target, "wb") as dst, name_os_errors(target):
            while block := src.read(1 << 20):
                written += len(block)
                if written > limit:
                    reason = (f"more than {MAX_MEMBER_BYTES >> 20} MiB unpacked (its header says {member.file_size} "
                              f"bytes): not a CT slice")
                elif written > _RATIO_FROM and written > MAX_ZIP_RATIO * max(member.compress_size, 1):
                    reason = (f"unpacks to more than {MAX_ZIP_RATIO}x its compressed size ({member.compress_size} "
                              f"bytes): not a CT slice (a zip bomb?)")
                if reason:
                    break
                dst.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        # a damaged or encrypted member: that member's failure, not the study's
        reason = f"cannot be unpacked ({type(exc).__name__}: {first_line(exc, 160, '')})"
    if reason:
        target.unlink(missing_ok=True)
    else:  # the member's own time, as unzip keeps it: what a cache keyed by (size, time) sees on the next unpack
        stamp = time.mktime((*member.date_time, 0, 0, -1))
        os.utime(target, (stamp, stamp))
    return written, reason


def study_files(path: Path, workdir: Path, skipped: list[dict]) -> list[Path]:
    if path.is_file() and zipfile.is_zipfile(path):
        unzip_study(path, workdir, skipped)
        path = workdir
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: not found (give a folder or a zip of DICOM files)")
    # ichpipe's own outputs inside it (an earlier --out inside the study); the folder given is read whatever it is
    ours = {m.parent for m in path.rglob(OUTPUT_MARKER)} - {path}
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not ours.intersection(p.parents))


def why_not_axial_ct(ds) -> str | None:
    """Why a file's series is not a head CT axial series the models can read (None: it is)."""
    modality = str(ds.get("Modality", "CT") or "CT")
    if modality != "CT":
        return f"modality {modality}, not CT"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "a localiser/scout image, not an axial slice"
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.array([float(x) for x in iop[:3]]), np.array([float(x) for x in iop[3:]]))
        if abs(normal[2]) < 0.7:  # axial up to ~45 degrees of gantry tilt
            return "not axial (ImageOrientationPatient " + "\\".join(f"{float(x):g}" for x in iop) + ")"
    return None


def find_series(path: str | os.PathLike, workdir: Path, min_slices: int = 1) -> tuple[list[Series], list[dict]]:
    """The usable series under ``path`` in z order, and what was skipped (file or series, reason)."""
    skipped: list[dict] = []
    found: dict[tuple[str, str], Series] = {}
    rejected: dict[tuple[str, str], str] = {}
    for f in study_files(Path(path), workdir, skipped):
        try:
            with quiet_reads(), as_dicom_error():
                ds = read_dataset(f)
                row = read_header(f, ds)
                reason = why_not_axial_ct(ds)
        except DicomError as exc:
            skipped.append({"what": str(f), "reason": str(exc)})
            continue
        key = (row["StudyInstanceUID"], row["SeriesInstanceUID"])
        if reason:
            rejected.setdefault(key, reason)
            continue
        s = found.setdefault(key, Series(row["StudyInstanceUID"], row["SeriesInstanceUID"], row["PatientID"],
                                         body_part=str(ds.get("BodyPartExamined") or "")))
        if row["image_id"] in s.ids:  # the same slice twice (e.g. once compressed, once not): read it once
            skipped.append({"what": str(f), "reason": f"duplicate of SOPInstanceUID {row['image_id']} "
                                                      f"({s.files[s.ids.index(row['image_id'])].name})"})
            continue
        s.files.append(f)
        s.ids.append(row["image_id"])
        s.z.append(row["z"])
    for (study, series), reason in rejected.items():
        found.pop((study, series), None)
        skipped.append({"what": f"series {series} (study {study})", "reason": reason})
    kept = []
    for s in found.values():
        if len(s.files) < min_slices:
            skipped.append({"what": f"series {s.series} (study {s.study})",
                            "reason": f"{len(s.files)} slice(s), fewer than min_slices={min_slices}"})
            continue
        order = np.argsort(np.asarray(s.z), kind="stable")
        s.files, s.ids, s.z = [s.files[i] for i in order], [s.ids[i] for i in order], [s.z[i] for i in order]
        kept.append(s)
    return sorted(kept, key=lambda s: (s.study, s.series)), skipped


def render_series(s: Series, p: BundlePreprocess) -> tuple[np.ndarray, dict[int, str]]:
    """Stage 1's images of a series, in memory: (N, H, W, 3) uint8, exactly what its PNGs hold; and the
    positions of slices that could not be read (left out), with the reason of each. Sets ``s.interiors`` (what each
    readable slice's bone encloses) from the same reads."""
    windows = p.windows[:1] if p.mode == "2.5d" else p.windows
    images, bad, s.interiors = [], {}, []
    for i, f in enumerate(s.files):
        try:
            sl = read_slice(f)
            img = render_slice(sl, windows, p.size)
        except DicomError as exc:
            bad[i] = str(exc)
            continue
        images.append(img)
        spacing = sl.ds.get("PixelSpacing")
        s.interiors.append(cranial_interior(sl.hounsfield(), [float(v) for v in spacing] if spacing and len(spacing)
                                            == 2 else None))
    if p.mode == "2.5d":  # the brain window of slices s-1, s, s+1, as stage 1 stacks them
        brain = [img[..., 0] for img in images]
        before, after = neighbour_positions(len(brain), -1), neighbour_positions(len(brain), 1)
        images = [np.dstack([brain[before[k]], brain[k], brain[after[k]]]) for k in range(len(brain))]
    return (np.stack(images) if images else np.zeros((0, p.size, p.size, 3), np.uint8)), bad
