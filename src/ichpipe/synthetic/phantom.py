"""Head-CT phantoms in Hounsfield units, with intracranial bleeds as 3-D objects.

Geometry lives in millimetres in a head frame: ``u`` runs left-right, ``v`` anterior-posterior
(posterior positive, as DICOM's LPS axes, so a supine patient's dependent side is +v) and ``w``
foot-to-head, ``t = w / c`` the normalised height (c = the head's half-height). Every structure is
a function of (u, v, w) arrays, so a tilted slice plane (gantry tilt) is no special case.

Anatomy, from the skin inwards and from the skull base up, varying per patient:

    skin | subcutaneous fat | temporalis / neck muscles | skull (outer table, diploe, inner table;
    thickness varying around the head, thin temporal squama, frontal sinus) | CSF rim | cortex and
    white matter with gyri and sulci, Sylvian and interhemispheric fissures, falx, superior sagittal
    sinus, deep grey nuclei, lateral/third/fourth ventricles, tentorium, cerebellum with folia,
    brainstem and cisterns; at the skull base orbits (globe, lens, fat), ethmoid/sphenoid/maxillary
    air, petrous ridges, mastoid air cells, clivus.
    Physiological calcifications (choroid plexus, pineal, basal ganglia, falx, vessels) and age
    effects (atrophy, white-matter hypodensities, old infarcts) in a realistic share of patients.

Physics: each slice integrates three planes across its thickness (partial volume; the centre plane
weighs half), is rendered at half the matrix and blurred by the scanner's point-spread function, gets correlated (filtered)
noise that is stronger in the posterior fossa, a beam-hardening band between the petrous bones,
and, on a few series, motion ghosting.

Bleeds are closed 3-D shapes placed where their subtype occurs, so a slice's labels follow from the
bleeds that cut it (the centre plane, at least ``min_label_area_mm2``):

- epidural: biconvex lens against the inner table, often beside a skull fracture;
- subdural: crescent along the inner table, acute, subacute (isodense), chronic (hypodense) or mixed
  with a haematocrit level;
- subarachnoid: blood in the sulci of a convexity region, a Sylvian fissure, the interhemispheric
  fissure or the basal cisterns, partial-volumed with the CSF it mixes with;
- intraparenchymal: irregular clot in lobar white matter or the deep grey nuclei, with or without
  oedema of variable width and depth, sometimes a fluid level;
- intraventricular: blood layering in the dependent occipital horns, or a cast of one ventricle.

Large bleeds push: midline shift (the falx bows, ventricles and deep nuclei move), a compressed
ipsilateral ventricle and effaced sulci. Everything is pure numpy/OpenCV and deterministic given
the spec objects, which the dataset writer samples (``sample_patient``, ``sample_bleed``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np

from ichpipe.labels import SUBTYPES

# Tissue codes of the label map returned with every rendered slice (centre plane, before blur).
AIR, SCALP, BONE, CSF, BRAIN, BLOOD, PADDING, OEDEMA, FAT, DURA, CALC = range(11)
TISSUE_NAMES = ("air", "scalp", "bone", "csf", "brain", "blood", "padding", "oedema", "fat", "dura", "calcification")
PADDING_HU = -2000.0  # value outside the scanner's reconstruction circle
PSF_SIGMA_MM = 0.6  # scanner point-spread function (Gaussian sigma)
NOISE_SIGMA_PX = 0.8  # filter of the noise texture: neighbour correlation ~0.6 as in real reconstructions
STAGE_HU = {  # bleed density by age of the blood
    "acute": (58.0, 85.0), "hyperacute": (45.0, 57.0), "subacute": (30.0, 44.0), "chronic": (8.0, 24.0),
}


@dataclass
class Ellipsoid:
    """Ellipsoid in the head frame, rotated by ``angle`` (radians) about the vertical axis."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float = 0.0

    def value(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, shift: float | np.ndarray = 0.0) -> np.ndarray:
        """Normalised squared distance from the centre (< 1 inside); ``shift`` moves it along u."""
        cu, cv, cz = self.center
        ru, rv, rz = self.radii
        du, dv = u - (cu + shift), v - cv
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        a = (c * du + s * dv) / np.float32(ru)
        b = (-s * du + c * dv) / np.float32(rv)
        dz = (w - np.float32(cz)) / np.float32(rz)
        return a * a + b * b + dz * dz

    def contains(self, u, v, w, shift=0.0) -> np.ndarray:
        return self.value(u, v, w, shift) < 1.0


@dataclass
class Calcification:
    shape: Ellipsoid
    hu: float
    midline: bool = False  # moves with the midline (pineal, falx, choroid plexus, basal ganglia)


@dataclass
class Patient:
    """A head's anatomy, shared by all of a patient's studies."""

    age: float
    semi_axes: tuple[float, float, float]  # skin half-sizes (u, v, w) in mm at the widest level
    outline: np.ndarray  # (3, 2): amplitude, phase of the head outline's 2nd-4th harmonics
    skin_mm: float
    fat_mm: float
    muscle_mm: float  # temporalis at its thickest
    skull_mm: float
    skull_shape: np.ndarray  # (3, 2): harmonics of the skull thickness around the head
    diploe_hu: float
    csf_rim_mm: float
    atrophy: float  # 0 (young) .. 1 (marked): wider sulci, fissures and ventricles
    wm_hu: float
    gm_hu: float
    sinus_hu: float  # venous blood in the dural sinuses (haematocrit)
    ventricles: list[Ellipsoid]  # left, right lateral (bodies), then frontal, occipital, temporal horns, 3rd, 4th
    nuclei: list[Ellipsoid]  # caudate, lentiform, thalamus (both sides)
    sulci_angles: np.ndarray  # radians, at w = 0
    sulci_drift: np.ndarray  # radians per mm of w
    sulci_depth: np.ndarray  # mm
    sulci_width: np.ndarray  # mm
    cistern_center: tuple[float, float, float]
    cistern_radius: float
    calcifications: list[Calcification] = field(default_factory=list)
    wm_lesions: list[Ellipsoid] = field(default_factory=list)
    infarct: dict | None = None  # old infarct: angle, half_angle, w range, depth
    frontal_sinus: bool = True
    beam_hardening_hu: float = 20.0


@dataclass
class Bleed:
    """One bleed; ``params`` holds the subtype's shape parameters (mm, radians, HU)."""

    subtype: str
    hu: float
    params: dict = field(default_factory=dict)
    faint: bool = False  # not acute: at most ~57 HU, down to hypodense for chronic subdurals
    stage: str = "acute"
    volume_ml: float = 0.0
    side: int = 0  # -1 / +1: the u side it pushes from (mass effect); 0 none


def section_scale(t) -> np.ndarray | float:
    """Size of the head's cross-section at normalised height ``t`` (superellipse; flatter below)."""
    t = np.asarray(t, dtype=np.float32)
    p = np.where(t > 0, np.float32(2.4), np.float32(3.6))
    out = np.clip(1.0 - np.abs(t) ** p, 0.0, None) ** (1.0 / p)
    return out if out.ndim else float(out)


