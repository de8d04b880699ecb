"""Head-CT phantoms in Hounsfield units, with intracranial bleeds as 3-D objects.

Geometry lives in millimetres in a head frame: ``u`` runs left-right, ``v`` anterior-posterior
(posterior positive, as DICOM's LPS axes, so a supine patient's dependent side is +v) and ``z``
foot-to-head. A slice is rendered by evaluating every structure on the slice's pixel grid:

    air | scalp | skull (dense tables, lighter diploe) | CSF rim | cortex / white matter
    + lateral, third and fourth ventricles, sulci, basal cisterns

and each bleed is a closed 3-D shape placed where its subtype occurs, so its cross-section
grows and shrinks over consecutive slices and a slice's labels follow from the bleeds that cut it:

- epidural: biconvex lens against the inner table of the skull (narrow, thick);
- subdural: crescent along the inner table (wide, thin, flat-topped);
- subarachnoid: blood in the sulci of one convexity region, or in the basal cisterns;
- intraparenchymal: lobulated blob in brain tissue with an oedema rim;
- intraventricular: blood layering in the dependent part of a lateral ventricle.

Everything here is pure numpy and deterministic given the spec objects, which the dataset writer
samples (``sample_patient``, ``sample_bleed``) from a seeded generator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np

from ichpipe.labels import SUBTYPES

# Tissue codes of the label map returned with every rendered slice.
AIR, SCALP, BONE, CSF, BRAIN, BLOOD, PADDING, OEDEMA = range(8)
TISSUE_NAMES = ("air", "scalp", "bone", "csf", "brain", "blood", "padding", "oedema")
PADDING_HU = -2000.0  # value outside the scanner's reconstruction circle


@dataclass
class Ellipsoid:
    """Axis-aligned ellipsoid in the head frame, rotated by ``angle`` (radians) about z."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float = 0.0

    def section(self, u: np.ndarray, v: np.ndarray, z: float, scale: float = 1.0) -> np.ndarray:
        """Boolean mask of the ellipsoid's cross-section at height ``z`` (radii × ``scale``)."""
        cu, cv, cz = self.center
        ru, rv, rz = (r * scale for r in self.radii)
        k2 = 1.0 - ((z - cz) / rz) ** 2
        if k2 <= 0:
            return np.zeros(u.shape, dtype=bool)
        reach = max(ru, rv)
        cand = (np.abs(u - cu) < reach) & (np.abs(v - cv) < reach)
        c, s = np.cos(self.angle), np.sin(self.angle)
        du, dv = u[cand] - cu, v[cand] - cv
        a = (c * du + s * dv) / ru
        b = (-s * du + c * dv) / rv
        mask = np.zeros(u.shape, dtype=bool)
        mask[cand] = a * a + b * b <= k2
        return mask


@dataclass
class Patient:
    """A head's anatomy, shared by all of a patient's studies."""

    semi_axes: tuple[float, float, float]  # skin ellipsoid half-sizes (u, v, z) in mm
    scalp_mm: float
    bone_mm: float
    csf_rim_mm: float
    brain_hu: float  # white-matter level; cortex is a few HU brighter
    ventricles: list[Ellipsoid]
    sulci_angles: np.ndarray  # radians, at z = 0
    sulci_drift: np.ndarray  # radians per mm of z
    sulci_depth: np.ndarray  # mm
    sulci_width: np.ndarray  # mm
    cistern_center: tuple[float, float, float]
    cistern_radius: float


@dataclass
class Bleed:
    """One bleed; ``params`` holds the subtype's shape parameters (mm, radians, HU)."""

    subtype: str
    hu: float
    params: dict = field(default_factory=dict)
    faint: bool = False  # only ~10-25 HU above brain


def section_scale(t: float) -> float:
    """Size of the head's cross-section at normalised height ``t`` ∈ [-1, 1] (superellipse)."""
    p = 2.4
    return float(max(0.0, 1.0 - abs(t) ** p) ** (1.0 / p))


