"""Intracranial bleeds as closed 3-D shapes, one class per pattern.

Each pattern draws its own shape where its subtype occurs (``sample``), paints its blood on a plane whose
anatomy is painted (``paint``, returning the plane's mask of it) and says what it does to the head around it
(``add_mass_effect``); a slice's labels follow from the bleeds that cut it (the centre plane, at least
``min_label_area_mm2``):

- epidural: biconvex lens against the inner table, often beside a skull fracture;
- subdural: crescent along the inner table, acute, subacute (isodense), chronic (hypodense) or mixed
  with a haematocrit level;
- subarachnoid: blood in the sulci of a convexity region, a Sylvian fissure, the interhemispheric
  fissure or the basal cisterns, partial-volumed with the CSF it mixes with;
- intraparenchymal: irregular clot in lobar white matter or the deep grey nuclei, with or without
  oedema of variable width and depth, sometimes a fluid level;
- intraventricular: blood layering in the dependent occipital horns, or a cast of one ventricle.

Large bleeds push: midline shift (the falx bows, ventricles and deep nuclei move), a compressed ipsilateral
ventricle and effaced sulci. A new pattern is a subclass here, registered in ``PATTERNS`` under its subtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ichpipe.base.labels import SUBTYPES
from ichpipe.synthetic.anatomy import MassEffect, Patient, PlaneContext, eval_harmonics, harmonics, section_scale
from ichpipe.synthetic.geometry import BLOOD, BONE, BRAIN, CSF, OEDEMA, SCALP, Plane, angle_diff

STAGE_HU = {  # bleed density by age of the blood
    "acute": (58.0, 85.0), "hyperacute": (45.0, 57.0), "subacute": (30.0, 44.0), "chronic": (8.0, 24.0),
}


def irregular(h: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Radius factor of an irregular outline (harmonics 2-4 plus a finer 7th)."""
    return 1 + eval_harmonics(h, ang) + 0.04 * np.sin(7 * ang + np.float32(h[0, 1]))


@dataclass(kw_only=True)
class Bleed(ABC):
    """One bleed: its density and age, and the shape parameters of its pattern (mm, radians, HU)."""

    subtype: ClassVar[str]
    faint_stages: ClassVar[dict[str, float]] = {"hyperacute": 1.0}  # the ages of a faint one, with their odds
    hu: float
    faint: bool = False  # not acute: at most ~57 HU, down to hypodense for chronic subdurals
    stage: str = "acute"
    volume_ml: float = 0.0
    side: int = 0  # -1 / +1: the u side it pushes from (mass effect); 0 none

    @classmethod
    @abstractmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Bleed:
        """One bleed of this pattern in ``patient``'s head; ``common`` are the ``Bleed`` fields already drawn."""

    @abstractmethod
    def paint(self, pl: Plane, pat: Patient, ctx: PlaneContext) -> np.ndarray | None:
        """Paint this bleed on ``pl``; return its mask there (None where it misses the plane)."""

    def lateral_u(self) -> float | None:
        """Where it sits left-right (its sign is the side a large one pushes from); None for patterns that do not
        push."""
        return None

    @property
    def z_centre(self) -> float:
        """Its height in the head frame (mm): where its midline shift is strongest."""
        return 0.0

    def add_mass_effect(self, mass: MassEffect) -> None:
        """A large bleed shifts the midline and squeezes the ventricle on its side."""
        if not self.side or self.volume_ml <= 8:
            return
        mm = min(14.0, 0.22 * (self.volume_ml - 8))
        mass.pushes.append((self.side * mm, self.z_centre))
        mass.squeeze[self.side] = min(mass.squeeze[self.side], max(0.35, 1 - self.volume_ml / 80))

    def blood(self, ctx: PlaneContext) -> np.ndarray:
        """Its HU on the plane, textured."""
        return np.float32(self.hu) + 0.8 * ctx.texture + 2.0 * ctx.grain


