"""The figure ``predict`` writes per series (and ``evaluate`` per worst miss)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left as it is

from ichpipe.base.labels import ANY_INDEX, LABELS
from ichpipe.clinical.predictor import Predictor, SeriesResult
from ichpipe.clinical.studies import Series
from ichpipe.imaging.png import read_mask


def series_figure(path: Path, s: Series, result: SeriesResult, predictor: Predictor, masks: Path | None = None) -> None:
    """The flagged slices of a series (or its three most suspicious) with the Grad-CAM of the bundle's CNNs for
    `any`, and its six probabilities along z with the thresholds; with ``masks`` (a folder of bleed masks, as the
    synthetic answer key's), the blood outlined."""
    images, probs, flags, thresholds = result.images, result.probs, result.flags, predictor.info.thresholds

    chosen = np.flatnonzero(flags[:, ANY_INDEX])
    title = "flagged slices (any)"
    if not len(chosen):
        chosen, title = np.argsort(-probs[:, ANY_INDEX])[:3], "no slice flagged; the three highest (any)"
    chosen = chosen[np.argsort(-probs[chosen, ANY_INDEX])][:6]
    chosen = np.sort(chosen)
    cams = predictor.grad_cam(images[chosen])
    fig = Figure(figsize=(3 * max(len(chosen), 3), 7.5))
    grid = fig.add_gridspec(2, max(len(chosen), 3), height_ratios=[1.1, 1])
    for j, i in enumerate(chosen):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(images[i][..., 0], cmap="gray")  # the first window (brain, or slice s-1 in 2.5D)
        ax.imshow(cams[j], cmap="jet", alpha=0.35)
        mask_file = masks / f"{s.ids[i]}.png" if masks is not None else None
        if mask_file is not None and mask_file.exists():
            blood = np.logical_or.reduce(list(read_mask(mask_file).values())).astype(np.uint8)
            blood = cv2.resize(blood, images.shape[1:3][::-1], interpolation=cv2.INTER_NEAREST)
            ax.contour(blood, levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(f"slice {i + 1}/{len(images)}, z={s.z[i]:.1f}\nany {probs[i, ANY_INDEX]:.2f}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    for c, name in enumerate(LABELS):
        line, = ax.plot(s.z, probs[:, c], label=name, lw=2.2 if name == "any" else 1.2, marker=".")
        ax.axhline(thresholds[name].threshold, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("z (mm, along the slice normal)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    outline = "; white: the blood (answer key)" if masks is not None else ""
    fig.suptitle(f"{title} with Grad-CAM (mean of the CNNs){outline}; probabilities along the series (dotted: "
                 "thresholds)\n"
                 f"study ...{s.study[-16:]}, series ...{s.series[-16:]} ({len(images)} slices) - research tool, "
                 "not for diagnosis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
