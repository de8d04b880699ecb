import numpy as np
import pydicom

from ichpipe.imaging.windowing import apply_window, window_stored

HU = np.array([-3024, -1000, -1, 0, 20, 40, 60, 80, 81, 1000])


def test_brain_window_explicit_values():
    # [0, 80] -> 0..255: hu * 255/80, rounded half to even, clipped
    expected = np.array([0, 0, 0, 0, 64, 128, 191, 255, 255, 255], dtype=np.uint8)
    np.testing.assert_array_equal(apply_window(HU, 40, 80), expected)


def test_subdural_window_explicit_values():
    # [-20, 180] -> 0..255: (hu + 20) * 1.275; e.g. 10 -> 38.25 -> 38, 179 -> 253.725 -> 254, 181 -> 256.3 -> 255
    hu = np.array([-1000, -19, 10, 50, 100, 179, 181, 500])
    assert apply_window(hu, 80, 200).tolist() == [0, 1, 38, 89, 153, 254, 255, 255]


def test_bone_windows_explicit_values():
    # 40/380 (2nd place): [-150, 230], (hu + 150) * 255/380; e.g. 0 -> 100.66 -> 101, 100 -> 167.76 -> 168
    hu = np.array([-200, -149, 0, 100, 229, 231])
    assert apply_window(hu, 40, 380).tolist() == [0, 1, 101, 168, 254, 255]
    # 600/2800 (1st place): [-800, 2000], (hu + 800) * 255/2800; e.g. 1000 -> 163.93 -> 164
    hu = np.array([-1000, -790, 0, 1000, 1990, 2001])
    assert apply_window(hu, 600, 2800).tolist() == [0, 1, 73, 164, 254, 255]


def test_lookup_table_path_equals_float_path_for_signed_pixels():
    ds = pydicom.Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 16, 1, -1024, 1
    stored = (HU + 1024).astype(np.int16).reshape(2, 5)
    out = window_stored(stored, ds, [[40, 80], [80, 200], [40, 380]])
    assert out.shape == (2, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0].ravel(), apply_window(HU, 40, 80))
    np.testing.assert_array_equal(out[..., 2].ravel(), apply_window(HU, 40, 380))
