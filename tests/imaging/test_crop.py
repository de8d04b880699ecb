"""The head crop: the box, the centred square, a map put back onto the slice."""

from __future__ import annotations

import cv2
import numpy as np

from ichpipe.imaging.crop import crop_border, head_box, uncrop


def test_crop_border_keeps_the_head_drops_black_and_pads_to_a_centred_square():
    img = np.zeros((100, 120, 3), np.uint8)
    img[20:60, 30:90] = 200  # the "head": rows 20-59, columns 30-89 (40 x 60)
    tight = crop_border(img, np.random.default_rng(0), 0.0)
    # the 40 x 60 box on a 60 x 60 black square, 10 rows above and below: a resize keeps its proportions
    assert tight.shape == (60, 60, 3)
    assert (tight[10:50] == 200).all() and (tight[:10] == 0).all() and (tight[50:] == 0).all()
    loose = crop_border(img, np.random.default_rng(0), 0.25)
    assert loose.shape[0] == loose.shape[1] and 60 <= loose.shape[0] <= 90
    assert (loose == 200).sum() == 40 * 60 * 3  # the whole head is inside
    assert crop_border(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), 0.1).shape == (8, 8, 3)
    tall = np.zeros((50, 50, 9), np.uint8)
    tall[5:45, 20:30, 4] = 7  # 9 channels: any channel that is not black is head
    out = crop_border(tall, np.random.default_rng(0), 0.0)
    assert out.shape == (40, 40, 9) and (out[:, 15:25, 4] == 7).all() and out[:, :15].max() == 0


def test_a_map_over_the_crop_goes_back_onto_the_image():
    """uncrop undoes crop_border's geometry: a heatmap drawn over the network's (cropped, squared, resized) input
    lands on the same pixels of the full image (the Grad-CAM of a cropping bundle once sat stretched over all of it)."""
    img = np.zeros((100, 120, 3), np.uint8)
    img[20:60, 30:90] = 200
    img[30:34, 70:74] = 255  # a bright spot inside the head
    rng = np.random.default_rng(0)
    box = head_box(img, rng, 0.0)
    assert box == (20, 60, 30, 90)
    square = crop_border(img, rng, 0.0)[..., 0].astype(np.float32)
    np.testing.assert_array_equal(uncrop(square, box, img.shape[:2]), img[..., 0])  # same size: exact
    small = cv2.resize(square, (32, 32), interpolation=cv2.INTER_AREA)  # as the network sees it
    back = uncrop((small == small.max()).astype(np.float32), box, img.shape[:2])
    rows, cols = np.nonzero(back > 0.5)
    assert 28 <= rows.mean() <= 36 and 68 <= cols.mean() <= 76  # the spot's place, not stretched elsewhere
    assert back[:20].max() == 0 and back[:, :30].max() == 0  # nothing outside the head's box
    np.testing.assert_allclose(uncrop(small, None, (64, 64)).shape, (64, 64))
