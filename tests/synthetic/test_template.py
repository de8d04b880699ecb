"""The ICBM152 template as the phantom's brain (issue #35's ground work): its tissue volumes, real structures where
an atlas puts them, and what a patient's warp does to it."""

from __future__ import annotations

import numpy as np
import pytest

from ichpipe.synthetic.template import Warp, load_template

T = load_template()


def head_frame(x, y, z):
    """Head-frame (LPS, about the brain's centre) coordinates of an MNI (RAS) point, for the identity warp."""
    return (np.array([-(x - T.center[0])], np.float32), np.array([-(y - T.center[1])], np.float32),
            np.array([z - T.center[2]], np.float32))


def test_the_tissue_volumes_are_an_adult_brains():
    ml = T.volumes_ml()
    assert 950 < ml["gm"] < 1050 and 620 < ml["wm"] < 720  # 1,008 and 670 ml
    assert 200 < ml["csf"] < 400  # derived: 297 ml
    total = T.gm + T.wm + T.csf
    assert total.max() <= 1.0 + 1e-5 and min(T.gm.min(), T.wm.min(), T.csf.min()) >= 0


@pytest.mark.parametrize("point, tissue, at_least", [
    ((-5, -5, 20), 2, 0.9), ((5, -5, 20), 2, 0.9),  # the lateral ventricles' bodies: CSF
    ((0, 0, -5), 2, 0.8),  # the third ventricle
    ((-15, 0, 20), 0, 0.85), ((15, 0, 20), 0, 0.85),  # the caudate heads: deep grey
    ((-28, -20, 28), 1, 0.9), ((28, -20, 28), 1, 0.9),  # the centrum semiovale: white matter
    ((0, -60, -30), 0, 0.85),  # the cerebellar vermis
])
def test_structures_sit_where_an_atlas_puts_them(point, tissue, at_least):
    assert T.sample(*head_frame(*point))[tissue][0] >= at_least


def test_outside_the_brain_there_is_nothing_and_the_template_is_symmetric():
    assert sum(a[0] for a in T.sample(*head_frame(0, 40, 60))) == 0  # above the frontal lobe: no tissue
    rng = np.random.default_rng(0)
    u, v, w = (rng.uniform(-60, 60, 2000).astype(np.float32) for _ in range(3))
    left, right = T.sample(u, v, w), T.sample(-u, v, w)
    for a, b in zip(left, right, strict=True):  # the symmetric release: mirror images to within a few percent
        assert np.abs(a - b).mean() < 0.03


def _brain_area(warp, w0=0.0):
    u, v = np.meshgrid(np.arange(-100, 100, 1.0, dtype=np.float32), np.arange(-120, 120, 1.0, dtype=np.float32))
    gm, wm, csf = T.sample(u, v, np.full_like(u, w0), warp)
    return float((gm + wm).sum()), float(csf.sum()), float((gm + wm + csf).sum())


def test_a_larger_head_has_a_larger_brain_and_atrophy_widens_the_csf_spaces():
    base = _brain_area(Warp.identity())
    larger = _brain_area(Warp((1 / 1.1, 1 / 1.1, 1 / 1.1), (0.0, 0.0, 0.0), np.zeros((0, 7), np.float32), 0.0))
    assert larger[0] / base[0] == pytest.approx(1.21, rel=0.03)  # area scales with the square
    old = _brain_area(Warp((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.zeros((0, 7), np.float32), 0.0, atrophy=0.8))
    assert old[0] < 0.93 * base[0] and old[1] > 1.4 * base[1]  # brain lost (9%), CSF gained (+55%)
    assert old[2] == pytest.approx(base[2], rel=1e-4)  # the intracranial space is the same


def test_a_patients_warp_moves_structures_by_a_few_millimetres():
    rng = np.random.default_rng(3)
    warp = Warp.sample(rng, (71.0, 89.5, 76.5), amplitude=3.0)
    assert warp.scale == pytest.approx((1.0, 1.0, 1.0))
    u, v, w = (rng.uniform(-60, 60, 5000).astype(np.float32) for _ in range(3))
    x, y, z = warp.to_template(u, v, w, T.center)
    x0, y0, z0 = Warp.identity().to_template(u, v, w, T.center)
    moved = np.sqrt((x - x0) ** 2 + (y - y0) ** 2 + (z - z0) ** 2)
    assert 1.0 < moved.mean() < 3.0 and moved.max() <= 3.0 * 2 + 1e-3  # sum of 4 waves of 3/sqrt(4) mm each
    near = np.sqrt((x[:-1] - x[1:]) ** 2 + (y[:-1] - y[1:]) ** 2 + (z[:-1] - z[1:]) ** 2)
    assert near.max() < 2.0 * 120  # a smooth warp: no fold-back between random points
    b0, b1 = _brain_area(Warp.identity()), _brain_area(warp)
    assert b1[2] == pytest.approx(b0[2], rel=0.1)  # the intracranial area on the plane w = 0 barely changes
