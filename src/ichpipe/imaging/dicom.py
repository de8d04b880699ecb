"""Reading competition DICOMs: header fields, pixels and Hounsfield units, with the known quirks fixed.

- HU = stored · RescaleSlope + RescaleIntercept (pydicom's modality LUT), except for the real data's
  broken 12-bit files (BitsStored 12, PixelRepresentation 0, RescaleIntercept > -100) whose values
  are HU wrapped into 12 bits: add 1000, subtract 4096 from values ≥ 4096, use intercept -1000.
- WindowCenter/WindowWidth may be multi-valued: the first value is used.
- Slice position is ImagePositionPatient projected on the slice normal (z for axial series).
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import RE_VALID_UID

from ichpipe.base.errors import first_line, quote

REQUIRED_TAGS = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                 "ImagePositionPatient", "Rows", "Columns")


@contextlib.contextmanager
def quiet_reads():
    """Kaggle's "ID_<hex>" UIDs are not valid DICOM UIDs: read without pydicom's warnings and logs."""
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class DicomError(ValueError):
    """A file that cannot be used; the message is the one-line reason for the bad-files report."""


def first_value(value, default=None):
    """First element of a multi-valued DICOM element (or the value itself), as float."""
    if value is None or value == "":
        return default
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        value = value[0] if len(value) else default
    return float(value) if value is not None else default


def needs_12bit_fix(ds) -> bool:
    """The real data's broken files: unsigned 12-bit with an intercept far above -1000.

    Only for CT (or files without Modality): an MR or other image stored as unsigned 12-bit with
    intercept 0 is ordinary, and is left exactly as pydicom's modality LUT gives it.
    """
    return (int(ds.get("BitsStored", 16)) == 12 and int(ds.get("PixelRepresentation", 0)) == 0
            and first_value(ds.get("RescaleIntercept"), 0.0) > -100 and ds.get("Modality", "CT") == "CT")


def hounsfield(stored: np.ndarray, ds) -> np.ndarray:
    """Hounsfield units (float64) of stored pixel values of ``ds``; applies the 12-bit fix."""
    slope = first_value(ds.get("RescaleSlope"), 1.0)
    intercept = first_value(ds.get("RescaleIntercept"), 0.0)
    px = np.asarray(stored)
    if needs_12bit_fix(ds):
        px = px.astype(np.int32) + 1000
        px = np.where(px >= 4096, px - 4096, px)
        intercept = -1000.0
    return px * slope + intercept


def slice_position(ds) -> float:
    """Position along the slice normal (mm): z for an axial series, correct for tilted ones too."""
    ipp = np.array([float(x) for x in ds.ImagePositionPatient], dtype=np.float64)
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return float(ipp[2])
    row, col = np.array([float(x) for x in iop[:3]]), np.array([float(x) for x in iop[3:]])
    normal = np.cross(row, col)
    return float(ipp @ normal) if np.linalg.norm(normal) > 0.5 else float(ipp[2])


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


def _native_pixels(ds) -> np.ndarray | None:
    """Stored pixels of an uncompressed little-endian 16-bit slice straight from the buffer.

    Identical to ``ds.pixel_array`` in the cases it accepts (unsigned values are masked to
    BitsStored as pydicom does; signed ones only when all 16 bits are used) and ~40x faster;
    returns None for anything else, which then goes through pydicom's decoders.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE:
        return None
    bits_allocated, bits_stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits_allocated != 16 or (signed and bits_stored != 16) or not 0 < bits_stored <= 16:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * cols * 2:
        raise ValueError(f"The number of bytes of pixel data is less than expected ({len(data)} vs "
                         f"{rows * cols * 2} bytes)")
    px = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if not signed and bits_stored < 16:
        px = px & np.uint16((1 << bits_stored) - 1)
    return px


@dataclass
class DicomSlice:
    """One slice: its stored pixels and the header fields the pipeline uses."""

    image_id: str
    stored: np.ndarray
    meta: dict
    ds: pydicom.Dataset

    def hounsfield(self) -> np.ndarray:
        return hounsfield(self.stored, self.ds)


