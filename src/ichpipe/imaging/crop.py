"""The head crop (the 2nd place's autocrop): the head's bounding box in a windowed slice, the crop padded to a
centred square, and a map over the crop put back onto the slice's pixels."""

from __future__ import annotations

import cv2
import numpy as np


def crop_border(img: np.ndarray, rng: np.random.Generator, max_margin: float) -> np.ndarray:
    """Crop to the head's bounding box (pixels not black in any window) plus a random margin, then pad
    with black to a square, the box centred (the 2nd place's autocrop): the resize that follows keeps
    the head's proportions instead of stretching its shorter side.

    The margin on each side is drawn from [0, max_margin] x the box size (0: the tight box); an
    all-black image is returned as it is.
    """
    box = head_box(img, rng, max_margin)
    if box is None:
        return img
    r0, r1, c0, c1 = box
    return pad_to_square(img[r0:r1, c0:c1])


def head_box(img: np.ndarray, rng: np.random.Generator, max_margin: float) -> tuple[int, int, int, int] | None:
    """The rows and columns ``(r0, r1, c0, c1)`` that :func:`crop_border` keeps of ``img`` (None: all black)."""
    brightest = img[..., 0].copy()
    for k in range(1, img.shape[2]):  # channel by channel: 20x faster than img.max(axis=2) on (H, W, 3)
        np.maximum(brightest, img[..., k], out=brightest)
    mask = brightest > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = r1 - r0, c1 - c0
    m = rng.uniform(0, max_margin, 4)
    r0, r1 = max(0, int(r0 - m[0] * h)), min(img.shape[0], int(r1 + m[1] * h))
    c0, c1 = max(0, int(c0 - m[2] * w)), min(img.shape[1], int(c1 + m[3] * w))
    return r0, r1, c0, c1


def uncrop(heat: np.ndarray, box: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """A map over :func:`crop_border`'s square output (any size) back onto the pixels of the image it was cut from
    (``shape``; zero outside ``box``; with no box, the map resized to ``shape``)."""
    if box is None:
        return cv2.resize(heat, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    r0, r1, c0, c1 = box
    h, w = r1 - r0, c1 - c0
    side = max(h, w)
    square = cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros(shape, heat.dtype)
    out[r0:r1, c0:c1] = square[top:top + h, left:left + w]
    return out


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """(H, W, C) → (S, S, C), S = max(H, W): the image centred on black."""
    h, w = img.shape[:2]
    side = max(h, w)
    if h == w:
        return img
    out = np.zeros((side, side, *img.shape[2:]), img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = img
    return out
