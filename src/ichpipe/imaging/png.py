"""PNG files of the pipeline: stage 1's windowed slices and the synthetic answer key's bleed masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path
from ichpipe.base.labels import SUBTYPES


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
