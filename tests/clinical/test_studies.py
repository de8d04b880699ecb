"""`predict`'s own pieces on the tiny set: stage 1's images in memory, the loader's tensors, series and z order."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import torch

from ichpipe.clinical.studies import find_series, render_series, why_not_axial_ct
from ichpipe.imaging.png import read_png
from ichpipe.networks.bundle_format import BundlePreprocess
from ichpipe.networks.dataset import SliceDataset, build_transform, to_input


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

    from ichpipe.networks.bundle_format import SeriesCalibration
    from ichpipe.scoring.metrics import logit

    rng = np.random.default_rng(0)
    top = rng.uniform(0.01, 0.99, 200)
    y = (rng.uniform(size=200) < top ** 2).astype(int)
    fit = LogisticRegression(C=1e4).fit(logit(top)[:, None], y)
    cal = SeriesCalibration(slope=float(fit.coef_[0, 0]), intercept=float(fit.intercept_[0]))
    np.testing.assert_allclose([cal.apply(p) for p in top], fit.predict_proba(logit(top)[:, None])[:, 1], rtol=1e-9)


# --- bad input, round three (issue 31) ------------------------------------------------------------------------------

def test_an_earlier_output_inside_the_study_is_not_read_as_input(tiny_data, tmp_path):
    from ichpipe.base.files import atomic_dir

    src, truth = tiny_data
    study = tmp_path / "study"
    study.mkdir()
    image_id = truth[truth.split == "test"].image_id.iloc[0]
    shutil.copy(src / "stage_2_test" / f"{image_id}.dcm", study)
    with atomic_dir(study / "predictions", [study]) as out:  # predict S --out S/predictions, as a rerun finds it
        shutil.copy(src / "stage_2_test" / f"{image_id}.dcm", out / "sr_0.dcm")
    (s,), skipped = find_series(study, tmp_path / "work")
    assert s.files == [study / f"{image_id}.dcm"] and not skipped


def test_a_zip_that_unpacks_far_beyond_its_size_is_bounded_and_refused(tiny_data, tmp_path, monkeypatch):
    """40 members of 60 MiB of zeros in 2.4 MB unpacked 2.37 GB (the limit was 64 MiB per member only)."""
    import zipfile

    import pytest

    from ichpipe.base.errors import InputError
    from ichpipe.clinical import studies

    src, truth = tiny_data
    one = truth[(truth.split == "test") & ~truth.truncated].image_id.iloc[0]
    block = bytes(1 << 20)

    def bomb(path: Path, members: int, mib: int) -> Path:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(src / "stage_2_test" / f"{one}.dcm", f"s/{one}.dcm")
            for k in range(members):
                with z.open(f"s/zeros{k}.dcm", "w") as member:
                    for _ in range(mib):
                        member.write(block)
        return path

    written = []
    real = studies._unpack_member
    monkeypatch.setattr(studies, "_unpack_member", lambda *a: written.append(real(*a)) or written[-1])
    # large members: each stopped at 100x its compressed size and left out with its reason; the study is read
    large = bomb(tmp_path / "large.zip", 10, 20)
    found, skipped = studies.find_series(large, tmp_path / "w1")
    assert [s.ids for s in found] == [[one]] and len(skipped) == 10
    assert all(s["reason"].startswith("unpacks to more than 100x its compressed size") for s in skipped)
    assert sum(n for n, _ in written) <= 100 * large.stat().st_size  # was: all 200 MiB written
    # many small members (each below the point where its own ratio is checked): the whole zip's budget stops it
    written.clear()
    many = bomb(tmp_path / "many.zip", 150, 1)
    with pytest.raises(InputError, match=r"many.zip: unpacks to more than 100x its own size; not a zip of studies"):
        studies.find_series(many, tmp_path / "w2")
    assert sum(n for n, _ in written) <= 100 * many.stat().st_size + (1 << 20) < 40 << 20  # was: 150 MiB
    monkeypatch.setattr(studies, "MAX_ZIP_MEMBERS", 5)
    with pytest.raises(InputError, match=r"large.zip: 11 members, more than 5; not a zip of studies"):
        studies.find_series(large, tmp_path / "w3")


def test_a_sheared_slice_is_left_out_with_its_reason(processed, tmp_path):
    root, _, meta = processed
    sid = meta[meta.split == "test"].SeriesInstanceUID.iloc[0]
    ids = meta[meta.SeriesInstanceUID == sid].sort_values("slice_index").image_id.tolist()
    folder = tmp_path / "in"
    folder.mkdir()
    for image_id in ids:
        shutil.copy(root / "stage_2_test" / f"{image_id}.dcm", folder)
    ds = pydicom.dcmread(folder / f"{ids[1]}.dcm")
    ds.PixelData = ds.PixelData + bytes(2 * ds.Columns)  # one row more than Rows x Columns
    ds.save_as(folder / f"{ids[1]}.dcm")
    (s,), _ = find_series(folder, tmp_path / "work")
    images, bad = render_series(s, BundlePreprocess(windows=[[40, 80], [80, 200], [40, 380]], size=64, mode="windows"))
    assert len(images) == len(ids) - 1 and list(bad) == [1]
    assert bad[1].startswith("PixelData holds") and "not this image's pixels" in bad[1]  # was: predicted, sheared
