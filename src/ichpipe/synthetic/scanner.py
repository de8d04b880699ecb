"""The scanner's physics on a painted head: the point-spread function, correlated (filtered) noise that is
stronger low in the head, motion ghosting, the reconstruction circle's padding, and the beam-hardening band
between the petrous bones."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from ichpipe.synthetic.anatomy import Patient
from ichpipe.synthetic.geometry import PADDING, Plane, SliceGeometry, segment_distance

PADDING_HU = -2000.0  # value outside the scanner's reconstruction circle
PSF_SIGMA_MM = 0.6  # scanner point-spread function (Gaussian sigma)
NOISE_SIGMA_PX = 0.8  # filter of the noise texture: neighbour correlation ~0.6 as in real reconstructions


def beam_hardening(pl: Plane, pat: Patient, intra: np.ndarray, t) -> None:
    """The dark band between the petrous bones (and a fainter one across the posterior fossa)."""
    a, b, c = pat.semi_axes
    zone = intra & (t < -0.38) & (t > -0.62)
    if not zone.any():
        return
    u, v = pl.u, pl.v
    x0, y0, x1, y1 = -0.55 * a, 0.12 * b, 0.55 * a, 0.12 * b
    d = segment_distance(u, v, x0, y0, x1, y1)
    pl.hu[zone] -= (np.float32(pat.beam_hardening_hu) * np.exp(-(d / 6.0) ** 2))[zone]


def acquire(hu: np.ndarray, tissue: np.ndarray, patient: Patient, geo: SliceGeometry, rng: np.random.Generator,
            noise_hu: float, fov_padding: bool) -> tuple[np.ndarray, np.ndarray]:
    """The slice as the scanner reconstructs it from the painted head at the output size: blurred by the
    point-spread function, with noise, motion and, if ``fov_padding``, the padding outside the reconstruction circle
    (in ``tissue`` too)."""
    hu = cv2.GaussianBlur(hu, (0, 0), PSF_SIGMA_MM / geo.pixel_mm)
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
    return hu, tissue


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