@contextlib.contextmanager
def as_dicom_error():
    """Whatever a damaged file makes pydicom or numpy raise (ValueError on a non-numeric DS, struct.error
    on a header cut short, pydicom's BytesLengthException, ...) becomes a DicomError naming it: a
    per-file failure belongs in the bad-files report, never in a traceback that stops the stage."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one file's bytes is that file's failure
        reason = first_line(exc, default="")
        raise DicomError(f"damaged DICOM ({type(exc).__name__}: {reason})") from None


def read_header(path: str | os.PathLike, ds=None) -> dict:
    """The metadata row of one file (header only unless ``ds`` is given)."""
    with quiet_reads(), as_dicom_error():  # values are validated lazily, on access: keep the whole read quiet
        return _read_header(path, ds)


# Bounds checked before anything the size of an image is allocated: a CT slice is 512 x 512 x 2 bytes (0.5 MiB); a
# file, an inflated (deflate transfer syntax) data set or the pixel data its header claims above these is no CT slice.
MAX_FILE_BYTES = 64 << 20
MAX_SIDE = 4096  # Rows and Columns
MAX_PIXEL_BYTES = 64 << 20  # Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8
DEFLATED = "1.2.840.10008.1.2.1.99"


def read_dataset(path: str | os.PathLike, pixels: bool = False):
    """pydicom's dataset of one file (header only unless ``pixels``; the pixel data is read, never decoded, here).

    A file that is no DICOM, or that exceeds a bound (:data:`MAX_FILE_BYTES` on disk or inflated, :data:`MAX_SIDE`,
    :data:`MAX_PIXEL_BYTES` claimed by its header), is a DicomError, found before its pixels take any memory."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise DicomError(f"{size / 2**20:.0f} MiB, more than {MAX_FILE_BYTES >> 20} MiB: not a CT slice")
        with open(path, "rb") as f:  # (0002,0010) TransferSyntaxUID stands in the first few hundred bytes
            deflated = DEFLATED.encode() in f.read(4096)
        if deflated:  # rare: parse the file meta group (the cost of a header read) only then
            meta = pydicom.filereader.read_file_meta_info(path)
            if str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
                _check_inflated_size(path, meta)
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise DicomError(f"not a readable DICOM file ({type(exc).__name__}: {first_line(exc, default='')})") from None
    with as_dicom_error():
        check_pixel_bounds(ds)
    return ds


def _check_inflated_size(path: str | os.PathLike, meta) -> None:
    """Inflate a deflated data set in 1 MiB steps, counting (pydicom inflates it whole, in memory): more than
    :data:`MAX_FILE_BYTES` is a DicomError."""
    length = meta.get("FileMetaInformationGroupLength")
    if length is None:
        raise DicomError("deflated data set without FileMetaInformationGroupLength: cannot be bounded before inflating")
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as f:
        f.seek(128 + 4 + 12 + int(length))  # preamble, "DICM", the (0002,0000) element, the rest of group 2
        try:
            while block := f.read(1 << 20):
                while block:
                    total += len(inflater.decompress(block, 1 << 20))
                    if total > MAX_FILE_BYTES:
                        raise DicomError(f"the deflated data set inflates to more than {MAX_FILE_BYTES >> 20} MiB: "
                                         f"not a CT slice")
                    block = inflater.unconsumed_tail
        except zlib.error as exc:
            raise DicomError(f"deflated data set cannot be inflated ({first_line(exc)})") from None


