"""CT windows to uint8 channels.

A window (center c, width w) maps [c - w/2, c + w/2] linearly onto 0..255 and clips outside::

    value = rint(clip((hu - (c - w/2)) / w * 255, 0, 255))

Stored pixels are integers, so the pipeline windows through a lookup table indexed by stored
value, built from this same formula applied to the Hounsfield units of every stored value in the
slice's range: identical output, one table lookup per pixel instead of float maths per window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ichpipe.dicom import hounsfield

BRAIN, SUBDURAL, BONE_2ND, BONE_1ST = (40, 80), (80, 200), (40, 380), (600, 2800)


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 image of ``hu`` seen through the window (``center``, ``width``)."""
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) * (255.0 / width)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def window_lut(ds, lo: int, hi: int, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """(hi - lo + 1, n_windows) uint8 table: row ``v - lo`` is stored value ``v`` seen through each window."""
    hu = hounsfield(np.arange(lo, hi + 1, dtype=np.int64), ds)
    return np.stack([apply_window(hu, c, w) for c, w in windows], axis=-1)


def window_stored(stored: np.ndarray, ds, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """(H, W, n_windows) uint8 image of stored pixels, through the lookup table."""
    lo, hi = int(stored.min()), int(stored.max())
    lut = window_lut(ds, lo, hi, windows)
    return lut[stored.astype(np.int64) - lo] if lo else lut[stored]
