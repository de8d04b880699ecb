"""Grad-CAM and the pointing game: the measure on known maps, which (slice, subtype) pairs count, the crop undone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ichpipe.base.labels import LABELS, SUBTYPES
from ichpipe.imaging.png import write_mask
from ichpipe.scoring.localisation import grad_cam, mean_grad_cam, point, pointing_game, pointing_summary


def test_the_pointing_game_measure():
    mask = np.zeros((100, 100), bool)
    mask[60:80, 10:30] = True
    heat = np.zeros((50, 50), np.float32)
    heat[35, 10] = 1.0  # (70, 20) at the mask's size: inside
    hit, mass = point(heat, mask)
    assert hit and mass > 0.9
    heat = np.zeros((50, 50), np.float32)
    heat[5, 45] = 1.0
    assert point(heat, mask) == (False, 0.0)
    assert point(np.ones((50, 50), np.float32), mask)[1] == pytest.approx(mask.mean(), abs=1e-3)  # even map: area share


def test_the_game_counts_the_correct_flags_of_each_subtype_only(tmp_path):
    """A pair counts when the slice is flagged for the subtype and its mask shows that subtype's blood: a flag on a
    slice without blood (no mask), or for a subtype its mask lacks, is a false positive and is not played."""
    blood = np.zeros((40, 40), bool)
    blood[5:15, 20:30] = True  # subdural, top right
    other = np.zeros((40, 40), bool)
    other[30:38, 2:10] = True  # intraventricular, bottom left
    labels = {sub: 0 for sub in SUBTYPES}
    write_mask(tmp_path / "a.png", {"subdural": blood, "intraventricular": other},
               {**labels, "subdural": 1, "intraventricular": 1})
    write_mask(tmp_path / "b.png", {"subdural": blood}, {**labels, "subdural": 1})
    ids = ["a", "b", "c"]  # c: no mask (a control)
    flags = np.zeros((3, 6), bool)
    flags[:, LABELS.index("subdural")] = True
    flags[0, LABELS.index("intraventricular")] = True
    flags[1, LABELS.index("epidural")] = True  # b has no epidural blood
    flags[:, LABELS.index("any")] = True
    asked = []

    def cams(rows, label):
        asked.append((rows, LABELS[label]))
        out = np.zeros((len(rows), 20, 20), np.float32)
        out[:, 4, 12] = 1.0  # the peak in the subdural blood (top right at half the size) for every slice
        return out

    rows = pd.DataFrame(pointing_game(ids, flags, tmp_path, cams))
    assert asked == [([0], "intraventricular"), ([0, 1], "subdural")]
    assert rows[["SOPInstanceUID", "subtype", "hit"]].values.tolist() == [
        ["a", "intraventricular", False], ["a", "subdural", True], ["b", "subdural", True]]
    assert rows.blood_share.tolist() == pytest.approx([other.mean(), blood.mean(), blood.mean()])
    summary = pointing_summary(rows)
    assert summary.loc["subdural"].tolist() == pytest.approx([2, 1.0, rows.mass_inside[1], blood.mean()])
    assert summary.loc["intraventricular", "peak_inside"] == 0.0


class _Sum(torch.nn.Module):
    """A 'CNN': its features the first channel pooled 4x4, each output their sum: its Grad-CAM is where the input
    is bright."""

    def forward_features(self, x):
        return torch.nn.functional.avg_pool2d(x[:, :1], 4)

    def forward_head(self, f):
        return f.sum(dim=(1, 2, 3))[:, None].repeat(1, 6)


def test_grad_cam_finds_the_features_that_raise_the_output_and_undoes_the_crop():
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 4:20, 8:24] = 1.0
    cam = grad_cam(_Sum(), x, 0)[0]
    assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0)
    assert cam[6:18, 10:22].min() > 0.9 and cam[24:, :].max() < 0.1 and cam[:, 28:].max() < 0.1
    # a cropped input: the head occupies rows 16-47, columns 0-63 of a 64x64 image, the crop made it square (padded
    # above and below); the map, brought back, lies on the head's pixels and is zero outside them
    image = np.zeros((1, 64, 64, 3), np.uint8)
    image[0, 16:48, :] = 100
    x = torch.ones(1, 3, 32, 32)
    back = mean_grad_cam([_Sum()], x, image, cropped=True, label=0)[0]
    assert back.shape == (64, 64) and back[:16].max() == 0 and back[48:].max() == 0
    assert back.max() == pytest.approx(1.0) and back[16:48].mean() > 0.1
