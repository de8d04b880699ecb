"""HU conversion against pydicom's modality LUT on real files nobody here wrote, and the 12-bit fix."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from ichpipe.imaging.dicom import DicomError, first_value, hounsfield, needs_12bit_fix, read_header, read_slice
from ichpipe.imaging.windowing import apply_window, render_file, window_stored

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


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    """Seeded damage to one file's bytes: cut short, bytes overwritten in the header or anywhere."""
    for _ in range(n):
        kind = rng.integers(4)
        if kind == 0:  # cut short anywhere, header included (e.g. at byte 154)
            yield data[: int(rng.integers(0, len(data)))]
        elif kind == 1:  # a few bytes overwritten in the first kilobyte: tags, VRs, lengths
            b = bytearray(data)
            for i in rng.integers(0, min(1024, len(b)), size=int(rng.integers(1, 6))):
                b[i] = int(rng.integers(256))
            yield bytes(b)
        elif kind == 2:  # anywhere
            b = bytearray(data)
            for i in rng.integers(0, len(b), size=int(rng.integers(1, 20))):
                b[i] = int(rng.integers(256))
            yield bytes(b)
        else:  # a length field made huge or zero: 4 bytes in the header set to ff or 00
            b = bytearray(data)
            i = int(rng.integers(128, min(1024, len(b) - 4)))
            b[i:i + 4] = b"\xff\xff\xff\xff" if rng.random() < 0.5 else b"\x00\x00\x00\x00"
            yield bytes(b)


def _non_numeric(path, out, key):
    """``path`` with the DS value of ``key`` replaced by text in the file's bytes (pydicom will not write it)."""
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
        ds[key].value = "31415.9"
        ds.save_as(out)
    out.write_bytes(out.read_bytes().replace(b"31415.9", b"abc.xyz"))