@dataclass(kw_only=True)
class ExtraAxial(Bleed):
    """A collection against the inner table, ``thickness`` mm at its thickest, over ``half_angle`` around the head
    and ``half_height`` mm up and down from ``zc``."""

    phi: float
    half_angle: float
    zc: float
    half_height: float
    thickness: float
    edge: np.ndarray  # harmonics of its irregular edge

    def lateral_u(self) -> float:
        return np.cos(self.phi)

    @property
    def z_centre(self) -> float:
        return self.zc

    def add_mass_effect(self, mass: MassEffect) -> None:
        super().add_mass_effect(mass)
        if self.volume_ml > 5:  # the sulci beneath it are effaced
            mass.effacing.append((self.phi, self.half_angle, self.zc, self.half_height))
        mass.collections.append(self)  # the template brain is pushed in by its local thickness

    def local_thickness(self, phi: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Its thickness (mm) at each point's angle around the head and height (0 outside it)."""
        dz = (w - np.float32(self.zc)) / np.float32(self.half_height)
        dphi = angle_diff(phi, np.float32(self.phi)) / np.float32(self.half_angle)
        prof = self.profile(dphi, dz)
        return np.where((np.abs(dz) < 1) & (prof > 0),
                        np.float32(self.thickness) * prof * irregular(self.edge, dphi * 2), np.float32(0))

    @abstractmethod
    def profile(self, dphi: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """Thickness profile (0..1) over the normalised angle and height."""

    def density(self, blood: np.ndarray, dphi: np.ndarray, pl: Plane, ctx: PlaneContext) -> np.ndarray:
        return blood

    def paint(self, pl: Plane, pat: Patient, ctx: PlaneContext) -> np.ndarray | None:
        dz = (pl.w - np.float32(self.zc)) / np.float32(self.half_height)
        if (np.abs(dz) >= 1).all():
            return None
        dphi = angle_diff(ctx.phi, np.float32(self.phi)) / np.float32(self.half_angle)
        thick = self.local_thickness(ctx.phi, pl.w)
        mask = ctx.intra & (ctx.depth_in < thick) & (thick > 0)
        pl.paint(mask, self.density(self.blood(ctx), dphi, pl, ctx), BLOOD)
        self.paint_beside(pl, ctx, dphi, dz)
        return mask

    def paint_beside(self, pl: Plane, ctx: PlaneContext, dphi: np.ndarray, dz: np.ndarray) -> None:
        """What comes with it outside the blood (nothing by default)."""


@dataclass(kw_only=True)
class Epidural(ExtraAxial):
    """Biconvex lens, thickest in the middle, tapering to the edges; often beside a fracture; sometimes swirling."""

    subtype: ClassVar[str] = "epidural"
    fracture: bool
    swirl: bool  # active bleeding: hypodense swirls in the clot

    @classmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Epidural:
        c = patient.semi_axes[2]
        bleed = cls(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.2, 0.4),
                    zc=rng.uniform(-0.15, 0.55) * c, half_height=rng.uniform(12, 26),
                    thickness=rng.uniform(6, 20), fracture=bool(rng.random() < 0.75),
                    edge=harmonics(rng, 0.25), swirl=bool(rng.random() < 0.25), **common)
        bleed.volume_ml = float(0.6 * bleed.half_angle * 70 * bleed.half_height * bleed.thickness / 1000)
        return bleed

    def profile(self, dphi: np.ndarray, dz: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(1.0 - dphi * dphi - dz * dz, 0, None))

    def density(self, blood: np.ndarray, dphi: np.ndarray, pl: Plane, ctx: PlaneContext) -> np.ndarray:
        if self.swirl:
            return np.where(np.sin(dphi * 9 + ctx.depth_in * 0.8) > 0.6, blood - 22, blood)
        return blood

    def paint_beside(self, pl: Plane, ctx: PlaneContext, dphi: np.ndarray, dz: np.ndarray) -> None:
        if self.fracture:  # the fracture line beside it, through the skull
            near = (np.abs(dphi) < 0.5) & (np.abs(dz) < 1.1)
            across = np.abs(angle_diff(ctx.phi, np.float32(self.phi + 0.15 * self.half_angle))) * np.hypot(pl.u, pl.v)
            crack = near & (across < 0.7) & (pl.tissue == BONE) & (ctx.depth >= ctx.d_out)
            pl.paint(crack, 45.0, SCALP)


@dataclass(kw_only=True)
class Subdural(ExtraAxial):
    """Crescent, flat-topped along the skull with thin ends; acute on chronic ("mixed"): the fresh blood settles
    to the dependent side of ``level``."""

    subtype: ClassVar[str] = "subdural"
    faint_stages: ClassVar[dict[str, float]] = {"hyperacute": 0.25, "subacute": 0.3, "chronic": 0.3, "mixed": 0.15}
    level: float  # v of the haematocrit level of a mixed one
    acute_hu: float  # the fresh blood's HU there

    @classmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Subdural:
        c = patient.semi_axes[2]
        bleed = cls(phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.6, 1.2),
                    zc=rng.uniform(-0.05, 0.5) * c, half_height=rng.uniform(22, 45),
                    thickness=rng.uniform(2.5, 12 if common["stage"] in ("chronic", "mixed") else 9),
                    edge=harmonics(rng, 0.3), level=rng.uniform(-10, 25), acute_hu=rng.uniform(58, 78), **common)
        bleed.volume_ml = float(1.2 * bleed.half_angle * 70 * bleed.half_height * bleed.thickness / 1000)
        return bleed

    def profile(self, dphi: np.ndarray, dz: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(1.0 - dphi ** 4, 0, None)) * np.sqrt(np.clip(1.0 - dz ** 4, 0, None))

    def density(self, blood: np.ndarray, dphi: np.ndarray, pl: Plane, ctx: PlaneContext) -> np.ndarray:
        if self.stage == "mixed":
            return np.where(pl.v > np.float32(self.level), np.float32(self.acute_hu) + ctx.texture, blood)
        return blood


