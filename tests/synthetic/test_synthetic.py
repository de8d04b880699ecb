"""The synthetic RSNA-format dataset: layout, DICOM validity, HU per tissue, labels, quirks, determinism."""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from ichpipe.base.config import load_config
from ichpipe.base.labels import LABELS, SUBTYPES
from ichpipe.base.paths import DataPaths
from ichpipe.imaging.dicom import read_header, slice_position
from ichpipe.synthetic import geometry as G
from ichpipe.synthetic import phantom as P
from ichpipe.synthetic import realism
from ichpipe.synthetic.anatomy import sample_patient
from ichpipe.synthetic.bleeds import sample_bleed
from ichpipe.synthetic.dataset import (
    encode_pixels,
    generate_dataset,
    make_dicom,
    plan_dataset,
    save_dicom,
    synthetic_id,
)

REQUIRED_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
                 "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                 "WindowWidth", "BitsStored", "PixelRepresentation", "Rows", "Columns", "Modality"]


def test_layout_matches_the_competition(tiny_data, tiny_cfg):
    root, table = tiny_data
    paths = DataPaths(root)
    train_files = sorted(p.stem for p in paths.train_dir.glob("*.dcm"))
    test_files = sorted(p.stem for p in paths.test_dir.glob("*.dcm"))
    assert train_files == sorted(table.loc[table.split == "train", "image_id"])
    assert test_files == sorted(table.loc[table.split == "test", "image_id"])
    assert all(len(s) == 12 and s.startswith("ID_") for s in train_files + test_files)  # ID_ + 9 hex
    labels = pd.read_csv(paths.train_csv)
    assert list(labels.columns) == ["ID", "Label"]
    assert set(labels.Label.unique()) <= {0, 1}
    n_dup = tiny_cfg.synthetic.n_duplicate_images
    assert len(labels) == 6 * (len(train_files) + n_dup)
    assert labels.duplicated().sum() == 6 * n_dup  # exact duplicate rows, as in the real file
    assert set(labels.ID.str.rpartition("_")[0]) == set(train_files)
    assert set(labels.ID.str.rpartition("_")[2]) == set(LABELS)
    sample = pd.read_csv(paths.sample_submission_csv)
    assert len(sample) == 6 * len(test_files) and (sample.Label == 0.5).all()
    key = pd.read_csv(paths.test_labels_csv)
    assert key.ID.tolist() == sample.ID.tolist()
    # test patients are not train patients
    assert not set(table.loc[table.split == "test", "PatientID"]) & set(table.loc[table.split == "train", "PatientID"])


def test_dicom_tags_and_grouping(tiny_data):
    root, table = tiny_data
    row = table[~table.truncated].iloc[0]
    ds = pydicom.dcmread(DataPaths(root).train_dir.parent / f"stage_2_{row.split}" / f"{row.image_id}.dcm")
    for tag in REQUIRED_TAGS:
        assert tag in ds, tag
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert ds.SOPInstanceUID == row.image_id
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (row.PatientID, row.StudyInstanceUID,
                                                                         row.SeriesInstanceUID)
    assert slice_position(ds) == pytest.approx(row.z, abs=1e-3)
    assert ds.pixel_array.shape == (row["size"], row["size"])
    # 1-2 studies per patient, one series per study, 12-16 slices per series (tiny config)
    per_patient = table.groupby("PatientID").StudyInstanceUID.nunique()
    assert per_patient.between(1, 2).all() and (per_patient == 2).any()
    assert (table.groupby("StudyInstanceUID").SeriesInstanceUID.nunique() == 1).all()
    assert table.groupby("SeriesInstanceUID").size().between(12, 16).all()


def test_file_names_do_not_give_slice_order(tiny_data):
    _, table = tiny_data
    series = table.groupby("SeriesInstanceUID")
    in_order = [g.sort_values("z").image_id.is_monotonic_increasing for _, g in series]
    assert not any(in_order)


def test_labels_are_contiguous_along_z_and_any_is_the_union(tiny_data):
    _, table = tiny_data
    assert (table["any"] == table[list(SUBTYPES)].max(axis=1)).all()
    assert table["any"].sum() > 0
    for _, series in table.groupby("SeriesInstanceUID"):
        series = series.sort_values("z")
        for name in SUBTYPES:
            positive = np.flatnonzero(series[name].to_numpy())
            if len(positive):  # one bleed per subtype and series: one unbroken run of slices
                assert positive[-1] - positive[0] + 1 == len(positive), (series.SeriesInstanceUID.iloc[0], name)