def _harmonics(rng: np.random.Generator, scale: float) -> np.ndarray:
    return np.stack([rng.uniform(0, scale, 3) / np.arange(1, 4), rng.uniform(0, 2 * np.pi, 3)], axis=1)


def _eval_harmonics(h: np.ndarray, phi: np.ndarray) -> np.ndarray:
    out = np.zeros_like(phi)
    for k, (amp, ph) in enumerate(h, start=2):
        out += np.float32(amp) * np.cos(k * phi + np.float32(ph))
    return out


def sample_patient(rng: np.random.Generator) -> Patient:
    age = float(rng.uniform(18, 92))
    atrophy = float(np.clip((age - 45) / 45 + rng.normal(0, 0.15), 0, 1))
    a, b, c = rng.uniform(66, 76), rng.uniform(86, 98), rng.uniform(80, 90)
    grow = 1 + 0.9 * atrophy
    vent: list[Ellipsoid] = []
    spread = rng.uniform(0.1, 0.22)
    for side in (-1, 1):  # lateral ventricle bodies
        vent.append(Ellipsoid((side * rng.uniform(6, 9) * (1 + 0.3 * atrophy), rng.uniform(-2, 6), 0.24 * c),
                              (rng.uniform(2.5, 4.5) * grow, rng.uniform(22, 28), rng.uniform(9, 12)), -side * spread))
    for side in (-1, 1):
        vent.append(Ellipsoid((side * 8.0 * (1 + 0.2 * atrophy), -24.0, 0.08 * c),  # frontal horns
                              (rng.uniform(2.5, 4.5) * grow, 11.0, 9.0), side * 0.35))
        vent.append(Ellipsoid((side * 15.0, 26.0, 0.06 * c), (rng.uniform(3, 5) * grow, 12.0, 8.0), side * 0.3))  # atria
        vent.append(Ellipsoid((side * 29.0, -6.0, -0.24 * c), (1.8 * grow, 11.0, 3.5), -side * 0.25))  # temporal horns
    vent.append(Ellipsoid((0.0, 3.0, -0.03 * c), (1.2 + 2.5 * atrophy, 12.0, 8.0)))  # third
    vent.append(Ellipsoid((0.0, 0.27 * b, -0.45 * c), (5.0, 3.5, 7.0)))  # fourth
    nuclei = []
    for side in (-1, 1):
        nuclei.append(Ellipsoid((side * 12.0, -17.0, 0.1 * c), (4.5, 8.0, 9.0), side * 0.4))  # caudate head
        nuclei.append(Ellipsoid((side * 22.0, -4.0, 0.0), (5.5, 13.0, 9.0), -side * 0.25))  # lentiform
        nuclei.append(Ellipsoid((side * 9.0, 10.0, 0.02 * c), (7.0, 10.0, 8.0), -side * 0.2))  # thalamus
    n_sulci = int(rng.integers(30, 44))
    calcs: list[Calcification] = []
    old = (age - 18) / 74
    for side in (-1, 1):
        if rng.random() < 0.3 + 0.5 * old:  # choroid plexus in the atria
            calcs.append(Calcification(Ellipsoid((side * 15.0, 28.0 + rng.uniform(-3, 3), 0.08 * c),
                                                 tuple(rng.uniform(1.8, 4.0, 3)), 0.0), rng.uniform(90, 350), True))
    if rng.random() < 0.25 + 0.5 * old:  # pineal
        calcs.append(Calcification(Ellipsoid((0.0, 17.0, 0.0), tuple(rng.uniform(1.5, 3.5, 3))), rng.uniform(100, 400), True))
    if rng.random() < 0.12 * (0.5 + old):  # globus pallidus, both sides
        for side in (-1, 1):
            calcs.append(Calcification(Ellipsoid((side * 19.0, -3.0, 0.0), tuple(rng.uniform(1.5, 3.0, 3))),
                                       rng.uniform(80, 200), True))
    if rng.random() < 0.15 + 0.2 * old:  # falx plaques
        for _ in range(int(rng.integers(1, 3))):
            calcs.append(Calcification(Ellipsoid((0.0, rng.uniform(-0.6, 0.6) * b, rng.uniform(0.2, 0.6) * c),
                                                 (1.2, rng.uniform(3, 9), rng.uniform(2, 6))), rng.uniform(150, 600), True))
    if rng.random() < 0.1 + 0.5 * old:  # calcified carotid siphons / vertebral arteries
        for side in (-1, 1):
            calcs.append(Calcification(Ellipsoid((side * rng.uniform(14, 18), -0.12 * b, -0.38 * c),
                                                 (2.5, 3.5, 5.0)), rng.uniform(150, 500)))
    lesions = []
    for _ in range(int(rng.poisson(8 * max(0.0, old - 0.3)))):  # periventricular white-matter hypodensities
        side = rng.choice([-1, 1])
        lesions.append(Ellipsoid((side * rng.uniform(14, 28), rng.uniform(-30, 32), rng.uniform(0.05, 0.45) * c),
                                 tuple(rng.uniform(3, 9, 3)), rng.uniform(0, np.pi)))
    infarct = None
    if rng.random() < 0.22 * old:
        infarct = dict(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.12, 0.35),
                       w0=rng.uniform(-0.05, 0.3) * c, half_height=rng.uniform(10, 25), depth=rng.uniform(12, 30))
    return Patient(
        age=age, semi_axes=(a, b, c), outline=_harmonics(rng, 0.05), skin_mm=rng.uniform(1.5, 2.5),
        fat_mm=rng.uniform(1.5, 6.0), muscle_mm=rng.uniform(5, 12), skull_mm=rng.uniform(5.0, 8.5),
        skull_shape=_harmonics(rng, 0.35), diploe_hu=rng.uniform(450, 800),
        csf_rim_mm=rng.uniform(0.6, 1.4) + 2.5 * atrophy, atrophy=atrophy,
        wm_hu=rng.uniform(20, 27), gm_hu=rng.uniform(31, 39) - 2 * atrophy, sinus_hu=rng.uniform(48, 66),
        ventricles=vent, nuclei=nuclei,
        sulci_angles=np.sort(rng.uniform(-np.pi, np.pi, n_sulci)),
        sulci_drift=rng.normal(0, 0.005, n_sulci),
        sulci_depth=rng.uniform(6, 16, n_sulci),
        sulci_width=rng.uniform(0.5, 1.2, n_sulci) * (1 + 2.0 * atrophy),
        cistern_center=(0.0, rng.uniform(-8, -2), -0.3 * c), cistern_radius=rng.uniform(9, 13) * (1 + 0.3 * atrophy),
        calcifications=calcs, wm_lesions=lesions, infarct=infarct,
        frontal_sinus=bool(rng.random() < 0.85), beam_hardening_hu=rng.uniform(6, 22),
    )