def test_fuzzed_files_fail_as_dicom_errors_only(tiny_data, tmp_path):
    """Every damaged file either reads or raises DicomError (the bad-files report), nothing else.

    Before: ValueError, TypeError, struct.error, BytesLengthException and NotImplementedError escaped
    read_slice/read_header and stopped stage 1 on every rerun.
    """
    root, table = tiny_data
    sources = [get_testdata_file(n) for n in ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm")]
    sources += [root / "stage_2_train" / f"{i}.dcm" for i in table[table.split == "train"].image_id.head(3)]
    rng = np.random.default_rng(2026)
    cases = []
    for src in sources:
        data = Path(src).read_bytes()
        for k, damaged in enumerate(_mutations(data, rng, 40)):
            path = tmp_path / f"{Path(src).stem}_{k}.dcm"
            path.write_bytes(damaged)
            cases.append(path)
        for key in ("WindowCenter", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient"):
            path = tmp_path / f"{Path(src).stem}_{key}.dcm"
            try:
                _non_numeric(src, path, key)
            except KeyError:  # the file has no such tag
                continue
            cases.append(path)
    failed = 0
    for path in cases:
        for read in (read_header, read_slice, lambda p: render_file(p, [[40, 80], [80, 200], [40, 380]], 32)):
            try:
                read(path)
            except DicomError as exc:
                failed += 1
                assert "\n" not in str(exc) and str(exc), path
    assert len(cases) >= 250 and failed > 100  # most damage is caught; none of it as another exception type


# --- every size bounded from the header before it is allocated (issue 31) -----------------------------------------

def _ct_small(**changes) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128, 16-bit signed, explicit VR little endian
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _peak_mb(fn) -> tuple[float, object]:
    """(peak MB that Python and numpy allocated while ``fn`` ran, what it returned or raised)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - returned for the test to look at
        result = exc
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, result


def test_a_compressed_file_claiming_a_huge_image_is_refused_before_any_decoder_allocates_it(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = _ct_small(Rows=30000, Columns=30000)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "rle.dcm")
    assert (tmp_path / "rle.dcm").stat().st_size < 8000  # CT_small's header and 64 bytes of "pixels"
    peak, err = _peak_mb(lambda: read_slice(tmp_path / "rle.dcm"))
    assert isinstance(err, DicomError) and str(err).startswith("Rows x Columns 30000x30000: not 1 to 4096 pixels")
    assert peak < 20  # was: 1.96 GB taken before "cannot be decoded"


def _deflated(path: Path, ds: pydicom.Dataset, pixel_bytes: int) -> Path:
    """``ds`` saved with the deflate transfer syntax and its PixelData replaced by ``pixel_bytes`` zeros, deflated
    as a stream (a file of a few hundred KB that inflates to ``pixel_bytes``)."""
    import struct
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if 0xFFFCFFFC in ds:  # CT_small's trailing padding: PixelData must be the last element here
        del ds[0xFFFCFFFC]
    ds.save_as(path)
    data = path.read_bytes()
    start = 132 + 12 + pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength
    raw = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    at = raw.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, the last element
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [data[:start], packer.compress(raw[:at] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes))]
    block = bytes(1 << 20)
    for _ in range(pixel_bytes >> 20):
        out.append(packer.compress(block))
    out.append(packer.compress(bytes(pixel_bytes % (1 << 20))) + packer.flush())
    path.write_bytes(b"".join(out))
    return path


def test_a_deflated_file_is_read_and_a_deflate_bomb_refused_before_it_is_inflated(tmp_path):
    original = read_slice(get_testdata_file("CT_small.dcm"))
    small = _deflated(tmp_path / "small.dcm", _ct_small(), 128 * 128 * 2)
    assert read_slice(small).stored.shape == (128, 128)  # a deflated file of the right size reads
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    same = _ct_small()
    same.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    same.save_as(tmp_path / "same.dcm")
    np.testing.assert_array_equal(read_slice(tmp_path / "same.dcm").stored, original.stored)
    bomb = _deflated(tmp_path / "bomb.dcm", _ct_small(Rows=4096, Columns=4096), 80 << 20)
    assert bomb.stat().st_size < 200_000
    peak, err = _peak_mb(lambda: read_slice(bomb))
    assert isinstance(err, DicomError), err
    assert str(err) == "the deflated data set inflates to more than 64 MiB: not a CT slice"
    assert peak < 20  # was: the whole inflated data set in memory, then the image decoded (7-8 GB at 20000 px)
    peak, err = _peak_mb(lambda: read_header(bomb))  # predict reads headers first: bounded there too
    assert isinstance(err, DicomError) and peak < 20


def test_pixel_data_longer_than_the_header_says_is_refused_not_read_sheared(tmp_path):
    ds = _ct_small()
    ds.PixelData = ds.PixelData + bytes(2 * 128)  # one row too many: the image would shift by a row per row
    ds.save_as(tmp_path / "long.dcm")
    with pytest.raises(DicomError, match=r"^PixelData holds 33024 bytes, but Rows x Columns x BitsAllocated say "
                                         r"32768: not this image's pixels"):
        read_slice(tmp_path / "long.dcm")
    odd = _ct_small(Rows=127, Columns=127, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    odd.PixelData = bytes(127 * 127 + 1)  # an odd length padded to even: fine
    odd.save_as(tmp_path / "odd.dcm")
    assert read_slice(tmp_path / "odd.dcm").stored.shape == (127, 127)


def test_a_wide_stored_value_range_is_windowed_without_a_table_of_its_size(tmp_path):
    pixels = np.full((128, 128), 1000, np.uint32)
    pixels[5, 7] = 50_000_000  # one 32-bit pixel of 5e7: a lookup table over the range would take GBs
    ds = _ct_small(BitsAllocated=32, BitsStored=32, HighBit=31, PixelRepresentation=0, RescaleIntercept=-1024,
                   PixelData=pixels.tobytes())
    ds.save_as(tmp_path / "wide.dcm")
    sl = read_slice(tmp_path / "wide.dcm")
    windows = [[40, 80], [80, 200], [600, 2800]]
    peak, img = _peak_mb(lambda: window_stored(sl.stored, sl.ds, windows))
    assert peak < 60, peak  # was: a 2.85 GB table
    hu = pixels.astype(np.float64) - 1024
    for i, (c, w) in enumerate(windows):
        np.testing.assert_array_equal(img[..., i], apply_window(hu, c, w))


def test_a_file_larger_than_a_ct_slice_is_refused_unread(tmp_path, monkeypatch):
    from ichpipe.imaging import dicom

    monkeypatch.setattr(dicom, "MAX_FILE_BYTES", 30_000)  # CT_small is 39 KB
    with pytest.raises(DicomError, match=r"^0 MiB, more than 0 MiB: not a CT slice"):
        read_slice(get_testdata_file("CT_small.dcm"))