@pytest.fixture(scope="module")
def rendered():
    """Slices of one patient with a bleed of every subtype, at several heights."""
    rng = np.random.default_rng(11)
    patient = sample_patient(rng)
    bleeds = [sample_bleed(rng, s, patient, faint=False) for s in SUBTYPES]
    c = patient.semi_axes[2]
    out = []
    for z in np.linspace(-0.6 * c, 0.8 * c, 15):
        geo = G.SliceGeometry(512, 0.47, (256.0, 250.0), 0.1, float(z))
        out.append(P.render_slice(patient, bleeds, geo, rng, noise_hu=4.0, fov_padding=True))
    return out


@pytest.mark.parametrize("tissue, low, high", [
    (G.AIR, -1100, -900), (G.SCALP, 10, 70), (G.FAT, -110, -60), (G.BONE, 500, 1800), (G.CSF, -5, 20),
    (G.BRAIN, 15, 45), (G.BLOOD, 50, 92), (G.PADDING, -2000, -2000),
])
def test_hounsfield_ranges_per_tissue(rendered, tissue, low, high):
    """Away from its edges (blur, partial volume), each tissue has its density on real CT."""
    kernel = np.ones((5, 5), np.uint8)
    values = np.concatenate([hu[cv2.erode((t == tissue).astype(np.uint8), kernel).astype(bool)] for hu, t,
                             _ in rendered])
    assert len(values) > 300
    lo, med, hi = np.percentile(values, [25, 50, 75])
    assert low <= med <= high
    # noise, texture, and partial volume with what the planes above and below the centre cut
    assert lo >= low - 15 and hi <= high + 15


def test_edges_are_blurred_and_noise_is_correlated(rendered):
    """The scanner's physics: no one-pixel steps at the inner table, noise with a texture."""
    hu = rendered[8][0]
    assert 1.0 <= realism.edge_width_mm(hu, 0.47) <= 2.5
    assert 0.4 <= realism.noise_correlation(hu) <= 0.8


def test_every_subtype_appears_where_it_belongs(rendered):
    seen = {name for _, _, masks in rendered for name in masks}
    assert seen == set(SUBTYPES)
    for _, tissue, masks in rendered:
        for mask in masks.values():
            assert (tissue[mask] == G.BLOOD).all()
            assert (tissue[mask] != G.BONE).all()


@pytest.mark.parametrize("storage", ["int16", "uint12", "quirk12"])
def test_dicom_pixels_give_back_the_hounsfield_units(rendered, tmp_path, storage):
    hu = rendered[7][0]
    spec = plan_dataset(load_config(overrides=["synthetic.n_patients=1"]).synthetic)[0]
    spec.storage = storage
    ds = make_dicom(encode_pixels(hu, storage), spec, {k: f"ID_{k}" for k in ("image", "patient", "study", "series")},
                    0.0)
    save_dicom(ds, tmp_path / "x.dcm")
    back = pydicom.dcmread(tmp_path / "x.dcm")
    lowest = {"int16": -32768, "uint12": -1024, "quirk12": -1000}[storage]  # what each storage can hold
    expected = np.clip(np.rint(hu), lowest, None)
    if storage == "quirk12":
        assert back.PixelRepresentation == 0 and back.BitsStored == 12 and float(back.RescaleIntercept) > -100
        naive = apply_modality_lut(back.pixel_array, back)
        assert naive.max() > 3000  # read naively, air comes out as bright as bone
        px = back.pixel_array.astype(np.int32) + 1000  # the known fix
        px[px >= 4096] -= 4096
        np.testing.assert_array_equal(px - 1000, expected)
    else:
        np.testing.assert_array_equal(apply_modality_lut(back.pixel_array, back), expected)


