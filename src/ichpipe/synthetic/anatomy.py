"""A head's anatomy: sampling one (``sample_patient``) and painting it on a plane (``paint_anatomy``).

From the skin inwards and from the skull base up, varying per patient:

    skin | subcutaneous fat | temporalis / neck muscles | skull (outer table, diploe, inner table;
    thickness varying around the head, thin temporal squama, frontal sinus) | CSF rim | cortex and
    white matter with gyri and sulci, Sylvian and interhemispheric fissures, falx, superior sagittal
    sinus, deep grey nuclei, lateral/third/fourth ventricles, tentorium, cerebellum with folia,
    brainstem and cisterns; at the skull base orbits (globe, lens, fat), ethmoid/sphenoid/maxillary
    air, petrous ridges, mastoid air cells, clivus.

The mimics of blood live here too, since they are part of a head: physiological calcifications (choroid
plexus, pineal, basal ganglia, falx, vessels) and age effects (atrophy, white-matter hypodensities, old
infarcts) in a realistic share of patients. A new mimic is a field of ``Patient``, drawn in
``sample_patient`` and painted in ``paint_anatomy``'s steps.

What the bleeds do to the anatomy (midline shift, a squeezed ventricle, effaced sulci) arrives as a
``MassEffect`` (bleeds.py fills it); what the bleeds need of the anatomy (where the brain, sulci, cisterns and
ventricles are on this plane) leaves as a ``PlaneContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ichpipe.synthetic.geometry import (
    AIR,
    BONE,
    BRAIN,
    CALC,
    CSF,
    DURA,
    FAT,
    SCALP,
    Ellipsoid,
    Plane,
    angle_diff,
    segment_distance,
)
from ichpipe.synthetic.template import (
    ATROPHY_MM,
    CISTERN,
    DEEP_NUCLEI_MNI,
    SULCUS,
    SYLVIAN,
    TEMPORAL_HORN,
    VENTRICLE,
    Warp,
    load_template,
)


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
    # synthetic.anatomy = template: this patient's ICBM152 brain (ichpipe.synthetic.template) replaces the drawn
    # brain, ventricles, sulci, fissures, cerebellum and brainstem; None: the drawn anatomy
    warp: Warp | None = None

    NUCLEUS_KINDS = ("caudate", "lentiform", "thalamus")  # nuclei's order on each side (sample_patient)

    def nucleus_centre(self, k: int) -> tuple[float, float, float]:
        """Where ``nuclei[k]`` is: the drawn ellipsoid's centre, or with the template anatomy the template's own
        nucleus of that kind on that side (the lentiform nucleus and thalamus; others stay drawn)."""
        drawn = self.nuclei[k].center
        kind = self.NUCLEUS_KINDS[k % 3]
        if self.warp is None or kind not in DEEP_NUCLEI_MNI:
            return tuple(float(x) for x in drawn)
        x, y, z = DEEP_NUCLEI_MNI[kind]
        side = 1 if drawn[0] > 0 else -1  # the drawn nucleus's side; head-frame u > 0 is the patient's left, MNI x > 0
        return self.warp.to_head(-side * x, y, z)  # the right


def section_scale(t) -> np.ndarray | float:
    """Size of the head's cross-section at normalised height ``t`` (superellipse; flatter below)."""
    t = np.asarray(t, dtype=np.float32)
    p = np.where(t > 0, np.float32(2.4), np.float32(3.6))
    out = np.clip(1.0 - np.abs(t) ** p, 0.0, None) ** (1.0 / p)
    return out if out.ndim else float(out)


def harmonics(rng: np.random.Generator, scale: float) -> np.ndarray:
    """(3, 2) amplitudes (up to ``scale`` / k) and phases of the 2nd-4th harmonics of a wavy outline."""
    return np.stack([rng.uniform(0, scale, 3) / np.arange(1, 4), rng.uniform(0, 2 * np.pi, 3)], axis=1)