@dataclass(kw_only=True)
class Subarachnoid(Bleed):
    """Thin blood mixed with the CSF it lies in: the sulci of a convexity region, one Sylvian fissure, the
    interhemispheric fissure (distended, spilling into the paramedian sulci) or the basal cisterns."""

    subtype: ClassVar[str] = "subarachnoid"
    kind: Literal["sulcal", "sylvian", "interhemispheric", "cistern"]
    phi: float
    half_angle: float
    zc: float
    half_height: float
    fissure_side: int  # the Sylvian fissure's side (-1 / +1)
    fill: float  # the share of blood in the CSF
    half_width: float = 0.0  # interhemispheric: mm either side of the midline
    reach: float = 0.0  # interhemispheric: from the front back to ``reach`` x the head's half-length

    @classmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Subarachnoid:
        c = patient.semi_axes[2]
        kind = str(rng.choice(["sulcal", "sylvian", "interhemispheric", "cistern"], p=[0.45, 0.2, 0.15, 0.2]))
        bleed = cls(kind=kind, phi=rng.uniform(-np.pi, np.pi), half_angle=rng.uniform(0.35, 0.9),
                    zc=rng.uniform(-0.1, 0.6) * c if kind in ("sulcal", "interhemispheric")
                    else patient.cistern_center[2] + rng.uniform(0, 20),
                    half_height=rng.uniform(10, 24), fissure_side=int(rng.choice([-1, 1])),
                    fill=rng.uniform(0.6, 1.0), **common)
        if kind == "cistern":
            bleed.zc = patient.cistern_center[2]
            bleed.half_height = rng.uniform(8, 14)
        elif kind == "interhemispheric":
            bleed.half_width, bleed.reach = rng.uniform(1.5, 4.0), rng.uniform(-0.3, 0.5)
        return bleed

    def paint(self, pl: Plane, pat: Patient, ctx: PlaneContext) -> np.ndarray | None:
        blood = self.blood(ctx)
        dz = np.abs(pl.w - np.float32(self.zc)) / np.float32(self.half_height)
        if (dz >= 1).all():
            return None
        near_z = dz < 1
        if self.kind == "cistern":
            mask = ctx.cistern & near_z
        elif self.kind == "sylvian":
            mask = ctx.sylvian & near_z & (np.sign(pl.u) == self.fissure_side)
        elif self.kind == "interhemispheric":
            b = np.float32(pat.semi_axes[1])
            along = near_z & (pl.v > -0.85 * b) & (pl.v < np.float32(self.reach) * b)
            half_w = np.float32(self.half_width) * np.sqrt(np.clip(1 - dz * dz, 0, None))
            mask = ctx.falx_zone & along & (np.abs(ctx.us) < np.maximum(half_w, 0.5))
            mask |= ctx.in_sulcus & along & (np.abs(ctx.us) < 18)
        else:
            region = np.abs(angle_diff(ctx.phi, np.float32(self.phi))) < self.half_angle * np.sqrt(
                np.clip(1 - dz * dz, 0, None))
            rim = ctx.intra & (pl.tissue == CSF) & (ctx.depth_in < pat.csf_rim_mm * 1.6)
            mask = (ctx.in_sulcus | rim) & region
        pl.paint(mask, np.float32(self.fill) * blood + np.float32(1 - self.fill) * 8.0, BLOOD)
        return mask


