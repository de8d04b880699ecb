"""Is a CT series a head? What ``predict`` checks before it reports anything: the header's body part where it has
one, and the image itself: on at least one slice, bone (the skull) that encloses a brain-sized interior of
brain-like tissue.

Per slice (:func:`cranial_interior`): bone is HU >= :data:`BONE_HU`, closed over gaps of :data:`CLOSE_MM` (sutures,
partial volume); its holes filled give what it encloses; the largest enclosed region's area, and the part of it at
brain-like HU (:data:`BRAIN_HU`: CSF, grey and white matter, blood), in mm^2. A head's widest slices enclose 9,000 to
13,000 mm^2 of such tissue (pydicom's real head CT slices: CQ500's 693 and the HEAD slice of
``J2K_pixelrep_mismatch``); a vertebra encloses its canal (CT_small: nothing closed at this size), an abdomen or neck
slice at most ~1,200 mm^2, an all-air series nothing. A series passes when one slice encloses at least
:data:`MIN_BRAIN_MM2` of brain-like tissue making at least :data:`MIN_BRAIN_SHARE` of its interior.

Known limits: a skull opened on every slice (a large craniectomy reaching the skull base) fails, and is reported
not assessable rather than guessed at; a closed bony ring around soft tissue elsewhere (a pelvis) could pass the image
check, which the body part in the header then catches when the scanner wrote one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

BONE_HU = 300.0
BRAIN_HU = (-15.0, 100.0)
CLOSE_MM = 3.0
MIN_BRAIN_MM2 = 3000.0
MIN_BRAIN_SHARE = 0.6
CHECK_PIXEL_MM = 1.0  # the check runs on the slice resampled to about this spacing (fast, and enough for areas)
HEAD_PARTS = ("HEAD", "BRAIN", "SKULL", "CRAN", "CEREB")  # BodyPartExamined values (or their start) of a head


@dataclass(frozen=True)
class Interior:
    """What the bone of one slice encloses: its largest enclosed region and the brain-like part of it, in mm^2."""

    area_mm2: float
    brain_mm2: float

    @property
    def share(self) -> float:
        return self.brain_mm2 / self.area_mm2 if self.area_mm2 else 0.0

    @property
    def is_cranial(self) -> bool:
        return self.brain_mm2 >= MIN_BRAIN_MM2 and self.share >= MIN_BRAIN_SHARE


def cranial_interior(hu: np.ndarray, spacing: tuple[float, float] | None) -> Interior:
    """The interior the bone of one slice (Hounsfield units, ``spacing`` its row and column spacing in mm; None: a
    250 mm field of view) encloses."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 2 or min(hu.shape) < 8:
        return Interior(0.0, 0.0)
    rows, cols = (float(s) for s in spacing) if spacing else (250.0 / hu.shape[0], 250.0 / hu.shape[1])
    scale = min(1.0, min(rows, cols) / CHECK_PIXEL_MM) if rows > 0 and cols > 0 else 1.0
    if scale < 1.0:  # resampled by area, so that HU means survive
        hu = cv2.resize(hu, (max(8, round(hu.shape[1] * scale)), max(8, round(hu.shape[0] * scale))),
                        interpolation=cv2.INTER_AREA)
        rows, cols = rows / scale, cols / scale
    pixel_mm2 = rows * cols
    bone = (hu >= BONE_HU).astype(np.uint8)
    r = max(1, round(CLOSE_MM / min(rows, cols)))
    closed = cv2.morphologyEx(bone, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,
                                                                                                 2 * r + 1)))
    inside = ndi.binary_fill_holes(closed) & ~closed.astype(bool)
    labels, n = ndi.label(inside)
    if n == 0:
        return Interior(0.0, 0.0)
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == 1 + int(np.argmax(sizes))
    brain = largest & (hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1])
    return Interior(float(largest.sum() * pixel_mm2), float(brain.sum() * pixel_mm2))


def why_not_a_head_image(interiors: list[Interior]) -> str | None:
    """Why a series' slices (their :func:`cranial_interior`) show no head (None: one slice does)."""
    if any(i.is_cranial for i in interiors):
        return None
    best = max(interiors, key=lambda i: i.brain_mm2, default=Interior(0.0, 0.0))
    return (f"no skull enclosing a brain-sized interior on any of its {len(interiors)} slice(s) (at most "
            f"{best.brain_mm2:,.0f} mm^2 of brain-like tissue enclosed by bone; a head shows at least "
            f"{MIN_BRAIN_MM2:,.0f}): not a head CT, or not one this check can read")


def why_not_a_head_part(body_part: str | None) -> str | None:
    """Why the header's BodyPartExamined says this is not a head (None: a head, or not recorded)."""
    part = str(body_part or "").strip().upper()
    if not part or any(part.startswith(h) or h in part for h in HEAD_PARTS):
        return None
    return f"BodyPartExamined {part}, not a head"
