"""A real brain for the phantom: the ICBM152 2009 template (the non-linear symmetric average of 152 adults' MRI,
release a, 1 mm; Fonov et al. 2009 and 2011, Collins et al. 1999), whose grey- and white-matter probability maps
nilearn's wheel ships (``nilearn/datasets/data/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz``), read with
nibabel. It has real gyri and sulci, Sylvian fissures, ventricles, deep grey nuclei, cerebellum and brainstem.

The wheel has no CSF or brain-mask map, so the CSF is derived: the intracranial space is the brain (GM + WM > 0.5)
closed over 4 mm (sulci, fissures), grown by 2 mm (the convexity's subarachnoid space) and filled (ventricles); the
CSF fraction is what GM and WM leave of it. Measured 2026-12-07: GM 1,008 ml, WM 670 ml, CSF 297 ml; 0.5 s to read,
2.3 s to derive on 2 cores (once per process).

Per patient (:class:`Warp`) the template is scaled to the head, moved by a smooth random displacement (a few
millimetres, low spatial frequency) and atrophied (the brain within 1.2 mm x atrophy of any CSF space becomes CSF:
the real sulci, fissures and ventricles widen). :meth:`Template.sample` gives the three tissue fractions at
head-frame points (mm: ``u`` left-right with the patient's left positive, ``v`` posterior positive, ``w`` foot to
head, as DICOM's LPS axes), so a tilted slice plane is no special case.

``make synthetic synthetic.anatomy=template`` paints it (ichpipe.synthetic.anatomy; docs/synthetic.md says what is
measured). Deep intraparenchymal bleeds are aimed at its own lentiform nuclei and thalami (``DEEP_NUCLEI_MNI``).
The template's licence (the MNI's notice, to go with every copy of what is made from it) is in NOTICE.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

FILES = {"gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
CLOSE_MM, GROW_MM = 4, 2
# CSF zones (Template.zones): where each kind of bleed that lives in CSF is placed
VENTRICLE, TEMPORAL_HORN, SYLVIAN, CISTERN, SULCUS = 1, 2, 3, 4, 5
TEMPLATE_HALF_MM = (71.0, 89.5, 76.5)  # the template brain's half-extents (x, y, z), measured on its maps (tested)
TEMPLATE_CENTER_MNI = (0.0, -16.5, 5.5)  # the middle of the brain's bounding box (Template.center; tested)
# The template's own deep grey nuclei on its right (x > 0; mirrored on the left, the template is symmetric): the
# centroids of grey matter (> 0.5) deeper than 15 mm in MNI boxes around each (measured on its maps; tested)
DEEP_NUCLEI_MNI = {"lentiform": (25.9, 3.3, 0.4), "thalamus": (10.3, -21.1, 6.6)}
ATROPHY_MM = 1.2  # at atrophy 1, every CSF space grows by this much into the brain on each of its sides


def template_dir() -> Path:
    """nilearn's data folder (found without importing nilearn, which is slow to import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nilearn is not installed: it carries the ICBM152 template (pip install nilearn)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _ball(r: int) -> np.ndarray:
    return np.sum((np.indices((2 * r + 1,) * 3) - r) ** 2, axis=0) <= r * r


