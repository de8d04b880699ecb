"""The ICBM152 template as the phantom's brain (issue #35's ground work): its tissue volumes, real structures where
an atlas puts them, and what a patient's warp does to it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ichpipe.synthetic.template import DEEP_NUCLEI_MNI, TEMPLATE_CENTER_MNI, TEMPLATE_HALF_MM, Warp, load_template

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
    inside = np.argwhere(T.gm + T.wm > 0.5)  # the constant Warp.sample scales by is the template's own extent
    half = (inside.max(0) - inside.min(0)) * np.abs(np.diag(T.affine)[:3]) / 2
    np.testing.assert_allclose(half, TEMPLATE_HALF_MM)
    np.testing.assert_allclose(T.center, TEMPLATE_CENTER_MNI)
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


def test_the_template_anatomy_is_a_choice_that_leaves_the_drawn_one_as_it_was():
    """synthetic.anatomy=template adds a warp after every draw of the drawn anatomy: the same seed gives the same
    head, and the default set stays byte for byte what it was."""
    from ichpipe.base.config import ConfigError, load_config
    from ichpipe.synthetic.anatomy import sample_patient

    drawn, template = sample_patient(np.random.default_rng(5)), sample_patient(np.random.default_rng(5), "template")
    assert drawn.warp is None and template.warp is not None
    assert (drawn.age, drawn.semi_axes, drawn.gm_hu) == (template.age, template.semi_axes, template.gm_hu)
    assert template.warp.atrophy == drawn.atrophy and template.warp.amplitude == 3.0
    from ichpipe.synthetic.dataset import plan_dataset

    plans = [plan_dataset(load_config(overrides=["synthetic.n_patients=12", f"synthetic.anatomy={a}"]).synthetic)
             for a in ("drawn", "template")]
    assert [(s.patient.age, [b.subtype for b in s.bleeds], s.n_slices) for s in plans[0]] == \
        [(s.patient.age, [b.subtype for b in s.bleeds], s.n_slices) for s in plans[1]]  # paired: only the brain differs
    assert load_config(overrides=["synthetic.anatomy=template"]).synthetic.anatomy == "template"
    assert load_config().synthetic.anatomy == "drawn"
    with pytest.raises(ConfigError):
        load_config(overrides=["synthetic.anatomy=atlas"])


def _render(pat, bleeds, z, seed=1):
    from ichpipe.synthetic import geometry as G
    from ichpipe.synthetic.phantom import render_slice

    return render_slice(pat, bleeds, G.SliceGeometry(512, 0.47, (256.0, 250.0), 0.0, float(z)),
                        np.random.default_rng(seed))


def test_a_template_slice_has_its_tissues_at_their_densities():
    from ichpipe.synthetic import geometry as G
    from ichpipe.synthetic.anatomy import sample_patient

    pat = sample_patient(np.random.default_rng(3), "template")
    hu, tissue, _ = _render(pat, [], 0.3 * pat.semi_axes[2])
    kernel = np.ones((5, 5), np.uint8)  # away from edges (partial volume with the brain around narrow CSF)
    inner = {k: cv2.erode((tissue == k).astype(np.uint8), kernel).astype(bool) for k in (G.BRAIN, G.CSF)}
    brain, csf = np.median(hu[inner[G.BRAIN]]), np.median(hu[inner[G.CSF]])
    assert pat.wm_hu - 3 <= brain <= pat.gm_hu + 3 and -5 <= csf <= 20
    assert (tissue == G.BRAIN).sum() * 0.47 ** 2 > 10000  # an adult brain's section, not a sliver
    # the lateral ventricles on this level: CSF on both sides of the midline, deep in the brain
    rows, cols = np.nonzero(tissue == G.CSF)
    middle = (np.abs(cols - 256) < 40) & (np.abs(rows - 250) < 60)
    assert middle.sum() * 0.47 ** 2 > 150


def test_bleeds_go_into_the_templates_own_spaces():
    """Intraventricular blood lies in the template's ventricles, subarachnoid blood in its sulci, fissures and
    cisterns (or the convexity's space between the template and the drawn inner table): the template's tissue and
    CSF zones under the blood."""
    from ichpipe.synthetic import geometry as G
    from ichpipe.synthetic.anatomy import sample_patient
    from ichpipe.synthetic.bleeds import sample_bleed
    from ichpipe.synthetic.template import CISTERN, SULCUS, SYLVIAN, TEMPORAL_HORN, VENTRICLE, sample_zones

    for subtype, allowed in (("intraventricular", {VENTRICLE, TEMPORAL_HORN}),
                             ("subarachnoid", {SULCUS, SYLVIAN, CISTERN, 0})):
        hits = 0
        for seed in range(6):
            rng = np.random.default_rng(100 + seed)
            pat = sample_patient(rng, "template")
            bleed = sample_bleed(rng, subtype, pat, faint=False)
            for z in np.linspace(-0.3, 0.6, 7) * pat.semi_axes[2]:
                geo = G.SliceGeometry(512, 0.47, (256.0, 250.0), 0.0, float(z))
                pl = G.Plane(geo, 256, 0.0, (110.0, 130.0))
                _, _, masks = _render(pat, [bleed], z)
                blood = masks.get(subtype)
                if blood is None or blood.sum() < 20:
                    continue
                small = cv2.resize(blood.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST).astype(bool)
                r0, c0 = pl.rows[0], pl.cols[0]
                sub = small[r0:r0 + pl.u.shape[0], c0:c0 + pl.u.shape[1]]
                zones = sample_zones(load_template(), pl.u[sub], pl.v[sub], pl.w[sub], pat.warp)
                gm, wm, _ = load_template().sample(pl.u[sub], pl.v[sub], pl.w[sub], pat.warp)
                in_csf = (gm + wm < 0.5).mean()  # never painted over the template's brain
                inside = np.isin(zones, list(allowed)).mean()
                assert in_csf > 0.7 and inside > 0.45, (subtype, seed, z, in_csf, inside)
                hits += 1
        assert hits >= 3, subtype


def test_the_deep_nuclei_are_the_templates_own():
    """DEEP_NUCLEI_MNI are the template's deep grey matter where an atlas has the putamen (x 20-32, y -10..15,
    z -8..10) and thalamus (x 5-18, y -30..-8, z -2..16); a deep intraparenchymal bleed of a template patient is
    aimed at them, a drawn patient's at the drawn ellipsoids (as before)."""
    from scipy import ndimage as ndi

    from ichpipe.synthetic.anatomy import sample_patient
    from ichpipe.synthetic.bleeds import sample_bleed

    idx = np.indices(T.gm.shape)
    x, y, z = (sum(T.affine[r, c] * idx[c] for c in range(3)) + T.affine[r, 3] for r in range(3))
    brain = T.gm + T.wm > 0.5
    deep = (T.gm > 0.5) & (ndi.distance_transform_edt(ndi.binary_fill_holes(ndi.binary_closing(
        brain, np.ones((9, 9, 9))))) > 15)
    for name, box in {"lentiform": ((16, 32), (-14, 14), (-8, 10)), "thalamus": ((3, 20), (-34, -6), (-4, 16))}.items():
        m = deep & (x > box[0][0]) & (x < box[0][1]) & (y > box[1][0]) & (y < box[1][1]) & (z > box[2][0]) & (
            z < box[2][1])
        np.testing.assert_allclose([x[m].mean(), y[m].mean(), z[m].mean()], DEEP_NUCLEI_MNI[name], atol=0.06)
    for seed in range(4):
        pat, drawn = sample_patient(np.random.default_rng(seed), "template"), sample_patient(
            np.random.default_rng(seed))
        for k in (1, 2, 4, 5):
            u, v, w = pat.nucleus_centre(k)
            gm, wm, _ = T.sample(*(np.array([c], np.float32) for c in (u, v, w)), pat.warp)
            assert gm[0] > 0.45 and gm[0] > wm[0], (seed, k, gm, wm)  # grey matter (the average thalamus is 0.76 grey)
            assert drawn.nucleus_centre(k) == drawn.nuclei[k].center
            assert (u > 0) == (k > 2)  # the side is kept: k 0-2 on -u, 3-5 on +u
    hits = 0
    for seed in range(40):  # a deep bleed lands in the template's nucleus (its centre within the clot's jitter)
        rng = np.random.default_rng(seed)
        pat = sample_patient(rng, "template")
        bleed = sample_bleed(rng, "intraparenchymal", pat, faint=False)
        aims = [np.asarray(pat.nucleus_centre(k)) for k in (1, 2, 4, 5)]
        hits += min(np.linalg.norm(np.asarray(bleed.center) - a) for a in aims) < 12
    assert 10 <= hits <= 30  # about 45% are deep