def _stage(rng: np.random.Generator, subtype: str, faint: bool) -> str:
    if not faint:
        return "acute"
    if subtype == "subdural":
        return str(rng.choice(["hyperacute", "subacute", "chronic", "mixed"], p=[0.25, 0.3, 0.3, 0.15]))
    if subtype == "intraparenchymal":
        return str(rng.choice(["hyperacute", "subacute"], p=[0.5, 0.5]))
    return "hyperacute"


def sample_bleed(rng: np.random.Generator, subtype: str, patient: Patient, faint: bool) -> Bleed:
    """A bleed of ``subtype`` placed where that subtype occurs in this patient's head.

    ``faint``: not acute (hyperacute, subacute, chronic or mixed density) instead of the acute
    58-85 HU.
    """
    a, b, c = patient.semi_axes
    stage = _stage(rng, subtype, faint)
    lo, hi = STAGE_HU["chronic" if stage == "mixed" else stage]
    hu = float(rng.uniform(lo, hi))
    volume = 0.0
    side = 0
    if subtype == "epidural":
        p = dict(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.2, 0.4),
                 zc=rng.uniform(-0.15, 0.55) * c, half_height=rng.uniform(12, 26),
                 thickness=rng.uniform(6, 20), fracture=bool(rng.random() < 0.75),
                 edge=_harmonics(rng, 0.25), swirl=bool(rng.random() < 0.25))
        volume = 0.6 * p["half_angle"] * 70 * p["half_height"] * p["thickness"] / 1000
    elif subtype == "subdural":
        p = dict(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.6, 1.2),
                 zc=rng.uniform(-0.05, 0.5) * c, half_height=rng.uniform(22, 45),
                 thickness=rng.uniform(2.5, 12 if stage in ("chronic", "mixed") else 9), edge=_harmonics(rng, 0.3),
                 level=rng.uniform(-10, 25), acute_hu=rng.uniform(58, 78))
        volume = 1.2 * p["half_angle"] * 70 * p["half_height"] * p["thickness"] / 1000
    elif subtype == "subarachnoid":
        kind = str(rng.choice(["sulcal", "sylvian", "interhemispheric", "cistern"], p=[0.45, 0.2, 0.15, 0.2]))
        p = dict(kind=kind, phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.35, 0.9),
                 zc=rng.uniform(-0.1, 0.6) * c if kind in ("sulcal", "interhemispheric") else patient.cistern_center[2] + rng.uniform(0, 20),
                 half_height=rng.uniform(10, 24), side=int(rng.choice([-1, 1])), fill=rng.uniform(0.6, 1.0))
        if kind == "cistern":
            p["zc"] = patient.cistern_center[2]
            p["half_height"] = rng.uniform(8, 14)
        elif kind == "interhemispheric":  # from the front (pericallosal) back to ``reach`` x the half-length
            p.update(half_width=rng.uniform(1.5, 4.0), reach=rng.uniform(-0.3, 0.5))
    elif subtype == "intraparenchymal":
        deep = rng.random() < 0.45  # hypertensive: putamen / thalamus; else lobar
        if deep:
            nucleus = patient.nuclei[int(rng.choice([1, 2, 4, 5]))]
            center = tuple(np.asarray(nucleus.center) + rng.normal(0, 3, 3))
        else:
            for _ in range(100):  # rejection-sample a centre in lobar white matter, clear of the ventricles
                t = rng.uniform(-0.15, 0.6)
                s = section_scale(t)
                ang = rng.uniform(-np.pi, np.pi)
                frac = rng.uniform(0.25, 0.6)
                center = (frac * a * s * np.cos(ang), frac * b * s * np.sin(ang), t * c)
                if not any(ve.value(*[np.float32(x) for x in center]) < 2.5 for ve in patient.ventricles):
                    break
        r = float(np.exp(rng.uniform(np.log(4), np.log(20))))
        p = dict(center=center, radii=(r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), r * rng.uniform(0.8, 1.4)),
                 angle=rng.uniform(0, np.pi), edge=_harmonics(rng, 0.45),
                 oedema_mm=float(rng.uniform(0, 8)) if rng.random() < 0.75 else 0.0,
                 oedema_hu=float(rng.uniform(3, 12)), level=bool(rng.random() < 0.15))
        volume = 4 / 3 * np.pi * np.prod(p["radii"]) / 1000
    elif subtype == "intraventricular":
        kind = "cast" if rng.random() < 0.25 else "layering"
        p = dict(kind=kind, sides=[int(rng.integers(0, 2))] if kind == "cast" or rng.random() < 0.4 else [0, 1],
                 level=rng.uniform(-6, 12))
    else:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {SUBTYPES}")
    if volume > 8 and subtype in ("epidural", "subdural", "intraparenchymal"):
        u = np.cos(p["phi"]) if "phi" in p else p["center"][0]
        side = 1 if u >= 0 else -1
    return Bleed(subtype=subtype, hu=hu, params=p, faint=faint, stage=stage, volume_ml=float(volume), side=side)


@dataclass
class SliceGeometry:
    """Where the head sits in one slice: pixel grid, spacing, in-plane pose, height in the head."""

    size: int  # rows = columns
    pixel_mm: float
    center_px: tuple[float, float]  # head centre in pixel coordinates (col, row)
    angle: float  # in-plane rotation of the head (radians)
    z: float  # the slice centre's distance along the slice normal from the head centre (mm)
    tilt: float = 0.0  # gantry tilt (radians): the normal is (0, sin, cos) in patient coordinates
    thickness: float = 5.0  # mm integrated across (partial volume)
    motion: float = 0.0  # 0 = still; > 0: ghost weight of a moved copy


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


@functools.lru_cache(maxsize=4)
def _noise_gain(sigma_px: float) -> float:
    """Standard deviation of unit white noise after the Gaussian noise filter."""
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    return float(cv2.GaussianBlur(x, (0, 0), sigma_px)[16:-16, 16:-16].std())


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * np.float32(amplitude)


