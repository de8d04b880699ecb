"""HU conversion against pydicom's modality LUT on real files nobody here wrote, and the 12-bit fix."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from ichpipe.dicom import (
    DicomError,
    first_value,
    hounsfield,
    needs_12bit_fix,
    read_header,
    read_slice,
)
from ichpipe.windowing import apply_window, window_stored

# pydicom's bundled test files and, from the pydicom-data package, real CT/MR files in several
# transfer syntaxes (uncompressed, JPEG 2000 lossless and lossy, a pixel-representation mismatch).
REAL_FILES = ["CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm",
              "693_UNCI.dcm", "693_J2KR.dcm", "MR_small_RLE.dcm", "SC_rgb.dcm"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_hounsfield_equals_pydicom_modality_lut(name):
    path = get_testdata_file(name)
    assert path is not None, f"{name} missing: is pydicom-data installed?"
    ds = pydicom.dcmread(path)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        with pytest.raises(DicomError, match="not a single-frame greyscale image"):
            read_slice(path)
        return
    sl = read_slice(path)
    assert not needs_12bit_fix(ds)
    expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(sl.hounsfield(), expected)
    # the lookup-table windowing path gives exactly the float path's result on these files too
    windows = [[40, 80], [80, 200], [600, 2800]]
    fast = window_stored(sl.stored, ds, windows)
    for i, (c, w) in enumerate(windows):
        np.testing.assert_array_equal(fast[..., i], apply_window(expected, c, w))


def _ds(bits_stored, pixel_rep, intercept, modality="CT"):
    ds = pydicom.Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = bits_stored, pixel_rep, intercept, 1
    ds.Modality = modality
    return ds


def test_12bit_fix_recovers_wrapped_values():
    hu = np.array([-1000, -500, 0, 40, 1000, 1500])
    stored = hu % 4096  # how the broken files store them: [3096, 3596, 0, 40, 1000, 1500]
    ds = _ds(12, 0, 0)
    assert needs_12bit_fix(ds)
    np.testing.assert_array_equal(hounsfield(stored, ds), hu)
    # without the fix the same stored values read as bright as bone
    np.testing.assert_array_equal(apply_modality_lut(stored, ds), [3096, 3596, 0, 40, 1000, 1500])


@pytest.mark.parametrize("bits, rep, intercept, modality", [
    (12, 0, -1024, "CT"), (16, 0, 0, "CT"), (12, 1, 0, "CT"), (12, 0, 0, "MR")])
def test_12bit_fix_applies_only_to_the_broken_case(bits, rep, intercept, modality):
    ds = _ds(bits, rep, intercept, modality)
    assert not needs_12bit_fix(ds)
    np.testing.assert_array_equal(hounsfield(np.array([0, 1024, 2000]), ds), np.array([0, 1024, 2000]) + intercept)


def test_first_value_of_multivalued_windows():
    ds = pydicom.Dataset()
    ds.WindowCenter = ["40", "600"]
    assert first_value(ds.WindowCenter) == 40.0
    assert first_value("80") == 80.0 and first_value(None, 1.0) == 1.0


def test_unusable_files_raise_one_line_reasons(tmp_path):
    (tmp_path / "text.dcm").write_text("not a dicom")
    with pytest.raises(DicomError, match="not a readable DICOM file"):
        read_slice(tmp_path / "text.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PatientID
    ds.save_as(tmp_path / "nopatient.dcm")
    with pytest.raises(DicomError, match="missing required tag.*PatientID"):
        read_header(tmp_path / "nopatient.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(DicomError, match="not an image: no PixelData"):
        read_slice(tmp_path / "nopixels.dcm")


@pytest.mark.parametrize("storage", ["int16", "uint12", "quirk12"])
def test_fast_native_read_equals_pydicom_pixel_array(tiny_data, storage):
    root, table = tiny_data
    row = table[(table.storage == storage) & ~table.truncated].iloc[0]
    path = root / f"stage_2_{row.split}" / f"{row.image_id}.dcm"
    with pydicom.config.disable_value_validation():
        expected = pydicom.dcmread(path).pixel_array
    stored = read_slice(path).stored
    assert stored.dtype == expected.dtype
    np.testing.assert_array_equal(stored, expected)