def test_quirks_occur_at_their_configured_rates():
    cfg = load_config(overrides=["synthetic.n_patients=3000", "synthetic.n_truncated=3"]).synthetic
    specs = plan_dataset(cfg)
    n = len(specs)
    for observed, rate in [
        (sum(s.storage == "quirk12" for s in specs), cfg.rate_12bit_quirk),
        (sum(s.multivalue_window for s in specs), cfg.rate_multivalue_window),
        (sum(s.size != 512 for s in specs), cfg.rate_non512),
        (sum(s.split == "test" for s in specs if s.study_index == 0), cfg.test_fraction * cfg.n_patients / n),
    ]:
        assert abs(observed / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9
    assert sum(len(s.truncate_slices) for s in specs) == 3
    assert all(s.split == "train" for s in specs if s.truncate_slices)


def test_every_quirk_is_in_the_files(tiny_data):
    root, table = tiny_data
    paths = DataPaths(root)
    seen = {"quirk12": 0, "multivalue": 0, "non512": 0, "padding": 0}
    for row in table[~table.truncated].groupby("SeriesInstanceUID").head(1).itertuples():
        ds = pydicom.dcmread((paths.train_dir if row.split == "train" else paths.test_dir) / f"{row.image_id}.dcm")
        if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100:
            seen["quirk12"] += 1
        if isinstance(ds.WindowCenter, pydicom.multival.MultiValue):
            seen["multivalue"] += 1
        seen["non512"] += ds.Rows != 512
        seen["padding"] += int(apply_modality_lut(ds.pixel_array, ds).min() <= -2000)
    assert all(seen.values()), seen
    bad = table[table.truncated]
    assert len(bad) == 1 and bad.split.item() == "train"
    ds = pydicom.dcmread(paths.train_dir / f"{bad.image_id.item()}.dcm")
    with pytest.raises(ValueError):
        ds.pixel_array  # noqa: B018 - pixel data is shorter than Rows x Columns x 2 bytes


def _digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    cfg = load_config(overrides=["synthetic.n_patients=3", "synthetic.slices_min=4", "synthetic.slices_max=6",
                                 "synthetic.size=128"]).synthetic
    generate_dataset(cfg, tmp_path / "a", workers=1, progress=False)
    generate_dataset(cfg, tmp_path / "b", workers=2, progress=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) > 10 and a == b
    cfg.seed += 1
    generate_dataset(cfg, tmp_path / "c", workers=2, progress=False)
    assert _digest(tmp_path / "c") != a


def test_ids_are_unique_and_kaggle_shaped():
    ids = {synthetic_id("image", k, seed=3) for k in range(200_000)}
    assert len(ids) == 200_000
    assert all(len(i) == 12 for i in list(ids)[:100])
    assert synthetic_id("study", 5, 3) != synthetic_id("series", 5, 3)


@pytest.fixture(scope="module")
def real_slices():
    """Two real head CT slices from pydicom's test data: a mid-level slice and a (tilted) skull-base one."""
    from pydicom.data import get_testdata_file

    out = {}
    for name in ("693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        out[name] = realism.slice_measures(apply_modality_lut(ds.pixel_array, ds).astype(np.float32),
                                           float(ds.PixelSpacing[0]))
    return out


@pytest.fixture(scope="module")
def synthetic_mid_slices():
    """The realism measures of mid-series slices of 16 default-config patients (the level make synthetic measures)."""
    cfg = load_config(overrides=["synthetic.n_patients=16"]).synthetic
    rows = []
    for spec in plan_dataset(cfg)[:16]:
        i = spec.n_slices // 2 + spec.n_slices // 8
        geo = G.SliceGeometry(spec.size, spec.pixel_mm, spec.center_px, spec.angle, spec.z_start + i * spec.spacing,
                              tilt=spec.tilt, thickness=spec.thickness)
        hu, _, masks = P.render_slice(spec.patient, spec.bleeds, geo, np.random.default_rng(spec.seed), spec.noise_hu)
        blood = np.logical_or.reduce(list(masks.values())) if masks else None
        rows.append(realism.slice_measures(hu, spec.pixel_mm, blood))
    return pd.DataFrame(rows).median()


def test_mid_series_slices_measure_like_real_ct(real_slices, synthetic_mid_slices):
    """Issue 12's histogram, density and physics targets, each against the real slices' own value."""
    mid, base = real_slices["693_UNCR.dcm"], real_slices["J2K_pixelrep_mismatch.dcm"]
    syn = synthetic_mid_slices
    for name, slack in [("brain_20_50", 0.05), ("bone_300", 0.06), ("noise_correlation", 0.15), ("edge_width_mm", 0.6)]:
        low, high = min(mid[name], base[name]) - slack, max(mid[name], base[name]) + slack
        assert low <= syn[name] <= high, (name, syn[name], mid[name], base[name])
    # bright non-blood pixels inside the skull (falx, calcifications, partial-volume bone): the same order
    # as the real mid-level slice (the skull-base slice is all petrous bone), never the old phantom's 0
    assert mid["hyperdense_non_blood"] / 3 <= syn["hyperdense_non_blood"] <= mid["hyperdense_non_blood"] * 2
    for name, (low, high) in realism.TARGETS.items():
        if name in syn:
            assert low <= syn[name] <= high, (name, syn[name])


def test_the_55_90_hu_rule_is_no_bleed_detector(tiny_data):
    """A slice's share of 55-90 HU head pixels (the old set's AUC 0.96 shortcut) does not find the bleeds."""
    _, table = tiny_data
    summary = realism.set_summary(table)
    assert summary["shortcut_auc_any"] <= realism.TARGETS["shortcut_auc_any"][1]
    hu = np.full((64, 64), -1000.0, dtype=np.float32)
    hu[16:48, 16:48] = 30.0
    hu[20:24, 20:30] = 70.0  # 40 of the head's 1024 pixels
    assert realism.shortcut_score(hu) == pytest.approx(40 / 1024)


def _dense_blob_radius_mm(hu: np.ndarray, tissue: np.ndarray, pixel_mm: float) -> float:
    """Radius of the thickest intracranial soft-tissue region at 50-90 HU (1 mm smoothing): clot-like bulk."""
    smooth = cv2.GaussianBlur(hu, (0, 0), 1.0 / pixel_mm)
    soft = np.isin(tissue, [G.CSF, G.BRAIN, G.DURA, G.OEDEMA, G.BLOOD])
    dense = ((smooth > 50) & (smooth < 90) & soft).astype(np.uint8)
    return float(cv2.distanceTransform(dense, cv2.DIST_L2, 5).max()) * pixel_mm


def test_no_normal_structure_is_a_dense_blob():
    """Dural sinuses, falx and tentorium are dense but thin; only blood is a thick dense region. (The old
    transverse sinuses filled the back of the posterior fossa, ~10 mm thick: BLAST-CT, trained on real CT,
    called them intraparenchymal blood on 12 of 136 control slices.)"""
    pixel_mm = 0.9
    for seed in range(4):
        patient = sample_patient(np.random.default_rng(seed))
        for t in np.linspace(-0.7, 0.85, 16):
            geo = G.SliceGeometry(256, pixel_mm, (128.0, 128.0), 0.0, float(t) * patient.semi_axes[2])
            hu, tissue, _ = P.render_slice(patient, [], geo, np.random.default_rng(1), noise_hu=5.0)
            assert _dense_blob_radius_mm(hu, tissue, pixel_mm) < 4.0, (seed, t)
    rng = np.random.default_rng(5)  # the measure does see a clot
    patient = sample_patient(rng)
    clot = sample_bleed(rng, "intraparenchymal", patient, faint=False)
    clot.radii = (10.0, 10.0, 10.0)  # a 4 ml haematoma
    geo = G.SliceGeometry(256, pixel_mm, (128.0, 128.0), 0.0, clot.center[2])
    hu, tissue, masks = P.render_slice(patient, [clot], geo, np.random.default_rng(1), noise_hu=5.0)
    assert masks["intraparenchymal"].any() and _dense_blob_radius_mm(hu, tissue, pixel_mm) > 4.0


def test_tilted_series_come_out_in_z_order(tiny_data):
    root, table = tiny_data
    paths = DataPaths(root)
    tilted = table[(table.tilt_deg > 0) & ~table.truncated]
    assert tilted.SeriesInstanceUID.nunique() >= 1
    for _, series in tilted.groupby("SeriesInstanceUID"):
        series = series.sort_values("slice_index")
        folder = paths.train_dir if series.split.iloc[0] == "train" else paths.test_dir
        z = [read_header(folder / f"{i}.dcm")["z"] for i in series.image_id]
        assert np.all(np.diff(z) > 0)  # the position along the tilted normal follows the slice order
        ds = pydicom.dcmread(folder / f"{series.image_id.iloc[0]}.dcm", stop_before_pixels=True)
        assert float(ds.ImageOrientationPatient[4]) < 0.99 and float(ds.GantryDetectorTilt) > 5
        np.testing.assert_allclose(np.diff(z), np.diff(series.z), atol=2e-3)


def test_a_large_bleed_pushes_the_midline():
    """Mass effect: a large subdural on the +u side moves the ventricles and falx towards -u."""
    rng = np.random.default_rng(3)
    patient = sample_patient(rng)
    bleed = sample_bleed(rng, "subdural", patient, faint=False)
    bleed = dataclasses.replace(bleed, phi=0.0, zc=0.25 * patient.semi_axes[2], half_height=40.0, thickness=14.0,
                                half_angle=1.1)
    bleed.volume_ml, bleed.side = 60.0, 1
    geo = G.SliceGeometry(512, 0.47, (256.0, 256.0), 0.0, 0.24 * patient.semi_axes[2])

    def ventricle_centre(bleeds):
        _, tissue, _ = P.render_slice(patient, bleeds, geo, np.random.default_rng(0), noise_hu=4.0)
        rows, cols = np.nonzero(tissue[150:360, 176:336] == G.CSF)
        return cols.mean() + 176

    moved_mm = (ventricle_centre([bleed]) - ventricle_centre([])) * 0.47
    assert moved_mm < -3.0


def test_a_new_bleed_pattern_is_one_class():
    """A pattern owns its sampling, painting and mass effect: a class of its own renders through the unchanged
    renderer, its blood is labelled under its subtype, and a large one shifts the midline."""
    from ichpipe.synthetic.anatomy import MassEffect, Patient, PlaneContext
    from ichpipe.synthetic.bleeds import Bleed

    @dataclasses.dataclass(kw_only=True)
    class Sphere(Bleed):
        subtype = "intraparenchymal"
        center: tuple[float, float, float]
        radius: float

        @classmethod
        def sample(cls, rng, patient: Patient, **common):
            return cls(center=(20.0, 0.0, 0.2 * patient.semi_axes[2]), radius=15.0, **common)

        def lateral_u(self):
            return self.center[0]

        @property
        def z_centre(self):
            return self.center[2]

        def paint(self, pl, pat, ctx: PlaneContext):
            d = np.sqrt((pl.u - self.center[0]) ** 2 + (pl.v - self.center[1]) ** 2 + (pl.w - self.center[2]) ** 2)
            mask = ctx.brain & (d < self.radius)
            pl.paint(mask, self.blood(ctx), G.BLOOD)
            return mask

    rng = np.random.default_rng(0)
    patient = sample_patient(rng)
    sphere = Sphere.sample(rng, patient, hu=70.0)
    sphere.volume_ml, sphere.side = 4 / 3 * np.pi * 15 ** 3 / 1000, 1
    mass = MassEffect()
    sphere.add_mass_effect(mass)
    assert mass.pushes == [(pytest.approx(0.22 * (sphere.volume_ml - 8)), sphere.center[2])]
    assert mass.squeeze[1] == pytest.approx(1 - sphere.volume_ml / 80) and mass.squeeze[-1] == 1.0
    geo = G.SliceGeometry(256, 0.9, (128.0, 128.0), 0.0, sphere.center[2])
    hu, tissue, masks = P.render_slice(patient, [sphere], geo, np.random.default_rng(1), noise_hu=0.0)
    area_mm2 = masks["intraparenchymal"].sum() * 0.9 ** 2
    assert 0.8 * np.pi * 15 ** 2 < area_mm2 < 1.05 * np.pi * 15 ** 2  # the sphere's equator, inside the brain
    assert np.median(hu[masks["intraparenchymal"]]) == pytest.approx(70.0, abs=3.0)


def test_the_answer_key_has_the_bleed_masks(tiny_data, tiny_cfg):
    """A mask per slice with blood, none without; its subtypes are the slice's labels, each at least the labelling
    area; the DICOM and its mask share the pixel grid; a set without them is incomplete."""
    from ichpipe.imaging.png import read_mask
    from ichpipe.synthetic.dataset import missing_files

    root, table = tiny_data
    paths = DataPaths(root)
    written = {p.stem for p in paths.masks_dir.glob("*.png")}
    assert written == set(table.image_id[table["any"] == 1]) and len(written) > 10
    for _, row in table[table["any"] == 1].iterrows():
        masks = read_mask(paths.masks_dir / f"{row.image_id}.png")
        pixel_mm = float(pydicom.dcmread(root / f"stage_2_{row.split}" / f"{row.image_id}.dcm",
                                         stop_before_pixels=True).PixelSpacing[0])
        for sub in SUBTYPES:
            assert masks[sub].shape == (row["size"], row["size"])
            assert masks[sub].any() == bool(row[sub]), (row.image_id, sub)
            if row[sub]:
                assert masks[sub].sum() * pixel_mm ** 2 >= tiny_cfg.synthetic.min_label_area_mm2
    some = paths.masks_dir / f"{sorted(written)[0]}.png"
    data = some.read_bytes()
    some.unlink()
    assert missing_files(root) == [str(some)]
    some.write_bytes(data)
    assert missing_files(root) == []
