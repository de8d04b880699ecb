"""The figure ``predict`` writes per series (and ``evaluate`` per worst miss)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left as it is
from matplotlib.ticker import FixedFormatter, FixedLocator

from ichpipe.base.labels import ANY_INDEX, LABELS
from ichpipe.clinical.predictor import Predictor, SeriesResult
from ichpipe.clinical.studies import Series
from ichpipe.imaging.png import read_mask

MAX_SHOWN = 6  # slices drawn at most; the figure says when more were flagged
P_RANGE = (1e-3, 1 - 1e-3)  # the probability axis (logit scale: a threshold of 0.003 is as visible as one of 0.5)


def series_figure(path: Path, s: Series, result: SeriesResult, predictor: Predictor,
                  masks: Path | None = None) -> list[int]:
    """The flagged slices of a series (at most :data:`MAX_SHOWN`, the most probable; or its three most suspicious)
    with the Grad-CAM of the bundle's CNNs for `any` on one scale for all (each map's peak times the slice's
    probability, with a colour bar), and its six probabilities along z on a logit axis with each class's flagging
    point; with ``masks`` (a folder of bleed masks, as the synthetic answer key's), the blood outlined. Returns the
    positions of the slices drawn."""
    images, probs, flags, thresholds = result.images, result.probs, result.flags, predictor.info.thresholds

    chosen = np.flatnonzero(flags[:, ANY_INDEX])
    title = f"{len(chosen)} flagged slice(s) (any)"
    if not len(chosen):
        chosen, title = np.argsort(-probs[:, ANY_INDEX])[:3], "no slice flagged; the three most probable (any)"
    elif len(chosen) > MAX_SHOWN:
        title += f", the {MAX_SHOWN} most probable shown"
    chosen = chosen[np.argsort(-probs[chosen, ANY_INDEX])][:MAX_SHOWN]
    chosen = np.sort(chosen)
    cams = predictor.grad_cam(images[chosen])
    n = max(len(chosen), 3)
    fig = Figure(figsize=(3 * n + 0.8, 7.5))
    grid = fig.add_gridspec(2, n + 1, height_ratios=[1.1, 1], width_ratios=[*([1] * n), 0.06])
    heat = None
    for j, i in enumerate(chosen):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(images[i][..., 0], cmap="gray")  # the first window (brain, or slice s-1 in 2.5D)
        value = cams[j] * probs[i, ANY_INDEX]  # transparent where there is nothing to show
        heat = ax.imshow(value, cmap="jet", alpha=np.clip(value, 0.0, 0.5), vmin=0.0, vmax=1.0)
        mask_file = masks / f"{s.ids[i]}.png" if masks is not None else None
        if mask_file is not None and mask_file.exists():
            blood = np.logical_or.reduce(list(read_mask(mask_file).values())).astype(np.uint8)
            blood = cv2.resize(blood, images.shape[1:3][::-1], interpolation=cv2.INTER_NEAREST)
            ax.contour(blood, levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(f"slice {i + 1}/{len(images)}, z={s.z[i]:.1f}\nany {probs[i, ANY_INDEX]:.3f}", fontsize=9)
        ax.axis("off")
    if heat is not None:
        bar = fig.colorbar(heat, cax=fig.add_subplot(grid[0, n]))
        bar.set_label("Grad-CAM (peak 1) x P(any) of the slice", fontsize=8)
    ax = fig.add_subplot(grid[1, :n])
    for c, name in enumerate(LABELS):
        line, = ax.plot(s.z, np.clip(probs[:, c], *P_RANGE), label=f"{name} (flagging point "
                        f"{thresholds[name].threshold:.3f})", lw=2.2 if name == "any" else 1.2, marker=".")
        ax.axhline(thresholds[name].threshold, color=line.get_color(), ls="--", lw=1.0)
    ax.set_yscale("logit")
    ax.set_ylim(*P_RANGE)
    ticks = [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FixedFormatter([f"{v:g}" for v in ticks]))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel("z (mm, along the slice normal)")
    ax.set_ylabel("probability (logit scale)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    outline = "; white: the blood (answer key)" if masks is not None else ""
    fig.suptitle(f"{title} with Grad-CAM (mean of the CNNs){outline}; probabilities along the series (dashed: "
                 "flagging points)\n"
                 f"study ...{s.study[-16:]}, series ...{s.series[-16:]} ({len(images)} slices) - research tool, "
                 "not for diagnosis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return [int(i) for i in chosen]
