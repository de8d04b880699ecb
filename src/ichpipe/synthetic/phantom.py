"""Head-CT phantoms in Hounsfield units, with intracranial bleeds as 3-D objects: the renderer.

``render_slice`` composes the parts: the head's anatomy (anatomy.py), the bleeds (bleeds.py, one class per
pattern, each with its own mass effect) and the scanner's physics (scanner.py), on planes in the head frame
(geometry.py). Each slice integrates three planes across its thickness (partial volume; the centre plane weighs
half), rendered at half the matrix; the scanner then blurs it, adds correlated noise and, on a few series,
motion. Everything is pure numpy/OpenCV and deterministic given the spec objects, which the dataset writer
samples (``anatomy.sample_patient``, ``bleeds.sample_bleed``).
"""

from __future__ import annotations

import cv2
import numpy as np

from ichpipe.synthetic.anatomy import MassEffect, Patient, paint_anatomy
from ichpipe.synthetic.bleeds import Bleed, mass_effect
from ichpipe.synthetic.geometry import AIR, Plane, SliceGeometry
from ichpipe.synthetic.scanner import acquire, beam_hardening


def render_slice(patient: Patient, bleeds: list[Bleed], geo: SliceGeometry, rng: np.random.Generator,
                 noise_hu: float = 4.0, fov_padding: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render one axial (or tilted) slice.

    Returns:
        hu: float32 (size, size) Hounsfield units.
        tissue: uint8 (size, size) tissue codes (geometry.AIR ... CALC) of the centre plane, before blur and noise.
        masks: subtype → boolean mask of the blood of that subtype in the centre plane.
    """
    n = max(geo.size // 2, 16)
    half = geo.thickness / 3
    texture = _smooth_noise(rng, n, 24, 2.5)  # grey/white texture, shared by the three planes
    grain = _smooth_noise(rng, n, 64, 1.0)  # finer grain for bone and blood
    a, b = patient.semi_axes[:2]
    grow = 1 + float(patient.outline[:, 0].sum())  # the outline's harmonics stretch it by at most this
    ca, sa = abs(np.cos(geo.angle)), abs(np.sin(geo.angle))
    reach = ((a * ca + b * sa) * grow + 3, (a * sa + b * ca) * grow + 3)  # patient X, Y half-extents of the head
    mass = mass_effect(bleeds)
    # The slice's sensitivity profile: the centre plane (weight 1/2) at the render resolution, the two
    # planes a third of the thickness away (1/4 each) at half of it, enough for smooth partial volume.
    hu_small = np.zeros((n, n), dtype=np.float32)
    tissue_small = np.full((n, n), AIR, dtype=np.uint8)
    masks_small: dict[str, np.ndarray] = {}
    for offset, weight, m_px in ((0.0, 0.5, n), (-half, 0.25, n // 2), (half, 0.25, n // 2)):
        plane = Plane(geo, m_px, offset, reach)
        win = (slice(*plane.rows), slice(*plane.cols))
        tex, gr = (texture, grain) if m_px == n else (cv2.resize(texture, (m_px, m_px), interpolation=cv2.INTER_AREA),
                                                      cv2.resize(grain, (m_px, m_px), interpolation=cv2.INTER_AREA))
        masks = _paint(plane, patient, bleeds, mass, tex[win], gr[win])
        canvas = np.full((m_px, m_px), -1000.0, dtype=np.float32)
        canvas[win] = plane.hu
        if m_px != n:
            canvas = cv2.resize(canvas, (n, n), interpolation=cv2.INTER_LINEAR)
        hu_small += np.float32(weight) * canvas
        if offset == 0.0:
            tissue_small[win] = plane.tissue
            for k, m in masks.items():
                masks_small[k] = np.zeros((n, n), dtype=bool)
                masks_small[k][win] = m
    hu = cv2.resize(hu_small, (geo.size, geo.size), interpolation=cv2.INTER_LINEAR)
    tissue = cv2.resize(tissue_small, (geo.size, geo.size), interpolation=cv2.INTER_NEAREST)
    masks = {k: cv2.resize(m.view(np.uint8), (geo.size, geo.size), interpolation=cv2.INTER_NEAREST).astype(bool)
             for k, m in masks_small.items()}
    hu, tissue = acquire(hu, tissue, patient, geo, rng, noise_hu, fov_padding)
    return hu, tissue, masks


def _paint(pl: Plane, pat: Patient, bleeds: list[Bleed], mass: MassEffect, texture: np.ndarray, grain: np.ndarray
           ) -> dict[str, np.ndarray]:
    """Paint the anatomy and the bleeds on one plane, then the beam hardening; return the bleed masks of that
    plane."""
    ctx = paint_anatomy(pl, pat, mass, texture, grain)
    if ctx is None:
        return {}
    masks: dict[str, np.ndarray] = {}
    for bl in bleeds:
        m = bl.paint(pl, pat, ctx)
        if m is not None and m.any():
            masks[bl.subtype] = masks[bl.subtype] | m if bl.subtype in masks else m
    beam_hardening(pl, pat, ctx.intra, ctx.t)
    return masks


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """A smooth random field (``cells`` x ``cells`` normals, cubic-upsampled to ``size``): tissue texture."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * np.float32(amplitude)
