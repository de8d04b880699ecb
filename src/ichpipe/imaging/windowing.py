"""CT windows to uint8 channels.

A window (center c, width w) maps [c - w/2, c + w/2] linearly onto 0..255 and clips outside::

    value = rint(clip((hu - (c - w/2)) / w * 255, 0, 255))

Stored pixels are integers, so the pipeline windows through a lookup table indexed by stored
value, built from this same formula applied to the Hounsfield units of every stored value in the
slice's range: identical output, one table lookup per pixel instead of float maths per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ichpipe.imaging.dicom import DicomError, DicomSlice, hounsfield, read_slice

# The third channel: a soft-tissue window (40/380) as the 2nd place used, or the bone window (600/2800)
# of the 1st place.
BRAIN, SUBDURAL, SOFT_TISSUE, BONE = (40, 80), (80, 200), (40, 380), (600, 2800)


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 image of ``hu`` seen through the window (``center``, ``width``)."""
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) * (255.0 / width)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def window_lut(ds, lo: int, hi: int, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """(hi - lo + 1, n_windows) uint8 table: row ``v - lo`` is stored value ``v`` seen through each window."""
    hu = hounsfield(np.arange(lo, hi + 1, dtype=np.int64), ds)
    return np.stack([apply_window(hu, c, w) for c, w in windows], axis=-1)


MAX_LUT_ROWS = 1 << 17  # the stored values of 16-bit pixels, twice over; a wider range is windowed without a table


def window_stored(stored: np.ndarray, ds, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """(H, W, n_windows) uint8 image of stored pixels, through the lookup table.

    For three windows the table is packed as one uint32 per stored value (R, G, B, 0), so a single
    gather fills every channel, and OpenCV drops the fourth byte (measured: ~3x faster than one
    gather per channel, ~4x faster than indexing an (n, 3) table). Unsigned pixels index a table
    that starts at 0 and need no offset. The table is bounded by :data:`MAX_LUT_ROWS` (one 32-bit pixel of 5e7
    would make it GBs): pixels whose range is wider go through the same formula per pixel (memory bounded by the
    image, itself bounded by ichpipe.imaging.dicom).
    """
    lo, hi = min(int(stored.min()), 0), int(stored.max())
    if hi - lo + 1 > MAX_LUT_ROWS:
        hu = hounsfield(stored, ds)
        return np.stack([apply_window(hu, c, w) for c, w in windows], axis=-1)
    lut = window_lut(ds, lo, hi, windows)
    idx = stored.astype(np.int32) - lo if lo else stored
    if len(windows) == 3:
        packed = np.zeros((len(lut), 4), dtype=np.uint8)
        packed[:, :3] = lut
        rgba = np.take(packed.view(np.uint32).ravel(), idx).view(np.uint8).reshape(*stored.shape, 4)
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    out = np.empty((*stored.shape, len(windows)), dtype=np.uint8)
    for i in range(len(windows)):
        np.take(np.ascontiguousarray(lut[:, i]), idx, out=out[..., i])
    return out


def resize_to(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def render_file(path: Path, windows, size: int) -> tuple[dict, np.ndarray]:
    """(metadata row, windowed uint8 image at ``size``) of one DICOM, read once."""
    sl = read_slice(path)
    return sl.meta, render_slice(sl, windows, size)


def render_slice(sl: DicomSlice, windows, size: int) -> np.ndarray:
    """The windowed uint8 image at ``size`` of one slice read by ``read_slice``."""
    try:
        img = window_stored(sl.stored, sl.ds, windows)
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # e.g. stored values far outside the type
        raise DicomError(f"pixel values cannot be windowed ({type(exc).__name__}: {str(exc)[:160]})") from None
    return resize_to(img, size)