class _Plane:
    """Head-frame coordinates of one render plane (cropped to the head) and the HU/tissue maps painted on it."""

    def __init__(self, geo: SliceGeometry, n: int, offset: float, reach_mm: tuple[float, float]):
        self.n = n
        self.step = geo.pixel_mm * geo.size / n  # mm per render pixel
        scale = geo.size / n
        self.ct, self.st = np.float32(np.cos(geo.tilt)), np.float32(np.sin(geo.tilt))
        self.d = np.float32(geo.z + offset)
        self.cos, self.sin = np.float32(np.cos(geo.angle)), np.float32(np.sin(geo.angle))
        self.geo, self.scale = geo, scale
        # crop to the rows/columns the head can reach: |X|, |Y| <= reach (Y = y cos(tilt) + d sin(tilt))
        rx, ry = reach_mm
        y_lo, y_hi = (-ry - self.d * self.st) / self.ct, (ry - self.d * self.st) / self.ct
        self.rows = self._index_range(geo.center_px[1], y_lo, y_hi)
        self.cols = self._index_range(geo.center_px[0], -rx, rx)
        # render pixel j covers output pixels around scale * (j + 0.5) - 0.5 (cv2.resize's half-pixel convention)
        i = np.arange(*self.rows, dtype=np.float32)
        j = np.arange(*self.cols, dtype=np.float32)
        x = ((j + 0.5) * scale - 0.5 - np.float32(geo.center_px[0])) * np.float32(geo.pixel_mm)
        y = ((i + 0.5) * scale - 0.5 - np.float32(geo.center_px[1])) * np.float32(geo.pixel_mm)
        px = np.broadcast_to(x[None, :], (len(i), len(j)))
        py = y[:, None] * self.ct + self.d * self.st + 0 * x[None, :]
        self.w = (-y[:, None] * self.st + self.d * self.ct + 0 * x[None, :]).astype(np.float32)
        self.u = (self.cos * px + self.sin * py).astype(np.float32)
        self.v = (-self.sin * px + self.cos * py).astype(np.float32)
        self.w_range = (float(self.w.min()), float(self.w.max())) if self.w.size else (0.0, 0.0)
        self.hu = np.full(self.u.shape, -1000.0, dtype=np.float32)
        self.tissue = np.full(self.u.shape, AIR, dtype=np.uint8)

    def _index_range(self, center_px: float, lo_mm: float, hi_mm: float) -> tuple[int, int]:
        lo = (center_px + lo_mm / self.geo.pixel_mm + 0.5) / self.scale - 0.5
        hi = (center_px + hi_mm / self.geo.pixel_mm + 0.5) / self.scale - 0.5
        return max(0, int(np.floor(lo))), min(self.n, int(np.ceil(hi)) + 1)

    def window(self, cu: float, cv: float, reach: float) -> tuple[slice, slice]:
        """Array slices of this plane's pixels within ``reach`` mm of (u, v) = (cu, cv)."""
        px, py = self.cos * cu - self.sin * cv, self.sin * cu + self.cos * cv
        y = (py - self.d * self.st) / self.ct
        r0, r1 = self._index_range(self.geo.center_px[1], y - reach / self.ct, y + reach / self.ct)
        c0, c1 = self._index_range(self.geo.center_px[0], px - reach, px + reach)
        return (slice(max(r0 - self.rows[0], 0), max(r1 - self.rows[0], 0)),
                slice(max(c0 - self.cols[0], 0), max(c1 - self.cols[0], 0)))

    def value(self, ell: Ellipsoid, shift: np.ndarray | float = 0.0, margin: float = 0.0) -> np.ndarray:
        """``ell.value`` on this plane (9 where it is certainly outside), computed only near the ellipsoid."""
        out = np.full(self.u.shape, 9.0, dtype=np.float32)
        cz, rz = ell.center[2], ell.radii[2] * 1.8
        if cz + rz < self.w_range[0] or cz - rz > self.w_range[1]:
            return out
        win = self.window(ell.center[0], ell.center[1], max(ell.radii[:2]) * 1.8 + margin + (15 if np.ndim(shift) else 0))
        sh = shift[win] if np.ndim(shift) else shift
        out[win] = ell.value(self.u[win], self.v[win], self.w[win], sh)
        return out

    def inside(self, ell: Ellipsoid, shift: np.ndarray | float = 0.0) -> np.ndarray:
        return self.value(ell, shift) < 1.0

    def paint(self, mask: np.ndarray, hu, code: int) -> None:
        np.copyto(self.hu, hu, where=mask, casting="unsafe")
        np.copyto(self.tissue, code, where=mask, casting="unsafe")

    def blend(self, alpha: np.ndarray, hu: float, code: int | None = None) -> None:
        """Partial cover (alpha in 0..1) of a structure thinner than a pixel."""
        self.hu += alpha * (np.float32(hu) - self.hu)
        if code is not None:
            self.tissue[alpha > 0.5] = code


def _midline_shift(bleeds: list[Bleed], v: np.ndarray, w: np.ndarray, c: float) -> np.ndarray | float:
    """u displacement of the midline structures (falx, ventricles, deep nuclei) pushed by the bleeds."""
    total = np.float32(0.0)
    for bl in bleeds:
        if not bl.side:
            continue
        mm = min(14.0, 0.22 * (bl.volume_ml - 8)) if bl.volume_ml > 8 else 0.0
        if mm <= 0:
            continue
        zc = bl.params.get("zc", bl.params.get("center", (0, 0, 0))[2] if "center" in bl.params else 0.0)
        total = total - np.float32(bl.side * mm) * np.exp(-(v / np.float32(45)) ** 2) * np.exp(
            -((w - np.float32(zc)) / np.float32(45)) ** 2)
    return total