def eval_harmonics(h: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """The relative radius change of ``harmonics`` ``h`` at angles ``phi``."""
    out = np.zeros_like(phi)
    for k, (amp, ph) in enumerate(h, start=2):
        out += np.float32(amp) * np.cos(k * phi + np.float32(ph))
    return out


def sample_patient(rng: np.random.Generator, anatomy: str = "drawn") -> Patient:
    """A head: its size and shape, tissues, ventricles, sulci, and the age-related calcifications, white-matter
    hypodensities and old infarct that mimic or hide blood. ``anatomy="template"`` adds the patient's warp of the
    ICBM152 brain, drawn from a generator seeded by the head's own draws (never from ``rng``), so that both anatomies
    give the same patients, studies and bleeds for one seed: a paired comparison."""
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
        # atria
        vent.append(Ellipsoid((side * 15.0, 26.0, 0.06 * c), (rng.uniform(3, 5) * grow, 12.0, 8.0), side * 0.3))
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
        calcs.append(Calcification(Ellipsoid((0.0, 17.0, 0.0), tuple(rng.uniform(1.5, 3.5, 3))), rng.uniform(100, 400),
                                   True))
    if rng.random() < 0.12 * (0.5 + old):  # globus pallidus, both sides
        for side in (-1, 1):
            calcs.append(Calcification(Ellipsoid((side * 19.0, -3.0, 0.0), tuple(rng.uniform(1.5, 3.0, 3))),
                                       rng.uniform(80, 200), True))
    if rng.random() < 0.15 + 0.2 * old:  # falx plaques
        for _ in range(int(rng.integers(1, 3))):
            calcs.append(Calcification(Ellipsoid((0.0, rng.uniform(-0.6, 0.6) * b, rng.uniform(0.2, 0.6) * c),
                                                 (1.2, rng.uniform(3, 9), rng.uniform(2, 6))), rng.uniform(150, 600),
                                                 True))
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
    patient = Patient(
        age=age, semi_axes=(a, b, c), outline=harmonics(rng, 0.05), skin_mm=rng.uniform(1.5, 2.5),
        fat_mm=rng.uniform(1.5, 6.0), muscle_mm=rng.uniform(5, 12), skull_mm=rng.uniform(5.0, 8.5),
        skull_shape=harmonics(rng, 0.35), diploe_hu=rng.uniform(450, 800),
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
    if anatomy == "template":  # from the head's own draws, not rng's: both anatomies get the same set plan
        sub = np.random.default_rng(np.frombuffer(np.array([age, a, b, c], np.float64).tobytes(), np.uint32))
        rim = patient.csf_rim_mm - ATROPHY_MM * atrophy  # the template's own atrophy widens the rest of the rim
        patient.warp = Warp.sample(sub, brain_half_mm(a, b, c, rim), offset=(0.0, 0.0, 0.06 * c), amplitude=3.0,
                                   atrophy=atrophy)
    return patient


BASE_T = -0.15  # template anatomy: below this height (w / c) the skull base follows the template's brain


def brain_half_mm(a: float, b: float, c: float, rim_mm: float = 0.0) -> tuple[float, float, float]:
    """The template brain's half-extents (u, v, w) in a head of skin half-sizes (a, b, c): inside the scalp and skull
    (measured against the drawn cavity: about 81%, 87% and 88% of the head's), less the patient's rim of CSF
    (``rim_mm``) between the inner table and the brain's surface, as the drawn anatomy has."""
    return 0.81 * a - rim_mm, 0.87 * b - rim_mm, 0.88 * c - rim_mm


@dataclass
class MassEffect:
    """What a slice's bleeds do to the anatomy around them (``bleeds.mass_effect`` fills it)."""

    pushes: list[tuple[float, float]] = field(default_factory=list)  # (side x mm of midline shift, the bleed's w)
    effacing: list[tuple[float, float, float, float]] = field(default_factory=list)  # (phi, half_angle, zc,
    # half_height) of each large extra-axial collection: the sulci beneath it are effaced
    # lateral ventricle width factor by side
    squeeze: dict[int, float] = field(default_factory=lambda: {-1: 1.0, 1: 1.0})
    # the extra-axial collections (each with local_thickness(phi, w) in mm): they push the template brain inward
    collections: list = field(default_factory=list)


@dataclass
class PlaneContext:
    """The anatomy of one painted plane that bleeds are placed in (boolean masks and mm maps of the plane)."""

    t: np.ndarray | np.float32  # normalised height
    phi: np.ndarray  # angle around the head's axis
    depth: np.ndarray  # mm inward from the skin
    d_out: np.ndarray  # depth of the skull's outer table
    depth_in: np.ndarray  # mm inward from the inner table
    intra: np.ndarray  # the cranial cavity
    brain: np.ndarray
    in_sulcus: np.ndarray
    sylvian: np.ndarray  # the Sylvian fissures
    falx_zone: np.ndarray  # where the falx and interhemispheric fissure run
    cistern: np.ndarray  # the basal cisterns
    ventricles: list[tuple[int, np.ndarray, bool]]  # (side, mask, temporal horn) of each ventricle
    us: np.ndarray  # u minus the midline shift
    texture: np.ndarray  # grey/white texture
    grain: np.ndarray  # finer grain for bone and blood


def paint_anatomy(pl: Plane, pat: Patient, mass: MassEffect, texture: np.ndarray, grain: np.ndarray
                  ) -> PlaneContext | None:
    """Paint ``pat``'s head on one plane, pushed by ``mass``; return the plane's anatomy for the bleeds (None where
    the plane misses the cranial cavity)."""
    a, b, c = pat.semi_axes
    u, v, w = pl.u, pl.v, pl.w
    if pl.w_range[1] - pl.w_range[0] < 1e-3:  # an axial plane: one height, scalars are much cheaper
        t = np.float32(pl.w_range[0] / c)
        s = np.float32(section_scale(t))
    else:
        t = w / np.float32(c)
        s = section_scale(t)
    if not np.any(s > 0.05):
        return None
    phi = np.arctan2(v, u)
    dist = np.hypot(u, v)
    cos_phi, sin_phi = u / np.maximum(dist, 1e-6), v / np.maximum(dist, 1e-6)
    r_ell = np.float32(a * b) / np.sqrt((np.float32(b) * cos_phi) ** 2 + (np.float32(a) * sin_phi) ** 2)
    radius = r_ell * s * (1 + eval_harmonics(pat.outline, phi))
    depth = radius - dist  # mm inward from the skin
    head = (depth >= 0) & (s > 0.05)
    d_out, d_in = _scalp_and_skull(pl, pat, head, depth, t, phi, cos_phi, sin_phi, texture, grain)
    intra = head & (depth >= d_in)
    depth_in = depth - d_in  # mm inward from the inner table
    if not intra.any():
        return None
    shift = midline_shift(mass, v, w)
    us = u - shift  # midline structures follow the shift
    skull_base = _skull_base(pl, pat, intra, head, t, s, grain)
    intra &= ~skull_base
    if pat.warp is not None:
        # the real brain is anchored at the inner table: the shift is full at the head's centre and fades
        # (quadratically) to nothing at the table (each hemisphere compressed, the cortex neither cut by the bone
        # nor pulled off it)
        out = np.clip(dist / np.maximum(dist + depth_in, 1.0), 0, 1)  # 0 at the centre, 1 at the table
        us = u - shift * (1 - out * out)
        push = _collections_push(mass, phi, pl.w, depth_in)
        brain, in_sulcus, sylvian, ventricles, cistern = _template_brain(
            pl, pat, intra, us + push * cos_phi, pl.v + push * sin_phi, t, texture, grain)
        falx_zone = _midline(pl, pat, intra, us, t, s, depth_in, texture)
    else:
        brain, in_sulcus, sylvian = _brain(pl, pat, mass, intra, t, phi, sin_phi, radius, depth_in, shift, texture)
        falx_zone = _midline(pl, pat, intra, us, t, s, depth_in, texture)
        ventricles = _ventricles(pl, pat, mass, intra, us, t, shift)
        cistern = _posterior_fossa(pl, pat, intra, us, t, s, texture, depth_in)
    for ca in pat.calcifications:
        val = pl.value(ca.shape, shift if ca.midline else 0.0)
        pl.blend(np.where(intra | skull_base, np.clip(1.3 - val, 0, 1), 0).astype(np.float32), ca.hu, CALC)
    return PlaneContext(t=t, phi=phi, depth=depth, d_out=d_out, depth_in=depth_in, intra=intra, brain=brain,
                        in_sulcus=in_sulcus, sylvian=sylvian, falx_zone=falx_zone, cistern=cistern,
                        ventricles=ventricles, us=us, texture=texture, grain=grain)


PUSH_SPREAD_MM = 25.0  # a collection's push fades over this depth beneath it


def _collections_push(mass: MassEffect, phi, w, depth_in) -> np.ndarray | np.float32:
    """How far (mm) the template brain is pushed inward at each point by the extra-axial collections: by their full
    thickness at their inner surface, fading over PUSH_SPREAD_MM beneath it."""
    push = np.float32(0.0)
    for c in mass.collections:
        thick = c.local_thickness(phi, w)
        if not np.any(thick > 0):
            continue
        fade = np.clip(1.0 - (depth_in - thick) / np.float32(PUSH_SPREAD_MM), 0.0, 1.0)
        push = push + thick * fade
    return push


def _template_brain(pl: Plane, pat: Patient, intra, us, vs, t, texture, grain):
    """The patient's ICBM152 brain (ichpipe.synthetic.template) in the cranial cavity, sampled at (us, vs, w): moved
    with the midline shift, and outward where collections push it in:
    grey and white matter and CSF at their partial volumes, CSF filling the rest of the cavity; return the brain,
    sulcus, Sylvian-fissure, ventricle ((side, mask, temporal horn) per side) and cistern masks from the template's
    own CSF zones."""
    template = load_template()
    ijk = template.voxels(us, vs, pl.w, pat.warp)  # the warp evaluated once for both look-ups
    gm, wm, csf = template.fractions_at(ijk, pat.warp.atrophy)
    zones = template.zones_at(ijk)
    total = gm + wm + csf
    # below the vault the bone follows the brain: what the drawn fossae leave between them and the template's
    # intracranial space is skull base, not a CSF lake
    base = intra & (total < 0.05) & (t < np.float32(BASE_T))
    pl.paint(base, pat.diploe_hu + 250 + 150 * grain, BONE)
    intra &= ~base
    pl.paint(intra, 8.0, CSF)
    tissue = intra & (total > 0.05)
    hu = (gm * np.float32(pat.gm_hu) + wm * np.float32(pat.wm_hu) + (csf + np.clip(1 - total, 0, 1)) * 8.0
          ) / np.maximum(np.maximum(total, 1.0), 1e-6) + texture * np.clip(gm + wm, 0, 1)
    brain = tissue & (gm + wm > 0.5)
    pl.paint(tissue & ~brain, hu, CSF)
    pl.paint(brain, hu, BRAIN)
    wet = intra & ~brain
    in_sulcus = wet & (zones == SULCUS)
    sylvian = wet & (zones == SYLVIAN)
    cistern = wet & (zones == CISTERN)
    ventricles = []
    for side in (-1, 1):
        on_side = (us * side) > 0
        ventricles.append((side, wet & (zones == VENTRICLE) & on_side, False))
        ventricles.append((side, wet & (zones == TEMPORAL_HORN) & on_side, True))
    return brain, in_sulcus, sylvian, ventricles, cistern


def midline_shift(mass: MassEffect, v: np.ndarray, w: np.ndarray) -> np.ndarray | np.float32:
    """u displacement of the midline structures (falx, ventricles, deep nuclei) pushed by the bleeds."""
    total = np.float32(0.0)
    for push, zc in mass.pushes:
        total = total - np.float32(push) * np.exp(-(v / np.float32(45)) ** 2) * np.exp(
            -((w - np.float32(zc)) / np.float32(45)) ** 2)
    return total


def _scalp_and_skull(pl: Plane, pat: Patient, head, depth, t, phi, cos_phi, sin_phi, texture, grain):
    """Skin, fat, muscles (temporalis at the side, neck muscles behind, low) and the skull; return the depths of
    the skull's outer and inner tables."""
    lateral = cos_phi ** 4
    posterior = np.clip(sin_phi, 0, None)
    low = np.clip((-t - 0.35) / 0.3, 0, 1)  # 0 above the skull base, 1 at the foramen magnum
    muscle = np.float32(pat.muscle_mm) * lateral * ((t > -0.7) & (t < 0.35)) + 25 * posterior ** 2 * low
    d_fat = np.float32(pat.skin_mm + pat.fat_mm)
    pl.paint(head, 42.0, SCALP)
    pl.paint(head & (depth >= pat.skin_mm) & (depth < d_fat), -95.0, FAT)
    pl.paint(head & (depth >= d_fat) & (depth < d_fat + muscle), 52.0, SCALP)
    # Skull: thickness varies around the head and with height; the temporal squama is thin.
    d_out = d_fat + muscle
    thick = np.float32(pat.skull_mm) * (1 + eval_harmonics(pat.skull_shape, phi)) * (
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
    return d_out, d_in


def _brain(pl: Plane, pat: Patient, mass: MassEffect, intra, t, phi, sin_phi, radius, depth_in, shift, texture):
    """CSF rim, white matter, cortex and sulci (effaced under large extra-axial bleeds), deep grey nuclei, the
    age effects, Sylvian fissures; return the brain, sulcus and Sylvian masks."""
    a, b, _ = pat.semi_axes
    u, v, w = pl.u, pl.v, pl.w
    rim = np.float32(pat.csf_rim_mm) * (1 + 0.6 * np.clip(-sin_phi, 0, None))  # wider frontally
    pl.paint(intra, 8.0, CSF)
    brain = intra & (depth_in >= rim)
    pl.paint(brain, pat.wm_hu + texture, BRAIN)
    bd = depth_in - rim  # mm inward from the brain surface
    effaced = np.ones_like(u)  # sulcal width factor (1 = normal, 0 = effaced)
    for e_phi, half_angle, zc, half_height in mass.effacing:
        near = np.abs(angle_diff(phi, np.float32(e_phi))) < half_angle + 0.4
        effaced = np.where(near & (np.abs(w - np.float32(zc)) < half_height + 10), np.float32(0.25), effaced)
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
        m = (brain & (np.abs(angle_diff(phi, np.float32(inf["phi"]))) < inf["half_angle"])
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
            sylv |= brain & (t > -0.35) & (t < 0.15) & (segment_distance(u, v, x0, y0, x1, y1) < width / 2)
        pl.paint(sylv, 8.0, CSF)
    return brain, in_sulcus, sylv


def _midline(pl: Plane, pat: Patient, intra, us, t, s, depth_in, texture) -> np.ndarray:
    """Interhemispheric fissure and falx (above the tentorium; full depth above the corpus callosum), superior
    sagittal sinus; return where the falx runs."""
    b = pat.semi_axes[1]
    v = pl.v
    falx_zone = intra & (t > -0.15) & ((t > 0.3) | (np.abs(v) > 0.45 * b * s))
    ih_width = np.float32(1.0 + 2.5 * pat.atrophy)
    fissure = falx_zone & (np.abs(us) < ih_width)
    pl.paint(fissure, 8.0, CSF)
    pl.blend(np.where(falx_zone, np.clip(1.0 - np.abs(us) / 0.9, 0, 1), 0).astype(np.float32), 75.0, DURA)
    # Superior sagittal sinus: a triangle on the midline against the inner table.
    sss = intra & (t > -0.25) & (np.abs(us) < 5.0 - 0.8 * depth_in) & (depth_in < 5.5) & (np.abs(v) > 0.3 * b * s)
    pl.paint(sss, pat.sinus_hu + texture, DURA)
    return falx_zone


def _ventricles(pl: Plane, pat: Patient, mass: MassEffect, intra, us, t, shift) -> list[tuple[int, np.ndarray, bool]]:
    """Ventricles (the side pushed by a bleed is squeezed) and the septum; return (side, mask, temporal horn) of
    each."""
    vent_masks = []
    for ve in pat.ventricles:
        side = int(np.sign(ve.center[0])) if ve.center[0] else 0
        f = mass.squeeze.get(side, 1.0)
        vshape = ve if f == 1.0 else Ellipsoid(ve.center, (ve.radii[0] * f, ve.radii[1], ve.radii[2]), ve.angle)
        m = intra & pl.inside(vshape, shift)
        vent_masks.append((side, m, ve.center[2] < 0))
        pl.paint(m, 5.0, CSF)
    septum = intra & (np.abs(us) < 0.8) & (pl.v < 0) & (t > 0.0) & (t < 0.35) & np.logical_or.reduce(
        [m for _, m, _ in vent_masks[:4]] + [np.zeros_like(intra)])
    pl.paint(septum, pat.wm_hu, BRAIN)
    return vent_masks


def _sulci(pat: Patient, w, phi, bd, brain, radius, effaced) -> tuple[np.ndarray, np.ndarray]:
    """Wavy radial CSF clefts from the cortical surface (angles drift with height) and the grey ribbon around them."""
    ribbon = np.float32(2.8)
    band = brain & (bd < pat.sulci_depth.max() + ribbon)
    in_sulcus = np.zeros(brain.shape, dtype=bool)
    cortex = brain & (bd < ribbon)
    if not band.any():
        return in_sulcus, cortex
    wc = float(np.median(w[band]))
    current = angle_diff(pat.sulci_angles + pat.sulci_drift * wc, 0.0)
    order = np.argsort(current)
    angles = current[order].astype(np.float32)
    phi_b, bd_b = phi[band], bd[band]
    wavy = angle_diff(phi_b + np.float32(0.05) * np.sin(bd_b * np.float32(0.5) + phi_b * 7), np.float32(0))
    idx = np.searchsorted(angles, wavy) % len(angles)
    best_dist = np.abs(angle_diff(wavy, angles[idx]))
    best = idx
    prev = idx - 1  # the nearest sulcus is one of the two neighbours in angle
    dist = np.abs(angle_diff(wavy, angles[prev]))
    closer = dist < best_dist
    best_dist[closer], best[closer] = dist[closer], prev[closer] % len(angles)
    k = order[best]
    across = best_dist * radius[band]
    half_w = pat.sulci_width[k] / 2 * effaced[band]
    hit = (bd_b < pat.sulci_depth[k]) & (across < half_w)
    in_sulcus[band] = hit
    cortex[band] |= (bd_b < pat.sulci_depth[k] + ribbon) & (across < half_w + ribbon)
    return in_sulcus, cortex


def _skull_base(pl: Plane, pat: Patient, intra, head, t, s, grain) -> np.ndarray:
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
        pl.paint(orb & pl.inside(Ellipsoid((side * 0.44 * a, -0.8 * b - 8.5, -0.45 * c), (4.0, 1.8, 4.0))), 110.0,
                 SCALP)
        for du in (-9.0, 9.0):
            pl.paint(orb & pl.inside(Ellipsoid((side * 0.44 * a + du, -0.64 * b, -0.45 * c), (2.0, 13.0, 3.0))), 50.0,
                     SCALP)
    cliv = base & (au < 0.12 * a) & (np.abs(v + 0.06 * b) < 6) & (t < -0.36)
    pl.paint(cliv, 1100 + 100 * grain, BONE)
    return base


def _posterior_fossa(pl: Plane, pat: Patient, intra, us, t, s, texture, depth_in) -> np.ndarray:
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
