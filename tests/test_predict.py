"""`predict`'s own pieces on the tiny set: stage 1's images in memory, the loader's tensors, series and z order."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import torch

from ichpipe.bundle_format import BundlePreprocess
from ichpipe.data import SliceDataset, build_transform, to_input
from ichpipe.io import read_png
from ichpipe.studies import find_series, render_series, why_not_axial_ct


def test_in_memory_images_equal_stage_1_and_the_loader(processed, tmp_path):
    root, _, meta = processed
    series, skipped = find_series(root / "stage_2_test", tmp_path / "work")
    assert series and not skipped
    s = series[0]
    rows = meta.set_index("image_id").loc[s.ids]
    assert (np.diff(rows.slice_index.to_numpy()) == 1).all()  # z order = stage 1's slice order
    images, bad = render_series(s, BundlePreprocess(windows=[[40, 80], [80, 200], [40, 380]], size=512, mode="windows"))
    assert not bad
    for img, image_id in zip(images, s.ids, strict=True):
        assert np.array_equal(img, read_png(root / "processed" / "512" / f"{image_id}.png"))  # no PNG needed
    tf = build_transform([], 64, train=False)
    ds = SliceDataset(meta.set_index("image_id").loc[s.ids].reset_index(), root / "processed" / "512", tf)
    for i, img in enumerate(images[:3]):
        assert torch.equal(to_input(img, tf, 0, None), ds[i][0])


def test_series_are_found_in_z_order_and_tilt_is_axial(processed, tmp_path):
    root, _, meta = processed
    test = meta[meta.split == "test"]
    sid = test.SeriesInstanceUID.iloc[0]
    folder = tmp_path / "in"
    folder.mkdir()
    ids = test[test.SeriesInstanceUID == sid].sort_values("slice_index").image_id.tolist()
    for k, image_id in enumerate(reversed(ids)):  # file names in reverse z order
        shutil.copy(root / "stage_2_test" / f"{image_id}.dcm", folder / f"{k:03d}.dcm")
    (s,), _ = find_series(folder, tmp_path / "work")
    assert s.ids == ids and s.z == sorted(s.z)
    ds = pydicom.dcmread(folder / "000.dcm")
    c, t = np.cos(np.radians(20)), np.sin(np.radians(20))
    ds.ImageOrientationPatient = [1, 0, 0, 0, c, t]  # 20 degrees of gantry tilt: still axial
    assert why_not_axial_ct(ds) is None
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    assert why_not_axial_ct(ds).startswith("not axial")


def test_the_series_calibration_applies_what_the_bundle_fitted():
    """predict's series probability is the bundle's Platt fit (one place: SeriesCalibration.apply)."""
    from sklearn.linear_model import LogisticRegression

    from ichpipe.bundle_format import SeriesCalibration
    from ichpipe.metrics import logit

    rng = np.random.default_rng(0)
    top = rng.uniform(0.01, 0.99, 200)
    y = (rng.uniform(size=200) < top ** 2).astype(int)
    fit = LogisticRegression(C=1e4).fit(logit(top)[:, None], y)
    cal = SeriesCalibration(slope=float(fit.coef_[0, 0]), intercept=float(fit.intercept_[0]))
    np.testing.assert_allclose([cal.apply(p) for p in top], fit.predict_proba(logit(top)[:, None])[:, 1], rtol=1e-9)
