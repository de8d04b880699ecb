"""Where a CNN looks, and whether that is the blood: Grad-CAM over the image's own pixels (through the head crop)
and the pointing game against the synthetic answer key's bleed masks, for ``report`` (the OOF slices, each with
its own fold's CNNs) and ``evaluate`` (a bundle on labelled studies).

The pointing game (Zhang et al., 2018), per subtype, over the slices the model flags correctly at a threshold:
the share whose heatmap peak falls inside that subtype's blood, and the mean share of the heatmap's mass inside
it, beside the blood's share of the image (what a map spread evenly over the image would score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from ichpipe.base.labels import LABELS, SUBTYPES
from ichpipe.base.paths import png_path
from ichpipe.imaging.crop import head_box, uncrop
from ichpipe.imaging.png import read_mask

POINTING_COLUMNS = ["slices", "peak_inside", "mass_inside", "blood_share"]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, label: int) -> np.ndarray:
    """(N, h, w) Grad-CAM of one CNN's output ``label`` (``x`` normalised) at its input's size, scaled to a peak of
    1 per image."""
    with torch.enable_grad():
        features = model.forward_features(x).detach().requires_grad_(True)
        score = model.forward_head(features)[:, label].sum()
        (grads,) = torch.autograd.grad(score, features)
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).max(dim=1).values.clamp(min=1e-8)[:, None, None]
    return (cam / top).detach().float().cpu().numpy()


def mean_grad_cam(models: Sequence[torch.nn.Module], x: torch.Tensor, images: np.ndarray, cropped: bool,
                  label: int) -> np.ndarray:
    """(N, H, W) mean Grad-CAM of ``models`` (each map scaled to a peak of 1) for inputs ``x`` (normalised) made
    from ``images`` (N, H, W, C: what went into the crop, neighbours stacked), over the images' pixels: mapped back
    through the head crop when ``cropped``; the mean scaled to [0, 1] per image."""
    cams = np.mean([grad_cam(model, x, label) for model in models], axis=0)
    rng = np.random.default_rng(0)
    out = np.stack([uncrop(cam, head_box(img, rng, 0.0) if cropped else None, images.shape[1:3])
                    for cam, img in zip(cams, images, strict=True)])
    return out / np.maximum(out.reshape(len(out), -1).max(axis=1), 1e-8)[:, None, None]


def point(heat: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """Whether the heatmap's peak falls inside ``mask``, and the share of its mass there (the map resized to the
    mask's pixel grid first)."""
    heat = cv2.resize(heat.astype(np.float32), (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(mask[peak]), float(heat[mask].sum() / max(float(heat.sum()), 1e-8))


def pointing_game(ids: Sequence[str], flags: np.ndarray, masks_dir: Path,
                  cams: Callable[[list[int], int], np.ndarray]) -> list[dict]:
    """Per (slice, subtype) flagged (``flags``: (N, 6) bool, ``LABELS`` order) where the mask shows that subtype's
    blood: whether the Grad-CAM peak (``cams(rows, label)`` → (len(rows), H, W)) falls inside it, its mass there
    and the blood's share of the image. Slices without a mask (no blood) are false positives: not counted."""
    out = []
    flagged = np.flatnonzero(flags.any(axis=1))
    truth = {i: read_mask(png_path(masks_dir, ids[i])) for i in flagged if png_path(masks_dir, ids[i]).exists()}
    for sub in SUBTYPES:
        c = LABELS.index(sub)
        hits = [i for i in truth if flags[i, c] and truth[i][sub].any()]
        if not hits:
            continue
        for i, cam in zip(hits, cams(hits, c), strict=True):
            hit, mass = point(cam, truth[i][sub])
            out.append({"SOPInstanceUID": ids[i], "subtype": sub, "hit": hit, "mass_inside": mass,
                        "blood_share": float(truth[i][sub].mean())})
    return out


def pointing_summary(pointing: pd.DataFrame) -> pd.DataFrame:
    """Per subtype: slices, the share of Grad-CAM peaks inside the blood, mean mass inside, mean blood share."""
    if pointing.empty:
        return pd.DataFrame(columns=POINTING_COLUMNS).rename_axis("subtype")
    g = pointing.groupby("subtype")
    return pd.DataFrame({"slices": g.size(), "peak_inside": g.hit.mean(), "mass_inside": g.mass_inside.mean(),
                         "blood_share": g.blood_share.mean()})[POINTING_COLUMNS]


def pointing_lines(summary: pd.DataFrame) -> list[str]:
    """The pointing game as a markdown table (one row per subtype)."""
    return ["| subtype | slices | peak inside the blood | heatmap mass inside | blood's share of the image |",
            "|---|---|---|---|---|",
            *[f"| {sub} | {int(r.slices)} | {r.peak_inside:.0%} | {r.mass_inside:.1%} | {r.blood_share:.1%} |"
              for sub, r in summary.iterrows()]]