def check_pixel_bounds(ds) -> None:
    """A DicomError when the pixel data the header claims is larger than a CT slice can be (:data:`MAX_SIDE`,
    :data:`MAX_PIXEL_BYTES`), whatever the transfer syntax: checked before any decoder allocates it; and when
    uncompressed pixel data is longer than the header says (the image would be read sheared)."""
    if "Rows" not in ds or "Columns" not in ds:
        return  # the required-tags check names them
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise DicomError(f"Rows x Columns {rows}x{cols}: not 1 to {MAX_SIDE} pixels a side, not a CT slice")
    claimed = rows * cols * frames * samples * -(-bits // 8)
    if not 0 < claimed <= MAX_PIXEL_BYTES or not 0 < bits <= 64:
        raise DicomError(f"pixel data of {rows}x{cols}x{frames} frame(s)x{samples} sample(s)x{bits} bits: more than "
                         f"{MAX_PIXEL_BYTES >> 20} MiB, not a CT slice")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and bits % 8 == 0 and (syntax is None or not pydicom.uid.UID(syntax).is_compressed):
        found, expected = len(ds.PixelData), rows * cols * frames * samples * bits // 8
        if found > expected + expected % 2:  # an odd length is padded to even
            raise DicomError(f"PixelData holds {found} bytes, but Rows x Columns x BitsAllocated say {expected}: not "
                             f"this image's pixels (it would be read sheared)")


# Every numeric header field the pipeline reads: (values it must have, or None for any number of them, the
# plausible closed range of each value, whether the field is required). A value outside (NaN and infinity
# included) makes the file a bad one, named in the bad-files report (stage 1) or skipped.csv (predict): a NaN
# slope would otherwise give an all-black image that is trained on or predicted from.
NUMERIC_FIELDS = {
    "RescaleSlope": (1, (1e-6, 1e3), False),  # HU = stored x slope + intercept: CT uses 1 (rarely 0.5-2)
    "RescaleIntercept": (1, (-1e4, 1e4), False),  # -1024, -1000, 0, -3024 on CT
    "PixelSpacing": (2, (1e-3, 50.0), False),  # mm; head CT 0.4-1
    "ImagePositionPatient": (3, (-1e5, 1e5), True),  # mm
    "ImageOrientationPatient": (6, (-1.01, 1.01), False),  # direction cosines
    "WindowCenter": (None, (-1e5, 1e5), False),
    "WindowWidth": (None, (1e-6, 1e6), False),  # the standard: at least 1
}


def check_numeric_fields(ds) -> None:
    """A DicomError naming the first numeric field of :data:`NUMERIC_FIELDS` that is not a finite, plausible
    number (or has the wrong number of values); absent optional fields pass."""
    for name, (count, (low, high), required) in NUMERIC_FIELDS.items():
        value = ds.get(name)
        if value is None or value == "":
            if required:
                raise DicomError(f"{name} is empty")
            continue
        values = list(value) if isinstance(value, (pydicom.multival.MultiValue, list, tuple)) else [value]
        if count is not None and len(values) != count:
            raise DicomError(f"{name} has {len(values)} value(s), expected {count}")
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise DicomError(f"{name} is not numeric ({quote(value)})") from None
        bad = [v for v in numbers if not (math.isfinite(v) and low <= v <= high)]
        if bad or not numbers:
            raise DicomError(f"{name} = {bad[0] if bad else 'empty'} is not a finite number in [{low:g}, {high:g}]")


def _read_header(path, ds) -> dict:
    if ds is None:
        ds = read_dataset(path)
    missing = [t for t in REQUIRED_TAGS if t not in ds]
    if missing:
        raise DicomError(f"missing required tag(s) {', '.join(missing)}")
    check_numeric_fields(ds)
    try:
        z = slice_position(ds)
    except (ValueError, TypeError) as exc:
        raise DicomError(f"bad ImagePositionPatient/ImageOrientationPatient ({exc})") from None
    spacing = ds.get("PixelSpacing")
    return {
        "image_id": str(ds.SOPInstanceUID),
        "PatientID": str(ds.PatientID),
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "z": z,
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "pixel_spacing": first_value(spacing, np.nan),
        "window_center": first_value(ds.get("WindowCenter"), np.nan),
        "window_width": first_value(ds.get("WindowWidth"), np.nan),
        "multivalue_window": isinstance(ds.get("WindowCenter"), pydicom.multival.MultiValue),
        "fixed_12bit": needs_12bit_fix(ds),
    }


def read_slice(path: str | os.PathLike) -> DicomSlice:
    """Read one file once (header and pixels); raise :class:`DicomError` naming what is wrong."""
    with quiet_reads(), as_dicom_error():
        sl = _read_slice(path)
        # the rescale and window values are parsed lazily: parse them here, inside the error handling
        for key in ("RescaleSlope", "RescaleIntercept"):
            first_value(sl.ds.get(key), 0.0)
        return sl


def _read_slice(path) -> DicomSlice:
    ds = read_dataset(path, pixels=True)  # bounded before its pixels are decoded
    if "PixelData" not in ds:
        raise DicomError("not an image: no PixelData")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError("not a single-frame greyscale image")
    meta = read_header(path, ds)
    try:
        stored = _native_pixels(ds)
        if stored is None:
            stored = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        reason = first_line(exc)
        raise DicomError(f"pixel data cannot be decoded: {reason}") from None
    if stored.shape != (meta["rows"], meta["cols"]):
        raise DicomError(f"pixel array {stored.shape} does not match Rows x Columns {meta['rows']}x{meta['cols']}")
    return DicomSlice(meta["image_id"], stored, meta, ds)


def as_valid_uid(uid: str) -> str:
    """``uid`` where it is a valid DICOM UID; otherwise (the competition's ``ID_<hex>``, the synthetic set's) the UID
    that stands for it in what ichpipe writes: ``2.25.`` and the integer of the name-based UUID (version 5, OID
    namespace) of ``ichpipe:<uid>``, so that the same source UID always maps to the same valid one."""
    uid = str(uid)
    if len(uid) <= 64 and RE_VALID_UID.match(uid):
        return uid
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'ichpipe:' + uid).int}"


UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def with_valid_uids(ds):
    """``ds`` (changed in place, and returned) with its study, series, instance and frame-of-reference UIDs valid
    (:func:`as_valid_uid`): what an output that cites it may copy."""
    for keyword in UID_KEYWORDS:
        if keyword in ds:
            setattr(ds, keyword, as_valid_uid(ds.get(keyword)))
    return ds
