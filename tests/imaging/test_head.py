"""Is it a head CT? The image check on real CT slices nobody here wrote (pydicom's test files), an all-air slice
and a drawn skull, and the header's body part."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichpipe.imaging.dicom import hounsfield
from ichpipe.imaging.head import (
    MIN_BRAIN_MM2,
    cranial_interior,
    why_not_a_head_image,
    why_not_a_head_part,
)


def _interior(name: str):
    ds = pydicom.dcmread(get_testdata_file(name))
    return cranial_interior(hounsfield(ds.pixel_array, ds), [float(v) for v in ds.PixelSpacing])


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_real_head_slices_enclose_a_brain(name):
    """CQ500's head CT 693 (two slices) and a skull-base HEAD slice: 9,500 to 12,500 mm^2 of brain-like tissue."""
    interior = _interior(name)
    assert interior.is_cranial and 9000 < interior.brain_mm2 < 14000 and interior.share > 0.7
    assert why_not_a_head_image([interior]) is None


@pytest.mark.parametrize("name, most", [("CT_small.dcm", 0), ("bad_sequence.dcm", 0), ("explicit_VR-UN.dcm", 400)])
def test_a_vertebra_a_neck_and_an_abdomen_are_not_heads(name, most):
    """CT_small (a thoracic vertebra), a NECK slice and a PANCREAS slice: their bone encloses little or no brain-like
    tissue."""
    interior = _interior(name)
    assert not interior.is_cranial and interior.brain_mm2 <= most
    reason = why_not_a_head_image([interior, interior])
    assert reason.startswith("no skull enclosing a brain-sized interior on any of its 2 slice(s)")


def test_air_and_a_drawn_skull():
    assert cranial_interior(np.full((512, 512), -1000.0), None).brain_mm2 == 0  # all air: nothing enclosed
    yy, xx = np.mgrid[:256, :256]
    r = np.hypot((yy - 128) / 90, (xx - 128) / 75)  # an ellipse of 180 x 150 mm at 1 mm a pixel
    hu = np.where(r < 0.93, 35.0, np.where(r < 1.0, 1200.0, -1000.0))  # brain inside a 6 mm skull, air outside
    head = cranial_interior(hu, (1.0, 1.0))
    assert head.is_cranial and head.brain_mm2 == pytest.approx(np.pi * 90 * 75 * 0.93 ** 2, rel=0.03)
    hu[(r < 1.0) & (xx > 128)] = np.where(r < 0.93, 35.0, -1000.0)[(r < 1.0) & (xx > 128)]  # half the skull gone
    assert not cranial_interior(hu, (1.0, 1.0)).is_cranial  # an open skull encloses nothing: not assessable
    small = np.where(r < 0.93, 35.0, np.where(r < 1.0, 1200.0, -1000.0))
    assert not cranial_interior(small, (0.3, 0.3)).is_cranial  # the same drawing 54 x 45 mm: too small for a brain
    assert cranial_interior(small, (0.3, 0.3)).brain_mm2 < MIN_BRAIN_MM2


def test_the_body_part():
    assert why_not_a_head_part(None) is None and why_not_a_head_part("") is None  # not recorded: the image decides
    for part in ("HEAD", "BRAIN", "Head", "SKULL", "HEADNECK"):
        assert why_not_a_head_part(part) is None, part
    assert why_not_a_head_part("CHEST") == "BodyPartExamined CHEST, not a head"
    assert why_not_a_head_part("pancreas") == "BodyPartExamined PANCREAS, not a head"