@dataclass(kw_only=True)
class Intraparenchymal(Bleed):
    """An irregular clot in lobar white matter or a deep grey nucleus (hypertensive), with or without oedema
    around it, sometimes with a fluid level (anticoagulated)."""

    subtype: ClassVar[str] = "intraparenchymal"
    faint_stages: ClassVar[dict[str, float]] = {"hyperacute": 0.5, "subacute": 0.5}
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float
    edge: np.ndarray
    oedema_mm: float
    oedema_hu: float
    level: bool

    @classmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Intraparenchymal:
        deep = rng.random() < 0.45  # hypertensive: putamen / thalamus; else lobar
        if deep:
            nucleus = patient.nucleus_centre(int(rng.choice([1, 2, 4, 5])))  # a lentiform nucleus or thalamus
            center = tuple(np.asarray(nucleus) + rng.normal(0, 3, 3))
        else:
            center = _lobar_centre(rng, patient)
        r = float(np.exp(rng.uniform(np.log(4), np.log(20))))
        bleed = cls(center=center, radii=(r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), r * rng.uniform(0.8,
                                                                                                                1.4)),
                    angle=rng.uniform(0, np.pi), edge=harmonics(rng, 0.45),
                    oedema_mm=float(rng.uniform(0, 8)) if rng.random() < 0.75 else 0.0,
                    oedema_hu=float(rng.uniform(3, 12)), level=bool(rng.random() < 0.15), **common)
        bleed.volume_ml = float(4 / 3 * np.pi * np.prod(bleed.radii) / 1000)
        return bleed

    def lateral_u(self) -> float:
        return self.center[0]

    @property
    def z_centre(self) -> float:
        return self.center[2]

    def paint(self, pl: Plane, pat: Patient, ctx: PlaneContext) -> np.ndarray | None:
        blood = self.blood(ctx)
        cu, cv, cz = self.center
        ru, rv, rz = self.radii
        k2 = 1.0 - ((pl.w - np.float32(cz)) / np.float32(rz)) ** 2
        if (k2 <= 0).all():
            return None
        ca, sa = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        du, dv = pl.u - np.float32(cu), pl.v - np.float32(cv)
        pa, pb = (ca * du + sa * dv) / np.float32(ru), (-sa * du + ca * dv) / np.float32(rv)
        rho = np.sqrt(pa * pa + pb * pb) / irregular(self.edge, np.arctan2(pb, pa))
        sk = np.sqrt(np.clip(k2, 0, None))
        tissue_ok = ctx.brain | (pl.tissue == OEDEMA)
        core = tissue_ok & (rho <= sk) & (k2 > 0)
        if self.oedema_mm > 0:
            ed = tissue_ok & ~core & (rho <= sk + np.float32(self.oedema_mm / min(ru, rv))) & (k2 > -0.3)
            ed &= (pl.tissue == BRAIN)
            pl.hu[ed] -= np.float32(self.oedema_hu) * (0.6 + 0.4 * np.clip(ctx.texture[ed], -1, 1))
            pl.tissue[ed] = OEDEMA
        hu = blood
        if self.level:  # cells settle to the dependent side
            hu = np.where(pl.v > np.float32(cv), blood + 8, blood - 18)
        pl.paint(core, hu, BLOOD)
        return core