@dataclass(frozen=True)
class Template:
    """Tissue fractions on the template's 1 mm grid (float32, 0..1) and the grid's voxel-to-MNI affine (RAS, mm)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    depth: np.ndarray  # mm from a brain voxel (GM + WM > 0.5) to the nearest voxel that is not brain
    zones: np.ndarray  # uint8 per voxel of CSF: VENTRICLE, TEMPORAL_HORN, SYLVIAN, CISTERN, SULCUS (0 elsewhere)
    affine: np.ndarray
    center: np.ndarray  # MNI mm: the middle of the brain's bounding box

    def volumes_ml(self) -> dict[str, float]:
        return {k: float(getattr(self, k).sum()) * float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000
                for k in ("gm", "wm", "csf")}

    def voxels(self, u, v, w, warp: Warp | None = None) -> list[np.ndarray]:
        """The template's voxel coordinates (i, j, k) of head-frame points under ``warp`` (default: none)."""
        x, y, z = (warp or Warp.identity()).to_template(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                                        np.asarray(w, np.float32), self.center)
        inv = np.linalg.inv(self.affine)
        return [inv[r, 0] * x + inv[r, 1] * y + inv[r, 2] * z + inv[r, 3] for r in range(3)]

    def sample(self, u: np.ndarray, v: np.ndarray, w: np.ndarray, warp: Warp | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(GM, WM, CSF) fractions at head-frame points (trilinear; 0 outside the intracranial space)."""
        return self.fractions_at(self.voxels(u, v, w, warp), warp.atrophy if warp else 0.0)

    def fractions_at(self, ijk: list[np.ndarray], atrophy: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(GM, WM, CSF) fractions at voxel coordinates, atrophied by ``atrophy`` (0..1)."""
        gm, wm, csf = (ndi.map_coordinates(vol, ijk, order=1, mode="constant", cval=0.0, prefilter=False)
                       for vol in (self.gm, self.wm, self.csf))
        if atrophy > 0:  # the brain within ATROPHY_MM x atrophy of any CSF space becomes CSF
            depth = ndi.map_coordinates(self.depth, ijk, order=1, mode="constant", cval=0.0, prefilter=False)
            ratio = np.clip(depth - np.float32(atrophy * ATROPHY_MM), 0.0, 1.0).astype(np.float32)
            csf = csf + (gm + wm) * (1 - ratio)
            gm, wm = gm * ratio, wm * ratio
        return gm, wm, csf

    def zones_at(self, ijk: list[np.ndarray]) -> np.ndarray:
        """The CSF zone (nearest voxel) at voxel coordinates."""
        return ndi.map_coordinates(self.zones, ijk, order=0, mode="constant", cval=0)


def sample_zones(template: Template, u, v, w, warp: Warp | None = None) -> np.ndarray:
    """The CSF zone (nearest voxel) at head-frame points."""
    return template.zones_at(template.voxels(u, v, w, warp))


@dataclass(frozen=True)
class Warp:
    """One patient's template: scale (template mm per head mm, per axis), where the brain's centre sits in the head
    frame, a smooth displacement (sum of a few plane waves, ``amplitude`` mm), and atrophy (0..1)."""

    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    waves: np.ndarray  # (k, 3 direction + 1 phase + 3 displacement) in 1/mm, radians, unit vectors
    amplitude: float
    atrophy: float = 0.0

    @classmethod
    def identity(cls) -> Warp:
        return cls((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.zeros((0, 7), np.float32), 0.0)

    @classmethod
    def sample(cls, rng: np.random.Generator, brain_half_mm: tuple[float, float, float],
               offset: tuple[float, float, float] = (0.0, 0.0, 0.0), amplitude: float = 3.0, atrophy: float = 0.0,
               waves: int = 4) -> Warp:
        """A random patient whose brain has half-extents ``brain_half_mm`` (u, v, w) and sits at ``offset``."""
        half = TEMPLATE_HALF_MM  # a constant, so that drawing a patient need not load the template
        scale = tuple(h / b for h, b in zip(half, brain_half_mm, strict=True))
        k = np.zeros((waves, 7), np.float32)
        direction = rng.normal(size=(waves, 3))
        k[:, :3] = direction / np.linalg.norm(direction, axis=1, keepdims=True) / rng.uniform(60, 140, (waves, 1))
        k[:, 3] = rng.uniform(0, 2 * np.pi, waves)
        disp = rng.normal(size=(waves, 3))
        k[:, 4:] = disp / np.linalg.norm(disp, axis=1, keepdims=True)
        return cls(scale, offset, k, float(amplitude), float(atrophy))

    def to_head(self, x: float, y: float, z: float, center=TEMPLATE_CENTER_MNI) -> tuple[float, float, float]:
        """The head-frame point (mm) of an MNI point: the inverse of :meth:`to_template` without the displacement
        (a few mm, smooth), enough to aim a bleed at a structure."""
        return (-(x - center[0]) / self.scale[0] + self.offset[0], -(y - center[1]) / self.scale[1] + self.offset[1],
                (z - center[2]) / self.scale[2] + self.offset[2])

    def to_template(self, u, v, w, center: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MNI (RAS) mm of head-frame points: LPS to RAS, scaled about the brain's centre, displaced."""
        du, dv, dw = u - self.offset[0], v - self.offset[1], w - self.offset[2]
        if len(self.waves) and self.amplitude:
            n = np.sqrt(len(self.waves))
            for k in self.waves:
                s = np.float32(self.amplitude / n) * np.sin(2 * np.pi * (k[0] * du + k[1] * dv + k[2] * dw) + k[3])
                du, dv, dw = du + s * k[4], dv + s * k[5], dw + s * k[6]
        x = -du * np.float32(self.scale[0]) + np.float32(center[0])
        y = -dv * np.float32(self.scale[1]) + np.float32(center[1])
        z = dw * np.float32(self.scale[2]) + np.float32(center[2])
        return x, y, z


@lru_cache(maxsize=1)
def load_template(folder: str | None = None) -> Template:
    """The template's GM and WM maps and the CSF derived from them (cached per process)."""
    import nibabel as nib

    root = Path(folder) if folder else template_dir()
    images = {k: nib.load(root / f) for k, f in FILES.items()}
    gm, wm = (np.asarray(images[k].dataobj, np.float32) / 255.0 for k in ("gm", "wm"))
    brain = (gm + wm) > 0.5
    closed = ndi.binary_closing(brain, _ball(CLOSE_MM))
    intracranial = ndi.binary_fill_holes(ndi.binary_dilation(closed, _ball(GROW_MM)))
    csf = np.clip(intracranial.astype(np.float32) - gm - wm, 0.0, 1.0)
    depth = ndi.distance_transform_edt(brain).astype(np.float32)  # 1 mm voxels: mm
    inside = np.argwhere(brain)
    affine = np.asarray(images["gm"].affine, np.float64)
    lo, hi = (affine @ [*inside.min(0), 1])[:3], (affine @ [*inside.max(0), 1])[:3]
    return Template(gm, wm, csf, depth, _zones(brain, csf, affine), affine, (lo + hi) / 2)


def _zones(brain: np.ndarray, csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The CSF's zones. Ventricles: the CSF the brain encloses (the lateral and third ventricles are one space of
    18 ml; the temporal horns two of 0.2 ml, below z = -8 mm); the rest of the CSF by MNI region: the Sylvian
    fissures (|x| 25-55, y -35..20, z -20..15), the basal cisterns (|x| < 30, y -45..15, z -35..-5), sulci and the
    convexity elsewhere."""
    wet = csf > 0.5
    enclosed = ndi.binary_fill_holes(brain) & ~brain & wet
    labels, _ = ndi.label(enclosed)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ventricles = sizes[labels] >= 100
    x, y, z = (affine[r, 0] * np.arange(brain.shape[0])[:, None, None] + affine[r, 1] * np.arange(brain.shape[1])[
        None, :, None] + affine[r, 2] * np.arange(brain.shape[2])[None, None, :] + affine[r, 3] for r in range(3))
    zones = np.zeros(brain.shape, np.uint8)
    zones[wet] = SULCUS
    ax = np.abs(x)
    zones[wet & (ax > 25) & (ax < 55) & (y > -35) & (y < 20) & (z > -20) & (z < 15)] = SYLVIAN
    zones[wet & (ax < 30) & (y > -45) & (y < 15) & (z > -35) & (z < -5)] = CISTERN
    zones[ventricles] = VENTRICLE
    zones[ventricles & (z < -8) & (ax > 15)] = TEMPORAL_HORN
    return zones