def sample_patient(rng: np.random.Generator) -> Patient:
    a = rng.uniform(66, 78)
    b = rng.uniform(84, 98)
    c = rng.uniform(78, 90)
    age_factor = rng.uniform(0.8, 1.5)  # older brains: larger ventricles and sulci
    vent = []
    spread = rng.uniform(0.12, 0.25)
    for side in (-1, 1):
        vent.append(Ellipsoid(
            center=(side * rng.uniform(9, 12), rng.uniform(-4, 6), rng.uniform(8, 16)),
            radii=(rng.uniform(4.5, 7) * age_factor, rng.uniform(24, 32), rng.uniform(14, 19)),
            angle=-side * spread,
        ))
    vent.append(Ellipsoid(center=(0.0, 4.0, -6.0), radii=(1.6 * age_factor, 13.0, 10.0)))  # third
    vent.append(Ellipsoid(center=(0.0, 36.0, -0.52 * c), radii=(5.0, 3.5, 9.0)))  # fourth
    n_sulci = int(rng.integers(26, 40))
    return Patient(
        semi_axes=(a, b, c),
        scalp_mm=rng.uniform(3.5, 6.0),
        bone_mm=rng.uniform(5.0, 7.5),
        csf_rim_mm=rng.uniform(0.8, 1.8) * age_factor,
        brain_hu=rng.uniform(26, 32),
        ventricles=vent,
        sulci_angles=np.sort(rng.uniform(-np.pi, np.pi, n_sulci)),
        sulci_drift=rng.normal(0, 0.004, n_sulci),
        sulci_depth=rng.uniform(6, 15, n_sulci) * min(age_factor, 1.2),
        sulci_width=rng.uniform(0.8, 1.6, n_sulci) * age_factor,
        cistern_center=(0.0, rng.uniform(-8, 0), -0.38 * c),
        cistern_radius=rng.uniform(9, 14),
    )


def sample_bleed(rng: np.random.Generator, subtype: str, patient: Patient, faint: bool) -> Bleed:
    """A bleed of ``subtype`` placed where that subtype occurs in this patient's head."""
    a, b, c = patient.semi_axes
    hu = rng.uniform(42, 52) if faint else rng.uniform(58, 85)
    if subtype == "epidural":
        p = dict(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.22, 0.4),
                 zc=rng.uniform(-0.1, 0.55) * c, half_height=rng.uniform(12, 24),
                 thickness=rng.uniform(7, 18))
    elif subtype == "subdural":
        p = dict(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.6, 1.2),
                 zc=rng.uniform(-0.05, 0.5) * c, half_height=rng.uniform(22, 45),
                 thickness=rng.uniform(2.5, 9))
    elif subtype == "subarachnoid":
        if rng.random() < 0.35:
            p = dict(kind="cistern", zc=patient.cistern_center[2], half_height=rng.uniform(8, 14))
        else:
            p = dict(kind="sulcal", phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.35, 0.9),
                     zc=rng.uniform(-0.1, 0.6) * c, half_height=rng.uniform(10, 24))
    elif subtype == "intraparenchymal":
        for _ in range(100):  # rejection-sample a centre in brain tissue, clear of the ventricles
            t = rng.uniform(-0.3, 0.6)
            s = section_scale(t)
            ang = rng.uniform(-np.pi, np.pi)
            frac = rng.uniform(0.15, 0.6)
            center = (frac * a * s * np.cos(ang), frac * b * s * np.sin(ang), t * c)
            if not any(ve.section(np.array([center[0]]), np.array([center[1]]), center[2], 1.6)[0]
                       for ve in patient.ventricles):
                break
        r = float(np.exp(rng.uniform(np.log(4), np.log(18))))
        p = dict(center=center, radii=(r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), r * rng.uniform(0.8, 1.4)),
                 angle=rng.uniform(0, np.pi), lobes=rng.uniform(0.05, 0.2, 2), lobe_phase=rng.uniform(0, 2 * np.pi, 2),
                 oedema_mm=rng.uniform(1.5, 4))
    elif subtype == "intraventricular":
        side = int(rng.integers(0, 2))
        vent = patient.ventricles[side]
        p = dict(ventricle=side, level=rng.uniform(-0.2, 0.5) * vent.radii[1],
                 zc=vent.center[2] + rng.uniform(-4, 4), half_height=rng.uniform(8, 16))
    else:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {SUBTYPES}")
    return Bleed(subtype=subtype, hu=float(hu), params=p, faint=faint)


@dataclass
class SliceGeometry:
    """Where the head sits in one slice: pixel grid, spacing, in-plane pose, height in the head."""

    size: int  # rows = columns
    pixel_mm: float
    center_px: tuple[float, float]  # head centre in pixel coordinates (col, row)
    angle: float  # in-plane rotation of the head (radians)
    z: float  # slice height in the head frame (mm)


