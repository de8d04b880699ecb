"""The phantom's geometry: where the head sits in a slice (``SliceGeometry``), the head-frame coordinates of one
render plane with the HU and tissue maps painted on it (``Plane``, and the tissue codes of those maps), and the
shapes and distances every structure is built from.

Geometry lives in millimetres in a head frame: ``u`` runs left-right, ``v`` anterior-posterior (posterior
positive, as DICOM's LPS axes, so a supine patient's dependent side is +v) and ``w`` foot-to-head. Every
structure is a function of (u, v, w) arrays, so a tilted slice plane (gantry tilt) is no special case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tissue codes of the label map painted with the HU (and returned with every rendered slice: centre plane, before blur).
AIR, SCALP, BONE, CSF, BRAIN, BLOOD, PADDING, OEDEMA, FAT, DURA, CALC = range(11)
TISSUE_NAMES = ("air", "scalp", "bone", "csf", "brain", "blood", "padding", "oedema", "fat", "dura", "calcification")


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


def angle_diff(a: np.ndarray, b) -> np.ndarray:
    """a - b wrapped to [-pi, pi), in the dtype of ``a``."""
    pi = np.asarray(np.pi, dtype=np.asarray(a).dtype)
    return (a - b + pi) % (2 * pi) - pi


def segment_distance(u, v, x0, y0, x1, y1) -> np.ndarray:
    """Distance from (u, v) to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    k = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(u - (x0 + k * dx), v - (y0 + k * dy))


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


class Plane:
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
        win = self.window(ell.center[0], ell.center[1],
                          max(ell.radii[:2]) * 1.8 + margin + (15 if np.ndim(shift) else 0))
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