class Slab:
    """A stand-in extra-axial collection: 8 mm thick within 0.6 rad of ``phi0`` around the head, 30 mm up and down."""

    def __init__(self, phi0: float):
        self.phi0 = phi0

    def local_thickness(self, phi, w):
        near = (np.abs(phi - np.float32(self.phi0)) < 0.6) & (np.abs(w) < 30)
        return np.where(near, np.float32(8.0), np.float32(0.0))


def test_an_extra_axial_collection_pushes_the_template_brain_in():
    """Under a collection of 8 mm the brain's surface starts about 8 mm deeper than without it (its own cortex bent
    in, not cut by the blood); away from it, where it was."""
    from ichpipe.synthetic import geometry as G
    from ichpipe.synthetic.anatomy import MassEffect, _collections_push, paint_anatomy, sample_patient

    depth = np.array([0.0, 4.0, 8.0, 20.5, 33.0, 50.0], np.float32)
    push = _collections_push(MassEffect(collections=[Slab(-np.pi / 2)]), np.full(6, -np.pi / 2, np.float32),
                             np.zeros(6, np.float32), depth)
    np.testing.assert_allclose(push, [8, 8, 8, 4, 0, 0], atol=1e-5)  # full under it, fading over 25 mm beneath

    pat = sample_patient(np.random.default_rng(3), "template")
    geo = G.SliceGeometry(512, 0.47, (256.0, 256.0), 0.0, 0.2 * pat.semi_axes[2])
    surfaces = []
    # without and with 8 mm over the frontal convexity (phi = -pi/2)
    for mass in (MassEffect(), MassEffect(collections=[Slab(-np.pi / 2)])):
        pl = G.Plane(geo, 256, 0.0, (110.0, 130.0))
        ctx = paint_anatomy(pl, pat, mass, np.zeros(pl.u.shape, np.float32), np.zeros(pl.u.shape, np.float32))
        under = ctx.brain & (np.abs(ctx.phi + np.pi / 2) < 0.3)
        away = ctx.brain & (np.abs(ctx.phi - np.pi / 2) < 0.3)  # posterior: no collection
        surfaces.append((np.percentile(ctx.depth_in[under], 2), np.percentile(ctx.depth_in[away], 2)))
    (under0, away0), (under1, away1) = surfaces
    assert under1 - under0 == pytest.approx(8.0, abs=2.5)
    assert away1 == pytest.approx(away0, abs=0.5)