def _head_frame(geo: SliceGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) head-frame millimetres of every pixel of the slice."""
    idx = (np.arange(geo.size, dtype=np.float32))
    x = (idx - geo.center_px[0]) * geo.pixel_mm
    y = (idx - geo.center_px[1]) * geo.pixel_mm
    c, s = np.float32(np.cos(geo.angle)), np.float32(np.sin(geo.angle))
    u = c * x[None, :] + s * y[:, None]
    v = -s * x[None, :] + c * y[:, None]
    return u, v


def _angle_diff(a: np.ndarray, b) -> np.ndarray:
    """a - b wrapped to [-pi, pi), in the dtype of ``a``."""
    pi = np.asarray(np.pi, dtype=np.asarray(a).dtype)
    return (a - b + pi) % (2 * pi) - pi


@functools.lru_cache(maxsize=8)
def _outside_fov(size: int) -> np.ndarray:
    """Pixels outside the scanner's reconstruction circle (read-only, cached per size)."""
    r = np.arange(size) - (size - 1) / 2
    mask = np.hypot(r[None, :], r[:, None]) > size / 2
    mask.setflags(write=False)
    return mask


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * np.float32(amplitude)


def render_slice(patient: Patient, bleeds: list[Bleed], geo: SliceGeometry, rng: np.random.Generator,
                 noise_hu: float = 4.0, fov_padding: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render one axial slice.

    Returns:
        hu: float32 (size, size) Hounsfield units.
        tissue: uint8 (size, size) tissue codes (AIR ... OEDEMA) before noise.
        masks: subtype → boolean mask of the blood of that subtype in this slice.
    """
    a, b, c = patient.semi_axes
    s = section_scale(geo.z / c)
    u, v = _head_frame(geo)
    shape = u.shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    tissue = np.full(shape, AIR, dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    if s > 0.05:
        # Elliptical polar coordinates: q = 1 on the skin, depth = mm inward from the skin.
        un, vn = u / np.float32(a * s), v / np.float32(b * s)
        q = np.sqrt(un * un + vn * vn)
        phi = np.arctan2(vn, un)
        radius = np.float32(s) * np.sqrt((a * np.cos(phi)) ** 2 + (b * np.sin(phi)) ** 2)
        depth = (1.0 - q) * radius
        inner = patient.scalp_mm + patient.bone_mm + max(0.0, -geo.z / c - 0.3) * 12.0  # skull base thicker
        scalp = (depth >= 0) & (depth < patient.scalp_mm)
        hu[scalp], tissue[scalp] = 30.0, SCALP
        bone = (depth >= patient.scalp_mm) & (depth < inner)
        frac = (depth[bone] - patient.scalp_mm) / (inner - patient.scalp_mm)
        hu[bone] = 750.0 + 700.0 * np.abs(2 * frac - 1) ** 0.6  # dense tables, lighter diploe
        tissue[bone] = BONE
        intra = depth >= inner
        d_in = depth - inner  # mm inward from the inner table
        brain = intra & (d_in >= patient.csf_rim_mm)
        rim = intra & ~brain
        hu[rim], tissue[rim] = 8.0, CSF
        cortex = brain & (d_in < patient.csf_rim_mm + 3.5)
        hu[brain] = patient.brain_hu
        hu[cortex] = patient.brain_hu + 8.0
        tissue[brain] = BRAIN
        # Sulci: wavy radial CSF clefts from the cortical surface; angles drift slowly with z.
        # Evaluated only on the cortical band where a sulcus can be, which is most of the cost.
        bd = d_in - np.float32(patient.csf_rim_mm)
        band = brain & (bd < patient.sulci_depth.max())
        current = _angle_diff(patient.sulci_angles + patient.sulci_drift * geo.z, 0.0)
        order = np.argsort(current)
        angles = current[order].astype(np.float32)
        phi_b, bd_b = phi[band], bd[band]
        wavy = _angle_diff(phi_b + np.float32(0.04) * np.sin(bd_b * np.float32(0.6) + phi_b * 5), np.float32(0))
        idx = np.searchsorted(angles, wavy) % len(angles)
        best_dist = np.abs(_angle_diff(wavy, angles[idx]))
        best = idx
        prev = idx - 1  # the nearest sulcus is one of the two neighbours in angle
        dist = np.abs(_angle_diff(wavy, angles[prev]))
        closer = dist < best_dist
        best_dist[closer], best[closer] = dist[closer], prev[closer] % len(angles)
        k = order[best]
        hit = (bd_b < patient.sulci_depth[k]) & (best_dist * radius[band] < patient.sulci_width[k] / 2)
        in_sulcus = np.zeros(shape, dtype=bool)
        in_sulcus[band] = hit
        hu[in_sulcus], tissue[in_sulcus] = 8.0, CSF
        # Basal cisterns (low slices): a five-lobed CSF star in front of the brainstem.
        cu, cv, cz = patient.cistern_center
        kz = 1.0 - ((geo.z - cz) / 10.0) ** 2
        cistern = np.zeros(shape, dtype=bool)
        if kz > 0:
            ang = np.arctan2(v - cv, u - cu)
            r_c = patient.cistern_radius * np.sqrt(kz) * (0.6 + 0.4 * np.cos(5 * ang))
            cistern = intra & (np.hypot(u - cu, v - cv) < r_c)
            hu[cistern], tissue[cistern] = 8.0, CSF
        vent_masks = [ve.section(u, v, geo.z) & intra for ve in patient.ventricles]
        for m in vent_masks:
            hu[m], tissue[m] = 6.0, CSF
        # Grey/white texture: low-frequency variation inside the brain.
        texture = _smooth_noise(rng, geo.size, 24, 2.5)
        hu[brain] += texture[brain]
        for bl in bleeds:
            m = _bleed_mask(bl, patient, geo, u, v, phi, d_in, intra, brain, in_sulcus, rim, cistern, vent_masks, hu, tissue)
            if m is not None and m.any():
                hu[m] = bl.hu + texture[m] * 0.8
                tissue[m] = BLOOD
                masks[bl.subtype] = masks[bl.subtype] | m if bl.subtype in masks else m
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_hu)
    air = tissue == AIR
    hu[air] = np.minimum(hu[air], -995.0)  # keep air physical under the noise
    if fov_padding:
        pad = _outside_fov(geo.size)
        hu[pad], tissue[pad] = PADDING_HU, PADDING
    return hu, tissue, masks


def _bleed_mask(bl: Bleed, patient: Patient, geo: SliceGeometry, u, v, phi, d_in, intra, brain,
                in_sulcus, rim, cistern, vent_masks, hu, tissue) -> np.ndarray | None:
    p = bl.params
    z = geo.z
    if bl.subtype in ("epidural", "subdural"):
        dz = (z - p["zc"]) / p["half_height"]
        if abs(dz) >= 1:
            return None
        cand = intra & (d_in < p["thickness"])
        dphi = _angle_diff(phi[cand], np.float32(p["phi"])) / np.float32(p["half_angle"])
        if bl.subtype == "epidural":  # biconvex lens: thickest in the middle, tapering to the edges
            prof = np.sqrt(np.clip(1.0 - dphi * dphi - dz * dz, 0, None))
        else:  # crescent: flat-topped along the skull, thin ends
            prof = np.sqrt(np.clip(1.0 - dphi ** 4, 0, None)) * np.sqrt(1.0 - dz ** 4)
        mask = np.zeros(u.shape, dtype=bool)
        mask[cand] = d_in[cand] < p["thickness"] * prof
        return mask
    if bl.subtype == "subarachnoid":
        dz = abs(z - p["zc"]) / p["half_height"]
        if dz >= 1:
            return None
        if p["kind"] == "cistern":
            return cistern.copy()
        region = np.abs(_angle_diff(phi, p["phi"])) < p["half_angle"] * np.sqrt(1 - dz * dz)
        return (in_sulcus | rim) & region
    if bl.subtype == "intraparenchymal":
        cu, cv, cz = p["center"]
        ru, rv, rz = p["radii"]
        k2 = 1.0 - ((z - cz) / rz) ** 2
        if k2 <= 0:
            return None
        reach = 1.3 * max(ru, rv) + p["oedema_mm"]  # lobes stretch the radius by at most 1.3
        cand = (brain | (tissue == OEDEMA)) & (np.abs(u - cu) < reach) & (np.abs(v - cv) < reach)
        ca, sa = np.cos(p["angle"]), np.sin(p["angle"])
        du, dv = u[cand] - cu, v[cand] - cv
        pa, pb = (ca * du + sa * dv) / ru, (-sa * du + ca * dv) / rv
        ang = np.arctan2(pb, pa)
        lobed = 1 + p["lobes"][0] * np.sin(2 * ang + p["lobe_phase"][0]) + p["lobes"][1] * np.sin(3 * ang + p["lobe_phase"][1])
        rho = np.sqrt(pa * pa + pb * pb) / lobed
        core = np.zeros(u.shape, dtype=bool)
        core[cand] = rho * rho <= k2
        edge = np.zeros(u.shape, dtype=bool)
        edge[cand] = rho <= np.sqrt(k2) + p["oedema_mm"] / min(ru, rv)
        oedema = edge & ~core & (tissue == BRAIN)
        hu[oedema] -= 9.0  # low-density rim around the clot
        tissue[oedema] = OEDEMA
        return core
    if bl.subtype == "intraventricular":
        if abs(z - p["zc"]) >= p["half_height"]:
            return None
        vent = patient.ventricles[p["ventricle"]]
        ca, sa = np.cos(vent.angle), np.sin(vent.angle)
        along = -sa * (u - vent.center[0]) + ca * (v - vent.center[1])  # + towards the occipital horn
        return vent_masks[p["ventricle"]] & (along > p["level"])
    raise ValueError(f"unknown subtype {bl.subtype!r}")
