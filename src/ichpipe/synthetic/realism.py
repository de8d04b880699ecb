"""How much a head-CT slice looks like real CT: the measures the synthetic set is held to.

Every function takes a slice in Hounsfield units (and its pixel size), so the same code measures a
synthetic slice and a real one (``tests/synthetic/test_synthetic.py`` compares them with pydicom-data's real
head slices; ``make synthetic`` prints them for the set it wrote):

- ``shortcut_score``: the share of head pixels at 55-90 HU, a one-line "bleed detector". On a set
  where it separates bleeding from normal slices, a model need learn nothing a real scan needs.
- ``histogram_shares``: shares of head pixels at 20..50 HU (brain) and above 300 HU (bone).
- ``hyperdense_share``: intracranial pixels above 60 HU that are not blood (falx, calcifications,
  partial-volume bone, sinuses): 0 on a phantom where only blood is bright.
- ``noise_correlation``: correlation of horizontally neighbouring noise values in the brain
  (0 for white noise; filtered back-projection gives ~0.6).
- ``edge_width_mm``: 10-90 % rise of the brain-to-inner-table edge, median over rays.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

SHORTCUT_HU = (55.0, 90.0)


def head_mask(hu: np.ndarray) -> np.ndarray:
    """The head: the largest connected region above -300 HU, holes (sinuses, air cells) filled."""
    body = (hu > -300).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    if n <= 1:
        return np.zeros(hu.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return fill_holes(labels == largest)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses filled (a flood fill of the background from the border)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    cv2.floodFill(padded, None, (0, 0), 2)
    return padded[1:-1, 1:-1] != 2


def intracranial_mask(hu: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
    """Inside the skull: the holes of the bone (> 300 HU) ring (partial-volume pixels next to it included)."""
    head = head_mask(hu) if head is None else head
    bone = (hu > 300) & head
    return fill_holes(bone) & ~bone


def shortcut_score(hu: np.ndarray) -> float:
    """Share of the head's pixels at 55-90 HU."""
    head = head_mask(hu)
    if not head.any():
        return 0.0
    values = hu[head]
    return float(((values >= SHORTCUT_HU[0]) & (values <= SHORTCUT_HU[1])).mean())


def histogram_shares(hu: np.ndarray) -> dict[str, float]:
    head = head_mask(hu)
    values = hu[head]
    if not len(values):
        return {"brain_20_50": 0.0, "bone_300": 0.0}
    return {"brain_20_50": float(((values >= 20) & (values <= 50)).mean()), "bone_300": float((values > 300).mean())}


def hyperdense_share(hu: np.ndarray, blood: np.ndarray | None = None) -> float:
    """Share of intracranial pixels above 60 HU outside the blood (dilated by 3 pixels)."""
    cavity = intracranial_mask(hu)
    if blood is not None and blood.any():
        cavity &= ~ndimage.binary_dilation(blood, iterations=3)
    if not cavity.any():
        return 0.0
    return float((hu[cavity] > 60).mean())


def noise_correlation(hu: np.ndarray) -> float:
    """Correlation of horizontal neighbours of the high-pass residual in brain-density pixels."""
    cavity = ndimage.binary_erosion(intracranial_mask(hu), iterations=3)
    smooth = cv2.GaussianBlur(hu.astype(np.float32), (0, 0), 4.0)
    region = cavity & (smooth > 15) & (smooth < 50)
    region = ndimage.binary_erosion(region, iterations=4)
    resid = hu.astype(np.float32) - smooth
    pair = region[:, :-1] & region[:, 1:]
    if pair.sum() < 200:
        return float("nan")
    a, b = resid[:, :-1][pair], resid[:, 1:][pair]
    return float(np.corrcoef(a, b)[0, 1])


def edge_width_mm(hu: np.ndarray, pixel_mm: float, n_rays: int = 90) -> float:
    """Median 10-90 % width (mm) of the rise from brain to the inner table along rays from the centre."""
    cavity = intracranial_mask(hu)
    if cavity.sum() < 1000:
        return float("nan")
    cy, cx = ndimage.center_of_mass(cavity)
    step = 0.25  # pixels
    radius = np.arange(0, hu.shape[0] / 2, step)
    widths = []
    for ang in np.linspace(0, 2 * np.pi, n_rays, endpoint=False):
        ys, xs = cy + radius * np.sin(ang), cx + radius * np.cos(ang)
        ok = (ys >= 0) & (ys < hu.shape[0] - 1) & (xs >= 0) & (xs < hu.shape[1] - 1)
        prof = ndimage.map_coordinates(hu.astype(np.float32), [ys[ok], xs[ok]], order=1)
        above = np.flatnonzero(prof > 400)
        if not len(above) or above[0] < 40:
            continue
        k = above[0]
        peak_at = k + int(np.argmax(prof[k:k + int(6 / (pixel_mm * step))]))
        brain = float(np.median(prof[max(0, k - int(12 / (pixel_mm * step))):k - int(4 / (pixel_mm * step))]))
        peak = float(prof[peak_at])
        if not (0 < brain < 60) or peak < 500:
            continue
        lo, hi = brain + 0.1 * (peak - brain), brain + 0.9 * (peak - brain)
        seg = prof[:peak_at + 1]
        i10 = np.flatnonzero(seg < lo)
        i90 = np.flatnonzero(seg < hi)
        if not len(i10) or not len(i90):
            continue
        widths.append((i90[-1] - i10[-1]) * step * pixel_mm)
    return float(np.median(widths)) if len(widths) >= 10 else float("nan")


def slice_measures(hu: np.ndarray, pixel_mm: float, blood: np.ndarray | None = None) -> dict[str, float]:
    """Every measure above for one (mid-series) slice."""
    return {**histogram_shares(hu), "hyperdense_non_blood": hyperdense_share(hu, blood),
            "noise_correlation": noise_correlation(hu), "edge_width_mm": edge_width_mm(hu, pixel_mm)}


# The targets the default synthetic set is held to (issue 12); `make synthetic` prints them.
TARGETS = {
    "shortcut_auc_any": (0.0, 0.75), "brain_20_50": (0.30, 0.50), "bone_300": (0.10, 0.30),
    "hyperdense_non_blood": (0.01, 0.05), "noise_correlation": (0.4, 0.8), "edge_width_mm": (1.0, 2.5),
}
MEASURES = ("brain_20_50", "bone_300", "hyperdense_non_blood", "noise_correlation", "edge_width_mm")


def set_summary(table) -> dict[str, float]:
    """The set's figures against ``TARGETS``: the 55-90 HU rule's AUC for ``any`` on the train slices,
    and the median of each measure over the series' mid slices (columns written by the generator)."""
    from ichpipe.scoring.metrics import auc_or_nan  # here: the generator's workers need no scikit-learn

    train = table[table.split == "train"]
    out = {"shortcut_auc_any": auc_or_nan(train["any"].to_numpy(), train["shortcut_score"].to_numpy())}
    for name in MEASURES:
        out[name] = float(table[name].median()) if name in table else float("nan")
    return out


def format_summary(summary: dict[str, float]) -> list[str]:
    lines = []
    for name, value in summary.items():
        low, high = TARGETS[name]
        ok = low <= value <= high
        lines.append(f"  {name:22s} {value:7.3f}   target {low:g}..{high:g}   {'ok' if ok else 'MISSED'}")
    return lines