def test_a_midline_shift_moves_the_centre_and_leaves_the_brain_on_the_bone():
    """A large bleed's midline shift (6 mm away from a collection on the left) moves the template's ventricles
    toward the other side by several mm, while at the inner table the brain stays where it was: no CSF gap opens
    between the collection and the cortex, and the far cortex is not cut by the bone."""
    from ichpipe.synthetic import geometry as G
    from ichpipe.synthetic.anatomy import MassEffect, paint_anatomy, sample_patient

    pat = sample_patient(np.random.default_rng(3), "template")
    geo = G.SliceGeometry(512, 0.47, (256.0, 256.0), 0.0, 0.2 * pat.semi_axes[2])
    found = []
    # 8 mm over the left convexity (phi = 0: +u), without and with a 6 mm shift away from it
    for mass in (MassEffect(collections=[Slab(0.0)]), MassEffect(collections=[Slab(0.0)], pushes=[(6.0, 0.0)])):
        pl = G.Plane(geo, 256, 0.0, (110.0, 130.0))
        ctx = paint_anatomy(pl, pat, mass, np.zeros(pl.u.shape, np.float32), np.zeros(pl.u.shape, np.float32))
        vent = np.zeros(pl.u.shape, bool)
        for _, m, _ in ctx.ventricles:
            vent |= m
        near = ctx.brain & (np.abs(ctx.phi) < 0.3)  # under the collection
        far = ctx.brain & (np.abs(np.abs(ctx.phi) - np.pi) < 0.3)  # the other side
        found.append((pl.u[vent].mean(), np.percentile(ctx.depth_in[near], 2), np.percentile(ctx.depth_in[far], 2)))
    (vent0, near0, far0), (vent1, near1, far1) = found
    assert 3.0 < vent0 - vent1 < 6.5  # the ventricles move away from the bleed, most of the shift near the centre
    assert near1 == pytest.approx(near0, abs=1.0)  # the cortex still under the blood (a uniform shift: 6 mm gap)
    assert far1 == pytest.approx(far0, abs=1.0)  # the far cortex still off the bone (a uniform shift cut 6 mm)
