#!/usr/bin/env python
"""Dataset overview from the metadata table: prevalence, co-occurrence, series lengths, quirks, examples.

    python eda/01_dataset_overview.py [data.root=data] [preprocess.size=512]

Writes PNG figures and summary.md into <work dir>/eda/ (data.work_dir, default the data root; after `make preprocess`).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ichpipe.base.cli import stage_main
from ichpipe.base.files import write_text_atomic
from ichpipe.base.labels import ABBREVIATIONS, LABELS, SUBTYPES
from ichpipe.base.paths import data_paths, read_metadata
from ichpipe.imaging.png import read_png

N_EXAMPLES = 4  # rows of the example grid


def prevalence_figure(train: pd.DataFrame, path) -> pd.Series:
    prev = train[list(LABELS)].mean() * 100
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(prev.index, prev.values, color=["#4c72b0"] * 5 + ["#c44e52"])
    ax.bar_label(bars, fmt="%.2f%%", fontsize=8)
    ax.set_ylabel("images with the label (%)")
    ax.set_title(f"Label prevalence, {len(train):,} train images")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return prev


def cooccurrence_figure(train: pd.DataFrame, path) -> pd.DataFrame:
    """P(column label | row label) over images: how often subtypes appear together."""
    y = train[list(SUBTYPES)].to_numpy(dtype=float)
    counts = y.T @ y
    cond = pd.DataFrame(counts / np.maximum(np.diag(counts)[:, None], 1), index=SUBTYPES, columns=SUBTYPES)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cond.values, cmap="viridis", vmin=0, vmax=1)
    for i in range(len(SUBTYPES)):
        for j in range(len(SUBTYPES)):
            ax.text(j, i, f"{cond.values[i, j]:.2f}", ha="center", va="center",
                    color="white" if cond.values[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(5), SUBTYPES, rotation=30, ha="right")
    ax.set_yticks(range(5), SUBTYPES)
    ax.set_title("Co-occurrence: P(column | row) per image")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return cond


def series_length_figure(meta: pd.DataFrame, path) -> pd.Series:
    lengths = meta.groupby("SeriesInstanceUID").size()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=range(int(lengths.min()), int(lengths.max()) + 2), color="#55a868")
    ax.set_xlabel("slices per series")
    ax.set_ylabel("series")
    ax.set_title(f"{len(lengths):,} series, median {lengths.median():.0f} slices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lengths


def example_grid(train: pd.DataFrame, png_dir, path, seed: int = 0) -> None:
    """One column per subtype plus Control (no label), N_EXAMPLES windowed slices each."""
    columns = [*SUBTYPES, "control"]
    fig, axes = plt.subplots(N_EXAMPLES, len(columns), figsize=(2.2 * len(columns), 2.3 * N_EXAMPLES))
    for j, name in enumerate(columns):
        pool = train[train["any"] == 0] if name == "control" else train[train[name] == 1]
        pick = pool.sample(min(N_EXAMPLES, len(pool)), random_state=seed) if len(pool) else pool
        for i in range(N_EXAMPLES):
            ax = axes[i, j]
            ax.axis("off")
            if i < len(pick):
                row = pick.iloc[i]
                ax.imshow(read_png(png_dir / f"{row.image_id}.png"))
                others = [ABBREVIATIONS[s] for s in SUBTYPES if row[s] == 1 and s != name]
                ax.set_title(row.image_id + ("\n+" + ",".join(others) if others else ""), fontsize=6)
        axes[0, j].set_title(f"{name}\n" + axes[0, j].get_title(), fontsize=8)
    fig.suptitle("Example slices per class (RGB = brain, subdural, bone windows)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cfg, args):
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    png_dir = paths.pngs(cfg.preprocess)
    out = paths.eda
    out.mkdir(parents=True, exist_ok=True)
    train = meta[meta.split == "train"]
    prev = prevalence_figure(train, out / "prevalence.png")
    cond = cooccurrence_figure(train, out / "cooccurrence.png")
    lengths = series_length_figure(meta, out / "slices_per_series.png")
    if png_dir.exists():
        example_grid(train, png_dir, out / "examples.png", cfg.seed)
    bad_path = png_dir / "bad_files.csv"
    n_bad = len(pd.read_csv(bad_path)) if bad_path.exists() else 0
    sizes = meta.groupby(["rows", "cols"]).size()
    quirks = {
        "12-bit files fixed (PixelRepresentation 0, intercept > -100)": int(meta.fixed_12bit.sum()),
        "multi-valued WindowCenter/Width": int(meta.multivalue_window.sum()),
        "images not 512x512": int((meta.rows != 512).sum() + ((meta.rows == 512) & (meta.cols != 512)).sum()),
        "unusable files (bad_files.csv)": n_bad,
    }
    lines = [f"# Dataset overview: {paths.root}", "",
             f"{len(meta):,} images ({len(train):,} train, {len(meta) - len(train):,} test), "
             f"{meta.PatientID.nunique():,} patients, {meta.SeriesInstanceUID.nunique():,} series; "
             f"slices per series: median {lengths.median():.0f}, range {lengths.min()}-{lengths.max()}.", "",
             "## Prevalence (train, % of images)", "", "| label | % |", "|---|---|",
             *[f"| {k} | {v:.2f} |" for k, v in prev.items()], "",
             "## Co-occurrence, P(column | row)", "", "| | " + " | ".join(SUBTYPES) + " |",
             "|---" * (len(SUBTYPES) + 1) + "|",
             *[f"| {r} | " + " | ".join(f"{v:.2f}" for v in cond.loc[r]) + " |" for r in SUBTYPES], "",
             "## Quirks", "", "| quirk | images |", "|---|---|", *[f"| {k} | {v} |" for k, v in quirks.items()], "",
             "Matrix sizes: " + ", ".join(f"{r}x{c}: {n}" for (r, c), n in sizes.items()), "",
             "Figures: prevalence.png, cooccurrence.png, slices_per_series.png, examples.png", ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))
    print("\n".join(lines[:3]))
    print(f"figures and summary.md in {out}")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, run))