def render_slice(patient: Patient, bleeds: list[Bleed], geo: SliceGeometry, rng: np.random.Generator,
                 noise_hu: float = 4.0, fov_padding: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render one axial (or tilted) slice.

    Returns:
        hu: float32 (size, size) Hounsfield units.
        tissue: uint8 (size, size) tissue codes (AIR ... CALC) of the centre plane, before blur and noise.
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
    # The slice's sensitivity profile: the centre plane (weight 1/2) at the render resolution, the two
    # planes a third of the thickness away (1/4 each) at half of it, enough for smooth partial volume.
    hu_small = np.zeros((n, n), dtype=np.float32)
    tissue_small = np.full((n, n), AIR, dtype=np.uint8)
    masks_small: dict[str, np.ndarray] = {}
    for offset, weight, m_px in ((0.0, 0.5, n), (-half, 0.25, n // 2), (half, 0.25, n // 2)):
        plane = _Plane(geo, m_px, offset, reach)
        win = (slice(*plane.rows), slice(*plane.cols))
        tex, gr = (texture, grain) if m_px == n else (cv2.resize(texture, (m_px, m_px), interpolation=cv2.INTER_AREA),
                                                      cv2.resize(grain, (m_px, m_px), interpolation=cv2.INTER_AREA))
        masks = _paint(plane, patient, bleeds, tex[win], gr[win])
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
    hu = cv2.GaussianBlur(hu, (0, 0), PSF_SIGMA_MM / geo.pixel_mm)
    tissue = cv2.resize(tissue_small, (geo.size, geo.size), interpolation=cv2.INTER_NEAREST)
    masks = {k: cv2.resize(m.view(np.uint8), (geo.size, geo.size), interpolation=cv2.INTER_NEAREST).astype(bool)
             for k, m in masks_small.items()}
    # Noise: filtered (correlated) like a filtered back-projection, stronger low in the head.
    t_mid = geo.z * float(np.cos(geo.tilt)) / patient.semi_axes[2]
    sigma = noise_hu * (1 + 0.8 * max(0.0, -t_mid - 0.25))
    white = rng.standard_normal((geo.size, geo.size), dtype=np.float32)
    hu += cv2.GaussianBlur(white, (0, 0), NOISE_SIGMA_PX) * np.float32(sigma / _noise_gain(NOISE_SIGMA_PX))
    if geo.motion > 0:  # patient motion: a displaced ghost and smear along one direction
        dx, dy = rng.normal(0, 4, 2)
        shifted = cv2.warpAffine(hu, np.float32([[1, 0, dx], [0, 1, dy]]), (geo.size, geo.size),
                                 borderMode=cv2.BORDER_REPLICATE)
        hu = (1 - geo.motion) * hu + np.float32(geo.motion) * shifted
    if fov_padding:
        pad = _outside_fov(geo.size)
        hu[pad], tissue[pad] = PADDING_HU, PADDING
    return hu, tissue, masks


def _paint(pl: _Plane, pat: Patient, bleeds: list[Bleed], texture: np.ndarray, grain: np.ndarray) -> dict[str, np.ndarray]:
    """Paint the anatomy and the bleeds on one plane; return the bleed masks of that plane."""
    a, b, c = pat.semi_axes
    u, v, w = pl.u, pl.v, pl.w
    if pl.w_range[1] - pl.w_range[0] < 1e-3:  # an axial plane: one height, scalars are much cheaper
        t = np.float32(pl.w_range[0] / c)
        s = np.float32(section_scale(t))
    else:
        t = w / np.float32(c)
        s = section_scale(t)
    if not np.any(s > 0.05):
        return {}
    phi = np.arctan2(v, u)
    dist = np.hypot(u, v)
    cos_phi, sin_phi = u / np.maximum(dist, 1e-6), v / np.maximum(dist, 1e-6)
    r_ell = np.float32(a * b) / np.sqrt((np.float32(b) * cos_phi) ** 2 + (np.float32(a) * sin_phi) ** 2)
    radius = r_ell * s * (1 + _eval_harmonics(pat.outline, phi))
    depth = radius - dist  # mm inward from the skin
    head = (depth >= 0) & (s > 0.05)
    lateral = cos_phi ** 4
    posterior = np.clip(sin_phi, 0, None)
    low = np.clip((-t - 0.35) / 0.3, 0, 1)  # 0 above the skull base, 1 at the foramen magnum
    # Soft tissue: skin, fat, muscles (temporalis at the side, neck muscles behind, low).
    muscle = np.float32(pat.muscle_mm) * lateral * ((t > -0.7) & (t < 0.35)) + 25 * posterior ** 2 * low
    d_fat = np.float32(pat.skin_mm + pat.fat_mm)
    pl.paint(head, 42.0, SCALP)
    pl.paint(head & (depth >= pat.skin_mm) & (depth < d_fat), -95.0, FAT)
    pl.paint(head & (depth >= d_fat) & (depth < d_fat + muscle), 52.0, SCALP)
    # Skull: thickness varies around the head and with height; the temporal squama is thin.
    d_out = d_fat + muscle
    thick = np.float32(pat.skull_mm) * (1 + _eval_harmonics(pat.skull_shape, phi)) * (
        1 - 0.45 * lateral * ((t > -0.45) & (t < 0.25))) * (1 + 0.6 * low)
    frontal = np.exp(-((phi + np.pi / 2) / 0.35) ** 2) * np.exp(-((t + 0.12) / 0.14) ** 2)
    thick = np.clip(thick + 14 * frontal * pat.frontal_sinus, 2.5, 16)
    d_in = d_out + thick
    in_skull = head & (depth >= d_out) & (depth < d_in)
    frac = (depth - d_out) / thick
    table = np.abs(2 * frac - 1)
    bone_hu = np.where(table > 0.45, 1550 + 150 * grain, pat.diploe_hu + 120 * grain + 60 * texture)
    bone_hu = np.where(thick < 4, 1400 + 100 * grain, bone_hu)
    pl.paint(in_skull, bone_hu, BONE)
    if pat.frontal_sinus:  # air inside the thickened frontal bone
        fs = in_skull & (frontal > 0.35) & (table < 0.55)
        pl.paint(fs, -950.0, AIR)
    intra = head & (depth >= d_in)
    depth_in = depth - d_in  # mm inward from the inner table
    masks: dict[str, np.ndarray] = {}
    if not intra.any():
        return masks
    shift = _midline_shift(bleeds, v, w, c)
    us = u - shift  # midline structures follow the shift
    skull_base = _skull_base(pl, pat, intra, head, t, s, grain)
    intra &= ~skull_base
    # CSF rim, then brain: white matter, cortical ribbon, sulci and fissures.
    rim = np.float32(pat.csf_rim_mm) * (1 + 0.6 * np.clip(-sin_phi, 0, None))  # wider frontally
    pl.paint(intra, 8.0, CSF)
    brain = intra & (depth_in >= rim)
    pl.paint(brain, pat.wm_hu + texture, BRAIN)
    bd = depth_in - rim  # mm inward from the brain surface
    effaced = np.ones_like(u)  # sulcal width factor (1 = normal, 0 = effaced)
    for bl in bleeds:
        if bl.subtype in ("epidural", "subdural") and bl.volume_ml > 5:
            near = np.abs(_angle_diff(phi, np.float32(bl.params["phi"]))) < bl.params["half_angle"] + 0.4
            effaced = np.where(near & (np.abs(w - np.float32(bl.params["zc"])) < bl.params["half_height"] + 10),
                               np.float32(0.25), effaced)
    in_sulcus, cortex = _sulci(pat, w, phi, bd, brain, radius, effaced)
    pl.paint(cortex & brain, pat.gm_hu + texture, BRAIN)
    # deep grey nuclei (basal ganglia, thalami) sit around the ventricles
    for nu in pat.nuclei:
        m = brain & pl.inside(nu, shift)
        pl.paint(m, pat.gm_hu - 2 + texture, BRAIN)
    for le in pat.wm_lesions:
        m = brain & (pl.tissue == BRAIN) & pl.inside(le, shift) & ~cortex
        pl.hu[m] -= 7.0
    if pat.infarct is not None:
        inf = pat.infarct
        m = (brain & (np.abs(_angle_diff(phi, np.float32(inf["phi"]))) < inf["half_angle"])
             & (bd < inf["depth"]) & (np.abs(w - np.float32(inf["w0"])) < inf["half_height"]))
        pl.paint(m, 12.0 + 3 * texture, CSF)
    pl.paint(in_sulcus, 8.0, CSF)
    # Sylvian fissures: CSF clefts from the lateral surface towards the insula.
    sylv = np.zeros_like(brain)
    if ((t > -0.35) & (t < 0.15)).any():
        width = 1.5 + 3.0 * pat.atrophy
        for side in (-1, 1):
            x0, x1 = side * 0.85 * a, side * 0.45 * a
            y0, y1 = -0.08 * b, -0.2 * b
            sylv |= brain & (t > -0.35) & (t < 0.15) & (_segment_distance(u, v, x0, y0, x1, y1) < width / 2)
        pl.paint(sylv, 8.0, CSF)
    # Interhemispheric fissure and falx (above the tentorium; full depth above the corpus callosum).
    falx_zone = intra & (t > -0.15) & ((t > 0.3) | (np.abs(v) > 0.45 * b * s))
    ih_width = np.float32(1.0 + 2.5 * pat.atrophy)
    fissure = falx_zone & (np.abs(us) < ih_width)
    pl.paint(fissure, 8.0, CSF)
    pl.blend(np.where(falx_zone, np.clip(1.0 - np.abs(us) / 0.9, 0, 1), 0).astype(np.float32), 75.0, DURA)
    # Superior sagittal sinus: a triangle on the midline against the inner table.
    sss = intra & (t > -0.25) & (np.abs(us) < 5.0 - 0.8 * depth_in) & (depth_in < 5.5) & (np.abs(v) > 0.3 * b * s)
    pl.paint(sss, pat.sinus_hu + texture, DURA)
    # Ventricles (the side pushed by a bleed is compressed), septum, choroid calcifications.
    compress = {-1: 1.0, 1: 1.0}
    for bl in bleeds:
        if bl.side and bl.volume_ml > 8:
            compress[bl.side] = min(compress[bl.side], max(0.35, 1 - bl.volume_ml / 80))
    vent_masks = []
    for ve in pat.ventricles:
        side = int(np.sign(ve.center[0])) if ve.center[0] else 0
        f = compress.get(side, 1.0)
        vshape = ve if f == 1.0 else Ellipsoid(ve.center, (ve.radii[0] * f, ve.radii[1], ve.radii[2]), ve.angle)
        m = intra & pl.inside(vshape, shift)
        vent_masks.append((side, m, ve.center[2] < 0))
        pl.paint(m, 5.0, CSF)
    septum = intra & (np.abs(us) < 0.8) & (v < 0) & (t > 0.0) & (t < 0.35) & np.logical_or.reduce([m for _, m, _ in vent_masks[:4]] + [np.zeros_like(intra)])
    pl.paint(septum, pat.wm_hu, BRAIN)
    cistern = _posterior_fossa(pl, pat, intra, us, t, s, texture, depth_in)
    for ca in pat.calcifications:
        val = pl.value(ca.shape, shift if ca.midline else 0.0)
        pl.blend(np.where(intra | skull_base, np.clip(1.3 - val, 0, 1), 0).astype(np.float32), ca.hu, CALC)
    # Bleeds.
    ctx = dict(phi=phi, depth_in=depth_in, intra=intra, brain=brain, in_sulcus=in_sulcus, sylv=sylv,
               fissure=fissure, falx_zone=falx_zone, cistern=cistern, vent_masks=vent_masks, us=us, d_out=d_out, depth=depth,
               texture=texture, grain=grain, head=head)
    for bl in bleeds:
        m = _bleed(pl, pat, bl, ctx)
        if m is not None and m.any():
            masks[bl.subtype] = masks[bl.subtype] | m if bl.subtype in masks else m
    _beam_hardening(pl, pat, intra, t)
    return masks


def _segment_distance(u, v, x0, y0, x1, y1) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    k = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(u - (x0 + k * dx), v - (y0 + k * dy))


def _sulci(pat: Patient, w, phi, bd, brain, radius, effaced) -> tuple[np.ndarray, np.ndarray]:
    """Wavy radial CSF clefts from the cortical surface (angles drift with height) and the grey ribbon around them."""
    ribbon = np.float32(2.8)
    band = brain & (bd < pat.sulci_depth.max() + ribbon)
    in_sulcus = np.zeros(brain.shape, dtype=bool)
    cortex = brain & (bd < ribbon)
    if not band.any():
        return in_sulcus, cortex
    wc = float(np.median(w[band]))
    current = _angle_diff(pat.sulci_angles + pat.sulci_drift * wc, 0.0)
    order = np.argsort(current)
    angles = current[order].astype(np.float32)
    phi_b, bd_b = phi[band], bd[band]
    wavy = _angle_diff(phi_b + np.float32(0.05) * np.sin(bd_b * np.float32(0.5) + phi_b * 7), np.float32(0))
    idx = np.searchsorted(angles, wavy) % len(angles)
    best_dist = np.abs(_angle_diff(wavy, angles[idx]))
    best = idx
    prev = idx - 1  # the nearest sulcus is one of the two neighbours in angle
    dist = np.abs(_angle_diff(wavy, angles[prev]))
    closer = dist < best_dist
    best_dist[closer], best[closer] = dist[closer], prev[closer] % len(angles)
    k = order[best]
    across = best_dist * radius[band]
    half_w = pat.sulci_width[k] / 2 * effaced[band]
    hit = (bd_b < pat.sulci_depth[k]) & (across < half_w)
    in_sulcus[band] = hit
    cortex[band] |= (bd_b < pat.sulci_depth[k] + ribbon) & (across < half_w + ribbon)
    return in_sulcus, cortex


def _skull_base(pl: _Plane, pat: Patient, intra, head, t, s, grain) -> np.ndarray:
    """Below the tentorium the cranial cavity narrows to fossae: paint the bone, air cells, orbits and,
    lowest, the face's soft tissue in between; return the mask of what is no longer intracranial."""
    a, b, c = pat.semi_axes
    u, v = pl.u, pl.v
    base = np.zeros(intra.shape, dtype=bool)
    if not (t < -0.3).any():
        return base
    au = np.abs(u)
    zone = intra & (t < -0.36)
    # Petrous ridges: from the apex (beside the clivus) out to the mastoids, posterolaterally.
    v_pet = np.float32(-0.04 * b) + np.clip(au - np.float32(0.16 * a), 0, None) * np.float32(0.45 * b / a)
    post_fossa = zone & (v > v_pet + 4)
    mid_fossa = zone & (v < v_pet - 4) & (au > 0.28 * a) & (v > -0.5 * b * s) & (t > -0.6)
    ant_fossa = zone & (v < -0.4 * b * s) & (t > -0.43) & (au < 0.3 * a)
    cavity = post_fossa | mid_fossa | ant_fossa
    low = t < -0.6
    if low.any():  # lowest: only the foramen magnum region stays intracranial
        fm = pl.value(Ellipsoid((0, 0.3 * b, -0.66 * c), (0.42 * a, 0.38 * b, 0.3 * c)))
        cavity &= ~low | (fm < 1)
    base = zone & ~cavity
    pl.paint(base, pat.diploe_hu + 250 + 150 * grain, BONE)
    petrous = base & (np.abs(v - v_pet) < 5) & (au > 0.14 * a) & (au < 0.85 * a) & (t > -0.62)
    pl.paint(petrous, 1750 + 150 * grain, BONE)
    if low.any():  # the face and neck: muscle and fat, bone only around the foramen magnum
        soft = head & low & (pl.tissue == BONE) & (fm > 1.45) & (v < 0.2 * b)
        pl.paint(soft, 50 + 3 * grain, SCALP)
    for side in (-1, 1):
        # mastoid air cells: a honeycomb behind the petrous bone, laterally
        m = base & pl.inside(Ellipsoid((side * 0.68 * a, 0.2 * b, -0.47 * c), (0.17 * a, 0.15 * b, 0.15 * c)))
        cells = (np.sin(u * 1.1) * np.sin(v * 1.3) * np.sin(pl.w * 0.9) + 0.25 * grain) > 0.15
        pl.paint(m & cells, -850.0, AIR)
        mx = head & pl.inside(Ellipsoid((side * 0.34 * a, -0.6 * b, -0.78 * c), (0.2 * a, 0.2 * b, 0.18 * c)))
        pl.paint(mx, -920.0, AIR)  # maxillary sinus
    sph = base & pl.inside(Ellipsoid((0.0, -0.24 * b, -0.47 * c), (0.17 * a, 0.13 * b, 0.11 * c)))
    pl.paint(sph, -900.0, AIR)
    eth = base & (au < 0.15 * a) & (v < -0.5 * b) & (t > -0.62) & (t < -0.36)
    pl.paint(eth & ((np.sin(u * 1.2) * np.sin(v * 1.0) + 0.2 * grain) > -0.2), -880.0, AIR)
    nasal = head & low & (au < 0.14 * a) & (v < -0.5 * b)
    pl.paint(nasal & ((np.sin(u * 0.7) + 0.3 * grain) > -0.6), -900.0, AIR)
    for side in (-1, 1):  # orbit: fat cone with the globe (lens in front) and the recti
        orb = head & pl.inside(Ellipsoid((side * 0.42 * a, -0.72 * b, -0.45 * c), (16.0, 21.0, 14.0), -side * 0.25))
        if not orb.any():
            continue
        pl.paint(orb, -85.0, FAT)
        globe = pl.value(Ellipsoid((side * 0.44 * a, -0.8 * b, -0.45 * c), (11.5, 11.5, 11.5)))
        pl.paint(orb & (globe < 1.0), 40.0, SCALP)
        pl.paint(orb & (globe < 0.82), 8.0, CSF)
        pl.paint(orb & pl.inside(Ellipsoid((side * 0.44 * a, -0.8 * b - 8.5, -0.45 * c), (4.0, 1.8, 4.0))), 110.0, SCALP)
        for du in (-9.0, 9.0):
            pl.paint(orb & pl.inside(Ellipsoid((side * 0.44 * a + du, -0.64 * b, -0.45 * c), (2.0, 13.0, 3.0))), 50.0, SCALP)
    cliv = base & (au < 0.12 * a) & (np.abs(v + 0.06 * b) < 6) & (t < -0.36)
    pl.paint(cliv, 1100 + 100 * grain, BONE)
    return base


def _posterior_fossa(pl: _Plane, pat: Patient, intra, us, t, s, texture, depth_in) -> np.ndarray:
    """Tentorium, cerebellum (folia), vermis, brainstem and the basal cisterns; return the cistern mask."""
    a, b, c = pat.semi_axes
    u, v, w = pl.u, pl.v, pl.w
    cistern = np.zeros(intra.shape, dtype=bool)
    lowz = (t < -0.08)
    if not lowz.any():
        return cistern
    # Tentorium: a V opening backwards, wider and further forward lower in the head.
    depth_t = np.clip((-t - 0.08) / 0.4, 0, 1)  # 0 at the top of the tentorium, 1 below it
    v0 = np.float32(0.45 * b) - depth_t * np.float32(0.5 * b)
    slope = 0.3 + 1.6 * depth_t
    infra = intra & lowz & (v > v0) & (np.abs(us) < slope * (v - v0))
    infra |= intra & (t < -0.48) & (v > -0.05 * b)
    edge = np.abs(np.abs(us) - slope * (v - v0)) / np.sqrt(1 + slope * slope)
    tent = intra & lowz & (t > -0.48) & (v > v0)
    pl.blend(np.where(tent, np.clip(1.0 - edge / 0.9, 0, 1), 0).astype(np.float32), 70.0, DURA)
    # cerebellum: folia (fine concentric striations of cortex and white matter) in the infratentorial
    # brain, on average between grey and white matter as on real CT
    cb = infra & (pl.tissue == BRAIN)
    r = np.hypot(us, v - np.float32(0.15 * b))
    folia = np.sin(r * 1.4 + 2 * np.sin(np.arctan2(v, us) * 3))
    pl.hu[cb] = ((pat.gm_hu + pat.wm_hu) / 2 + texture + 0.4 * (pat.gm_hu - pat.wm_hu) * folia)[cb]
    vermis = cb & (np.abs(us) < 1.2) & (v > 0.3 * b)
    pl.paint(vermis, 8.0, CSF)
    # transverse sinuses: channels up to ~5.5 mm deep and ~9 mm tall in the tentorium's attachment along the
    # occipital inner table, from the torcula on the midline round to the petrous ridges
    across = 1.0 - ((t + np.float32(0.35)) / np.float32(0.05)) ** 2  # > 0 within the sinus' height
    if np.any(across > 0):
        ts_depth = np.float32(5.5) * np.sqrt(np.clip(across, 0, None))
        ts = intra & (depth_in < ts_depth) & (pl.tissue != BONE) & (v > 0.35 * np.hypot(u, v))
        pl.paint(ts, pat.sinus_hu + texture, DURA)
    # brainstem: midbrain, pons, medulla with cisterns around; fourth ventricle behind
    stem_v = np.float32(0.06 * b)
    stem_r = np.where(t > -0.3, np.float32(12.0), np.where(t > -0.55, np.float32(15.0), np.float32(10.0)))
    stem_d = np.hypot(us / 1.15, v - stem_v)
    in_range = intra & (t < -0.12) & (t > -0.85)
    ring = in_range & (stem_d < stem_r + 2.0 + 2.5 * pat.atrophy) & (stem_d >= stem_r)
    pl.paint(ring, 8.0, CSF)
    cistern |= ring
    pl.paint(in_range & (stem_d < stem_r), pat.wm_hu + 3 + texture, BRAIN)
    # suprasellar cistern: a five-pointed star in front of the midbrain
    cu, cv, cz = pat.cistern_center
    kz = np.clip(1.0 - ((w - np.float32(cz)) / 10.0) ** 2, 0, None)
    ang = np.arctan2(v - np.float32(cv), us - np.float32(cu))
    r_c = np.float32(pat.cistern_radius) * np.sqrt(kz) * (0.6 + 0.4 * np.cos(5 * ang))
    star = intra & (np.hypot(us - np.float32(cu), v - np.float32(cv)) < r_c) & (kz > 0)
    pl.paint(star, 8.0, CSF)
    cistern |= star
    return cistern


def _irregular(h: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Radius factor of an irregular outline (harmonics 2-4 plus a finer 7th)."""
    return 1 + _eval_harmonics(h, ang) + 0.04 * np.sin(7 * ang + np.float32(h[0, 1]))


def _bleed(pl: _Plane, pat: Patient, bl: Bleed, ctx: dict) -> np.ndarray | None:
    p = bl.params
    u, v, w = pl.u, pl.v, pl.w
    phi, depth_in, intra = ctx["phi"], ctx["depth_in"], ctx["intra"]
    tex, grain = ctx["texture"], ctx["grain"]
    blood = np.float32(bl.hu) + 0.8 * tex + 2.0 * grain
    if bl.subtype in ("epidural", "subdural"):
        dz = (w - np.float32(p["zc"])) / np.float32(p["half_height"])
        if (np.abs(dz) >= 1).all():
            return None
        dphi = _angle_diff(phi, np.float32(p["phi"])) / np.float32(p["half_angle"])
        if bl.subtype == "epidural":  # biconvex lens: thickest in the middle, tapering to the edges
            prof = np.sqrt(np.clip(1.0 - dphi * dphi - dz * dz, 0, None))
        else:  # crescent: flat-topped along the skull, thin ends
            prof = np.sqrt(np.clip(1.0 - dphi ** 4, 0, None)) * np.sqrt(np.clip(1.0 - dz ** 4, 0, None))
        thick = np.float32(p["thickness"]) * prof * _irregular(p["edge"], dphi * 2)
        mask = intra & (depth_in < thick) & (prof > 0)
        hu = blood
        if bl.subtype == "epidural" and p["swirl"]:  # active bleeding: hypodense swirls in the clot
            hu = np.where(np.sin(dphi * 9 + depth_in * 0.8) > 0.6, blood - 22, blood)
        if bl.stage == "mixed":  # acute on chronic: the fresh blood settles to the dependent side
            hu = np.where(v > np.float32(p["level"]), np.float32(p["acute_hu"]) + tex, blood)
        pl.paint(mask, hu, BLOOD)
        if bl.subtype == "epidural" and p["fracture"]:  # the fracture line beside it, through the skull
            near = (np.abs(dphi) < 0.5) & (np.abs(dz) < 1.1)
            across = np.abs(_angle_diff(phi, np.float32(p["phi"] + 0.15 * p["half_angle"]))) * np.hypot(u, v)
            crack = near & (across < 0.7) & (pl.tissue == BONE) & (ctx["depth"] >= ctx["d_out"])
            pl.paint(crack, 45.0, SCALP)
        return mask
    if bl.subtype == "subarachnoid":
        dz = np.abs(w - np.float32(p["zc"])) / np.float32(p["half_height"])
        if (dz >= 1).all():
            return None
        near_z = dz < 1
        kind = p["kind"]
        if kind == "cistern":
            mask = ctx["cistern"] & near_z
        elif kind == "sylvian":
            mask = ctx["sylv"] & near_z & (np.sign(u) == p["side"])
        elif kind == "interhemispheric":  # blood distends the fissure and spills into the paramedian sulci
            b = np.float32(pat.semi_axes[1])
            along = near_z & (v > -0.85 * b) & (v < np.float32(p["reach"]) * b)
            half_w = np.float32(p["half_width"]) * np.sqrt(np.clip(1 - dz * dz, 0, None))
            mask = ctx["falx_zone"] & along & (np.abs(ctx["us"]) < np.maximum(half_w, 0.5))
            mask |= ctx["in_sulcus"] & along & (np.abs(ctx["us"]) < 18)
        else:
            region = np.abs(_angle_diff(phi, np.float32(p["phi"]))) < p["half_angle"] * np.sqrt(np.clip(1 - dz * dz, 0, None))
            rim = intra & (pl.tissue == CSF) & (depth_in < pat.csf_rim_mm * 1.6)
            mask = (ctx["in_sulcus"] | rim) & region
        # thin blood mixed with the CSF it lies in
        pl.paint(mask, np.float32(p["fill"]) * blood + np.float32(1 - p["fill"]) * 8.0, BLOOD)
        return mask
    if bl.subtype == "intraparenchymal":
        cu, cv, cz = p["center"]
        ru, rv, rz = p["radii"]
        k2 = 1.0 - ((w - np.float32(cz)) / np.float32(rz)) ** 2
        if (k2 <= 0).all():
            return None
        ca, sa = np.float32(np.cos(p["angle"])), np.float32(np.sin(p["angle"]))
        du, dv = u - np.float32(cu), v - np.float32(cv)
        pa, pb = (ca * du + sa * dv) / np.float32(ru), (-sa * du + ca * dv) / np.float32(rv)
        rho = np.sqrt(pa * pa + pb * pb) / _irregular(p["edge"], np.arctan2(pb, pa))
        sk = np.sqrt(np.clip(k2, 0, None))
        tissue_ok = ctx["brain"] | (pl.tissue == OEDEMA)
        core = tissue_ok & (rho <= sk) & (k2 > 0)
        if p["oedema_mm"] > 0:
            ed = tissue_ok & ~core & (rho <= sk + np.float32(p["oedema_mm"] / min(ru, rv))) & (k2 > -0.3)
            ed &= (pl.tissue == BRAIN)
            pl.hu[ed] -= np.float32(p["oedema_hu"]) * (0.6 + 0.4 * np.clip(tex[ed], -1, 1))
            pl.tissue[ed] = OEDEMA
        hu = blood
        if p["level"]:  # anticoagulated: a fluid level, cells settle to the dependent side
            hu = np.where(v > np.float32(cv), blood + 8, blood - 18)
        pl.paint(core, hu, BLOOD)
        return core
    if bl.subtype == "intraventricular":
        mask = np.zeros(u.shape, dtype=bool)
        for side_index in p["sides"]:
            side = -1 if side_index == 0 else 1
            for vs, m, temporal_horn in ctx["vent_masks"]:
                if vs != side or temporal_horn:  # the bodies, frontal and occipital horns; not the temporal horns
                    continue
                mask |= m if p["kind"] == "cast" else m & (v > np.float32(p["level"]))
        pl.paint(mask, blood, BLOOD)
        return mask
    raise ValueError(f"unknown subtype {bl.subtype!r}")


def _beam_hardening(pl: _Plane, pat: Patient, intra, t) -> None:
    """The dark band between the petrous bones (and a fainter one across the posterior fossa)."""
    a, b, c = pat.semi_axes
    zone = intra & (t < -0.38) & (t > -0.62)
    if not zone.any():
        return
    u, v = pl.u, pl.v
    x0, y0, x1, y1 = -0.55 * a, 0.12 * b, 0.55 * a, 0.12 * b
    d = _segment_distance(u, v, x0, y0, x1, y1)
    pl.hu[zone] -= (np.float32(pat.beam_hardening_hu) * np.exp(-(d / 6.0) ** 2))[zone]