def _lobar_centre(rng: np.random.Generator, patient: Patient) -> tuple[float, float, float]:
    """A clot centre in lobar white matter, clear of the ventricles (rejection-sampled)."""
    a, b, c = patient.semi_axes
    for _ in range(100):
        t = rng.uniform(-0.15, 0.6)
        s = section_scale(t)
        ang = rng.uniform(-np.pi, np.pi)
        frac = rng.uniform(0.25, 0.6)
        center = (frac * a * s * np.cos(ang), frac * b * s * np.sin(ang), t * c)
        if not any(ve.value(*[np.float32(x) for x in center]) < 2.5 for ve in patient.ventricles):
            break
    return center


@dataclass(kw_only=True)
class Intraventricular(Bleed):
    """Blood layering in the dependent part of the lateral ventricles (below ``level``), or a cast filling one;
    the temporal horns stay clear."""

    subtype: ClassVar[str] = "intraventricular"
    kind: Literal["cast", "layering"]
    sides: list[int]  # 0 = left (-u), 1 = right
    level: float

    @classmethod
    def sample(cls, rng: np.random.Generator, patient: Patient, **common) -> Intraventricular:
        kind = "cast" if rng.random() < 0.25 else "layering"
        return cls(kind=kind, sides=[int(rng.integers(0, 2))] if kind == "cast" or rng.random() < 0.4 else [0, 1],
                   level=rng.uniform(-6, 12), **common)

    def paint(self, pl: Plane, pat: Patient, ctx: PlaneContext) -> np.ndarray | None:
        blood = self.blood(ctx)
        mask = np.zeros(pl.u.shape, dtype=bool)
        for side_index in self.sides:
            side = -1 if side_index == 0 else 1
            for vs, m, temporal_horn in ctx.ventricles:
                if vs != side or temporal_horn:
                    continue
                mask |= m if self.kind == "cast" else m & (pl.v > np.float32(self.level))
        pl.paint(mask, blood, BLOOD)
        return mask


PATTERNS: dict[str, type[Bleed]] = {cls.subtype: cls for cls in (Epidural, Subdural, Subarachnoid, Intraparenchymal,
                                                                 Intraventricular)}
assert set(PATTERNS) == set(SUBTYPES), "a bleed pattern for every subtype"


def sample_bleed(rng: np.random.Generator, subtype: str, patient: Patient, faint: bool) -> Bleed:
    """A bleed of ``subtype`` placed where that subtype occurs in this patient's head.

    ``faint``: not acute (the pattern's ``faint_stages``: hyperacute, subacute, chronic or mixed density) instead
    of the acute 58-85 HU.
    """
    if subtype not in PATTERNS:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {SUBTYPES}")
    cls = PATTERNS[subtype]
    stage = "acute"
    if faint:
        stages = cls.faint_stages
        stage = next(iter(stages)) if len(stages) == 1 else str(rng.choice(list(stages), p=list(stages.values())))
    lo, hi = STAGE_HU["chronic" if stage == "mixed" else stage]
    bleed = cls.sample(rng, patient, hu=float(rng.uniform(lo, hi)), faint=faint, stage=stage)
    u = bleed.lateral_u()
    if bleed.volume_ml > 8 and u is not None:
        bleed.side = 1 if u >= 0 else -1
    return bleed


def mass_effect(bleeds: list[Bleed]) -> MassEffect:
    """What ``bleeds`` together do to the anatomy around them."""
    mass = MassEffect()
    for bl in bleeds:
        bl.add_mass_effect(mass)
    return mass
