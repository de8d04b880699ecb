"""The experiment report (``make report``): Figure 1, PR curves at a clinical operating point,
calibration, per-class table, the Grad-CAM pointing game and training curves, from the OOF predictions of stage 5.

Reads ``runs/<experiment>/blend/oof_predictions.parquet`` (stage 5), the metadata, the PNGs and each
fold's TensorBoard log (and LSTM ``history.csv`` where present); for the pointing game, where the data root has
the synthetic answer key's bleed masks, each fold's embedded checkpoints. Writes
``runs/<experiment>/report/``: ``figure1.png``, ``pr_curves.png``, ``calibration.png``,
``training_curves.png``, ``pointing_game.csv`` and ``report.md`` that shows them with their tables.

Figure 1 columns: one per subtype (images with at least that label) and "Control" (no label). Under
each example, two bars: the *own-class* accuracy (the probability the model gives the true answer
of the column's label; Control: of ``any``) and the *all-label* accuracy (the same, averaged over
the six labels). Colour runs from red at the prior-only baseline (the prevalence as prediction)
to bright green at 100%. The header gives the column's accuracy over all its OOF images: the share
whose own class is right at threshold 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure  # figures without pyplot: no backend is chosen for whoever imports this
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, precision_recall_curve

from ichpipe.base.config import Config
from ichpipe.base.device import default_device
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, write_text_atomic, writer_lock
from ichpipe.base.labels import ABBREVIATIONS, ANY_INDEX, LABELS, SUBTYPES
from ichpipe.base.paths import (
    bag_dir,
    blend_dir,
    data_paths,
    epoch_number,
    experiment_dir,
    finished_dirs,
    png_path,
    read_metadata,
    run_dir,
    seed_configs,
)
from ichpipe.imaging.png import read_png
from ichpipe.networks.dataset import EvalInput, SliceDataset, normalize, to_input
from ichpipe.networks.models import load_checkpoint
from ichpipe.scoring.folds import check_fold_table
from ichpipe.scoring.localisation import mean_grad_cam, pointing_game, pointing_lines, pointing_summary
from ichpipe.scoring.metrics import (
    OperatingPoint,
    auc_or_nan,
    per_class_log_loss,
    threshold_for_recall,
    weighted_log_loss,
)
from ichpipe.scoring.metrics import prior as prior_of
from ichpipe.scoring.results import PREDICTION_FILES

COLUMNS = (*SUBTYPES, "control")
RED_TO_GREEN = LinearSegmentedColormap.from_list("baseline_to_perfect", ["#d7191c", "#fdae61", "#a6d96a", "#00e000"])


# --- the numbers behind the figures --------------------------------------------------------------

def truth_confidence(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per (image, label): the probability given to the true answer, p where y=1 and 1-p where y=0."""
    return np.where(y > 0.5, p, 1.0 - p)


def indicator_values(y: np.ndarray, p: np.ndarray, prior: np.ndarray, column: str) -> dict[str, np.ndarray]:
    """Figure 1's two bars per image of a column, with their prior-only baselines (each (N,))."""
    label = ANY_INDEX if column == "control" else LABELS.index(column)
    conf, base = truth_confidence(y, p), truth_confidence(y, np.broadcast_to(prior, y.shape))
    return {"own": conf[:, label], "own_baseline": base[:, label],
            "all": conf.mean(axis=1), "all_baseline": base.mean(axis=1)}


def bar_colour_position(value: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """0 at (or below) the baseline, 1 at 100%: the position on the red-to-green scale."""
    return np.clip((value - baseline) / np.maximum(1.0 - baseline, 1e-9), 0.0, 1.0)


def column_members(y: np.ndarray, column: str) -> np.ndarray:
    """Boolean mask of the images that belong to a Figure 1 column."""
    if column == "control":
        return y.sum(axis=1) == 0
    return y[:, LABELS.index(column)] > 0.5


def column_accuracy(y: np.ndarray, p: np.ndarray, column: str) -> float:
    """Share of the column's images whose own class is right at threshold 0.5 (NaN when empty)."""
    members = column_members(y, column)
    if not members.any():
        return float("nan")
    label = ANY_INDEX if column == "control" else LABELS.index(column)
    return float(((p[members, label] >= 0.5) == (y[members, label] > 0.5)).mean())


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width bins of predicted probability (scikit-learn's ``calibration_curve``): mean prediction,
    observed frequency and count of each non-empty bin."""
    observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    which = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p)  # calibration_curve's own binning
    counts = np.bincount(which, minlength=n_bins)
    bins = np.flatnonzero(counts)
    return pd.DataFrame({"bin": bins, "mean_predicted": predicted, "observed": observed, "count": counts[bins]})


def class_table(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Per class: log loss, AUC, average precision, positives; plus the weighted log loss of all."""
    losses = per_class_log_loss(y, p)
    rows = []
    for i, name in enumerate(LABELS):
        both = 0 < y[:, i].sum() < len(y)
        rows.append({"class": name, "log_loss": losses[name],
                     "auc": auc_or_nan(y[:, i], p[:, i]),
                     "average_precision": average_precision_score(y[:, i], p[:, i]) if both else float("nan"),
                     "positives": int(y[:, i].sum())})
    table = pd.DataFrame(rows).set_index("class")
    table.attrs["weighted_log_loss"] = weighted_log_loss(y, p)
    return table


def read_scalars(tb_dir: Path) -> pd.DataFrame:
    """Every scalar of a TensorBoard log as rows (tag, step, value); the last value wins per (tag, step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    rows = [{"tag": tag, "step": e.step, "value": e.value} for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    frame = pd.DataFrame(rows, columns=["tag", "step", "value"])
    return frame.drop_duplicates(["tag", "step"], keep="last").sort_values(["tag", "step"]).reset_index(drop=True)


def best_epoch(val: pd.DataFrame) -> tuple[int, int, float]:
    """(epoch, step, loss) of the lowest validation loss; epochs count the validation points from 0."""
    i = int(np.argmin(val.value.to_numpy()))
    return i, int(val.step.iloc[i]), float(val.value.iloc[i])


# --- figures ---------------------------------------------------------------------------------------

def _subplots(rows: int, cols: int, figsize: tuple[float, float], **kw):
    """(figure, axes) as ``plt.subplots`` gives them, without pyplot's global state or a backend choice."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kw)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def figure1(y, p, prior, ids, png_dir: Path, path: Path, per_column: int, seed: int) -> dict:
    """The per-class accuracy grid; returns the header accuracy and the chosen examples per column."""
    rng = np.random.default_rng(seed)
    fig, axes = _subplots(per_column, len(COLUMNS), figsize=(2.1 * len(COLUMNS), 2.5 * per_column + 0.6),
                          squeeze=False)
    summary = {}
    for j, column in enumerate(COLUMNS):
        members = np.flatnonzero(column_members(y, column))
        chosen = rng.choice(members, size=min(per_column, len(members)), replace=False) if len(members) else []
        acc = column_accuracy(y, p, column)
        values = indicator_values(y[chosen], p[chosen], prior, column) if len(chosen) else {}
        summary[column] = {"accuracy": acc, "images": int(len(members)), "examples": [str(ids[i]) for i in chosen],
                           **{k: v.tolist() for k, v in values.items()}}
        name = "Control" if column == "control" else f"{column}\n({ABBREVIATIONS[column]})"
        axes[0, j].set_title(f"{name}\nacc {acc:.0%} of {len(members)}" if len(members) else f"{name}\nno images",
                             fontsize=9)
        for i in range(per_column):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(chosen):
                ax.axis("off")
                continue
            ax.imshow(read_png(png_path(png_dir, ids[chosen[i]])))
            for k, (key, x0) in enumerate((("own", 0.0), ("all", 0.52))):
                value, base = values[key][i], values[f"{key}_baseline"][i]
                colour = RED_TO_GREEN(float(bar_colour_position(np.array(value), np.array(base))))
                bar = ax.inset_axes([x0, -0.2, 0.48, 0.12])
                bar.barh([0], [value], color=colour, height=1.0)
                bar.set_xlim(0, 1)
                bar.set_xticks([])
                bar.set_yticks([])
                bar.text(0.5, 0, f"{'own' if k == 0 else 'all'} {value:.0%}", ha="center", va="center", fontsize=7)
    fig.suptitle("Figure 1: OOF examples per class; bars = probability given to the truth "
                 "(left: own class, right: all six labels), red = prior baseline, green = 100%", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.subplots_adjust(hspace=0.45, bottom=0.07)  # room for the last row's bars
    _save(fig, path)
    return summary


def pr_figure(y, p, targets: dict[str, float], path: Path) -> dict[str, OperatingPoint]:
    fig, axes = _subplots(2, 3, figsize=(13, 8))
    points = {}
    for ax, (i, name) in zip(axes.ravel(), enumerate(LABELS), strict=True):
        ax.set_title(f"{name} ({ABBREVIATIONS[name]})")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        if y[:, i].sum() == 0:
            ax.text(0.5, 0.5, "no positives", ha="center")
            continue
        precision, recall, _ = precision_recall_curve(y[:, i], p[:, i])
        ax.plot(recall, precision, label=f"AP {average_precision_score(y[:, i], p[:, i]):.3f}")
        ax.axhline(y[:, i].mean(), color="grey", ls=":", label=f"prevalence {y[:, i].mean():.3f}")
        op = threshold_for_recall(y[:, i], p[:, i], targets[name])
        points[name] = op
        ax.plot([op.recall], [op.precision], "o", color="#d62728",
                label=f"t={op.threshold:.3g}: recall {op.recall:.2f}, precision {op.precision:.2f}\n"
                      f"missed {op.fn} of {op.tp + op.fn}, FP {op.fp}")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("Precision-recall per class (OOF), with the threshold that reaches the target recall")
    fig.tight_layout()
    _save(fig, path)
    return points


def calibration_figure(y, p, n_bins: int, path: Path) -> dict[str, pd.DataFrame]:
    fig, axes = _subplots(2, 3, figsize=(13, 8))
    bins = {}
    for ax, (i, name) in zip(axes.ravel(), enumerate(LABELS), strict=True):
        b = calibration_bins(y[:, i], p[:, i], n_bins)
        bins[name] = b
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect")
        ax.plot(b.mean_predicted, b.observed, "o-", label="model")
        for _, r in b.iterrows():
            ax.annotate(str(int(r["count"])), (r.mean_predicted, r.observed), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{name} ({ABBREVIATIONS[name]})")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability per class (OOF; {n_bins} equal-width bins, slices per bin annotated)")
    fig.tight_layout()
    _save(fig, path)
    return bins


def training_figure(curves: dict[int, pd.DataFrame], lstm: pd.DataFrame | None, path: Path) -> dict[int, tuple]:
    """Train/validation loss per fold from TensorBoard, best epoch marked; LSTM curves beside when present."""
    n = 2 if lstm is not None else 1
    fig, axes = _subplots(1, n, figsize=(7 * n, 4.5), squeeze=False)
    ax = axes[0, 0]
    best = {}
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, frame in curves.items():
        c = colours[k % len(colours)]
        train = frame[frame.tag == "train/loss"]
        val = frame[frame.tag == "val/loss"]
        ax.plot(train.step, train.value, color=c, alpha=0.45, lw=1)
        if len(val):
            ax.plot(val.step, val.value, "o-", color=c, label=f"fold {k} validation")
            best[k] = best_epoch(val)
            ax.plot([best[k][1]], [best[k][2]], "*", color=c, ms=16, mec="black")
    prior = pd.concat(curves.values()) if curves else pd.DataFrame(columns=["tag", "value"])
    prior = prior[prior.tag == "val/prior_loss"]
    if len(prior):
        ax.axhline(prior.value.mean(), color="grey", ls=":", label="prior-only (mean of folds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weighted log loss")
    ax.set_title("CNN: train loss (thin) and validation loss per epoch; * = best epoch")
    ax.legend(fontsize=8)
    if lstm is not None:
        ax = axes[0, 1]
        mean = lstm.groupby(["fold", "epoch"])[["train_loss", "val_loss"]].mean().reset_index()
        for k, frame in mean.groupby("fold"):
            c = colours[int(k) % len(colours)]
            ax.plot(frame.epoch, frame.train_loss, color=c, alpha=0.45)
            ax.plot(frame.epoch, frame.val_loss, "o-", color=c, ms=3, label=f"fold {k} held-out validation")
        ax.set_xlabel("LSTM epoch")
        ax.set_ylabel("weighted log loss")
        ax.set_title("LSTM (mean over its models, last CNN checkpoint): train (thin), validation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return best


# --- the page -----------------------------------------------------------------------------------

def pointing_game_oof(cfg: Config, meta: pd.DataFrame, ids: np.ndarray, y: np.ndarray, p: np.ndarray,
                      thresholds: dict[str, float], seed: int) -> pd.DataFrame:
    """The pointing game on the OOF slices flagged correctly at ``thresholds``: each with the mean Grad-CAM of its
    own fold's embedded CNNs (the models that never saw it), at most ``report.pointing_slices`` per subtype (a
    seeded sample); one row per (slice, subtype), as ``localisation.pointing_game`` gives them."""
    paths = data_paths(cfg)
    flags = np.stack([(p[:, c] >= thresholds[name]) & (y[:, c] > 0.5) for c, name in enumerate(LABELS)], 1)
    flags[:, ANY_INDEX] = False  # the game is per subtype
    rng = np.random.default_rng(seed)
    for c in range(len(LABELS)):  # the sample: the other correct flags of the column dropped
        rows = np.flatnonzero(flags[:, c])
        flags[rng.permutation(rows)[cfg.report.pointing_slices:], c] = False
    folds = meta.loc[ids, "fold"].to_numpy()
    device = default_device()
    inp = EvalInput.of(cfg.train.image_size, cfg.train.crop_border, cfg.preprocess.mode)  # as stage 3 embeds
    tf, channels, crop = inp.transform, inp.channels, inp.crop
    out = []
    for k in sorted({int(f) for f in folds[flags.any(axis=1)]}):
        ckpts = sorted((run_dir(cfg, k) / "checkpoints").glob("epoch*.pt"))
        ckpts = [c for c in ckpts if not cfg.embed.epochs or epoch_number(c) in cfg.embed.epochs]
        models = [load_checkpoint(c, cfg.model.backbone, channels, cfg.model.kwargs).to(device) for c in ckpts]
        if not models:
            raise InputError(f"{run_dir(cfg, k)}/checkpoints: no checkpoint of embed.epochs={cfg.embed.epochs}")
        fold_rows = meta[meta.fold == k].reset_index()  # the whole fold: 9 channels stack each slice's neighbours
        ds = SliceDataset(fold_rows, paths.pngs(cfg.preprocess), tf, channels=channels)
        position = {i: n for n, i in enumerate(ds.ids)}
        mine = np.flatnonzero(folds == k)

        def cams(rows: list[int], label: int, mine=mine, ds=ds, position=position, models=models) -> np.ndarray:
            images = np.stack([ds.image(position[ids[mine[r]]]) for r in rows])  # each PNG read once
            x = normalize(torch.stack([to_input(img, tf, 0, crop) for img in images]).to(device))
            return mean_grad_cam(models, x, images, cfg.train.crop_border, label)

        out += pointing_game(list(ids[mine]), flags[mine], paths.masks_dir, cams)
    return pd.DataFrame(out, columns=["SOPInstanceUID", "subtype", "hit", "mass_inside", "blood_share"])


def pointing_section(cfg: Config, meta: pd.DataFrame, ids: np.ndarray, y: np.ndarray, p: np.ndarray,
                     thresholds: dict[str, float], out: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """The pointing game's summary (``pointing_game.csv``; None where not measured) and its lines of report.md."""
    n, masks = cfg.report.pointing_slices, data_paths(cfg).masks_dir
    if not n or not masks.is_dir():
        return None, ["Not measured: " + ("`report.pointing_slices=0`." if not n else
                                          f"no bleed masks in {masks} (the synthetic set's answer key has them).")]
    summary = pointing_summary(pointing_game_oof(cfg, meta, ids, y, p, thresholds, cfg.seed))
    with atomic_path(out / "pointing_game.csv") as tmp:
        summary.to_csv(tmp)
    return summary, [f"On the OOF slices flagged correctly at the operating points above (at most {n} per subtype, a "
                     "seeded sample), the mean Grad-CAM of the slice's own fold's CNNs for the subtype's output "
                     "against "
                     "the synthetic answer key's mask of that subtype's blood: the share of heatmap peaks inside the "
                     "blood, and of the heatmap's mass (beside the blood's share of the image: what an even map would "
                     "score).", "", *pointing_lines(summary)]


def _md_table(frame: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    cols = [frame.index.name or "", *frame.columns]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for idx, *row in frame.itertuples():  # itertuples keeps each column's type (iterrows makes ints floats)
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ReportResult:
    """The numbers behind report.md."""

    dir: Path  # runs/<experiment>/report
    figure1: dict[str, dict]  # per column of Figure 1: images, accuracy and the bars' values
    operating_points: dict[str, OperatingPoint]  # per class, at its target recall
    calibration: dict[str, pd.DataFrame]  # per class, the reliability bins
    table: pd.DataFrame  # the per-class table (attrs: weighted_log_loss)
    best_epochs: dict[int, tuple]  # per fold: (best epoch, epochs, its validation loss)
    pointing_game: pd.DataFrame | None  # None where the data root has no bleed masks


def run_report(cfg: Config) -> ReportResult:
    """Write every figure and ``report.md`` into ``runs/<experiment>/report/``; returns the numbers. A bag of seeds
    is reported by its averaged predictions, with its first seed's CNNs (Grad-CAM) and training curves."""
    if cfg.seeds and cfg.seed not in cfg.seeds:
        cfg = seed_configs(cfg)[0]
    if not (blend_dir(cfg) / PREDICTION_FILES["oof"]).exists():
        raise InputError(f"{blend_dir(cfg) / PREDICTION_FILES['oof']}: not found; run `make submission` first")
    with writer_lock(bag_dir(cfg), f"make report of {cfg.experiment}"):
        return _report(cfg, experiment_dir(cfg))


def _report(cfg: Config, exp: Path) -> ReportResult:
    rcfg = cfg.report
    preds_path = blend_dir(cfg) / PREDICTION_FILES["oof"]
    if not preds_path.exists():
        raise InputError(f"{preds_path}: not found; run `make submission` first")
    preds = pd.read_parquet(preds_path)
    if rcfg.model not in set(preds.model):
        raise InputError(f"report.model={rcfg.model!r}: {preds_path} holds {sorted(set(preds.model))}")
    unknown = set(rcfg.target_recall) - set(LABELS)
    if unknown:
        raise InputError(f"report.target_recall: unknown labels {sorted(unknown)}")
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    check_fold_table([run_dir(cfg, int(k)) for k in sorted(meta.fold.dropna().unique())], meta)
    meta = meta.set_index("image_id")
    chosen = preds[preds.model == rcfg.model].set_index("image_id")
    labelled = meta.index[meta.fold.notna()]
    if len(chosen) != len(labelled) or not chosen.index.isin(labelled).all():
        raise InputError(f"{preds_path}: {len(chosen)} OOF rows for the metadata's {len(labelled)} labelled images; "
                         f"run `make submission` again")
    ids = chosen.index.to_numpy()
    y = meta.loc[ids, list(LABELS)].to_numpy(np.float64)
    p = chosen[list(LABELS)].to_numpy(np.float64)
    prior = prior_of(y)
    out = bag_dir(cfg) / "report"
    out.mkdir(parents=True, exist_ok=True)

    fig1 = figure1(y, p, prior, ids, paths.pngs(cfg.preprocess), out / "figure1.png",
                   rcfg.examples_per_class, cfg.seed)
    targets = {name: rcfg.target_recall.get(name, rcfg.default_recall) for name in LABELS}
    points = pr_figure(y, p, targets, out / "pr_curves.png")
    calibration = calibration_figure(y, p, rcfg.calibration_bins, out / "calibration.png")
    pointing, pointing_md = pointing_section(cfg, meta, ids, y, p, {n: op.threshold for n, op in points.items()}, out)
    table = class_table(y, p)

    folds = sorted(int(f.name[4:]) for f in exp.glob("fold*") if (f / "tb").is_dir())
    curves = {k: read_scalars(exp / f"fold{k}" / "tb") for k in folds}
    histories = []
    for k in folds:
        lstm_dirs = finished_dirs(exp / f"fold{k}" / "lstm")
        if lstm_dirs and (lstm_dirs[-1] / "history.csv").exists():
            histories.append(pd.read_csv(lstm_dirs[-1] / "history.csv").assign(fold=k))
    best = training_figure(curves, pd.concat(histories) if histories else None, out / "training_curves.png")

    ops = pd.DataFrame([{"class": n, "target recall": targets[n], "threshold": op.threshold, "recall": op.recall,
                         "precision": op.precision, "specificity": op.specificity, "TP": op.tp, "FN (missed)": op.fn,
                         "FP": op.fp, "TN": op.tn} for n, op in points.items()]).set_index("class")
    missed = "; ".join(f"{n}: {op.fn} of {op.tp + op.fn} slices" for n, op in points.items())
    cv_path = blend_dir(cfg) / "cv.md"
    cv_md = cv_path.read_text().split("\n", 2)[2] if cv_path.exists() else "(no cv.md)\n"
    fig1_rows = pd.DataFrame({c: {"images": v["images"], "accuracy": v["accuracy"]} for c, v in fig1.items()}).T
    fig1_rows.index.name = "column"
    lines = [
        f"# Report: {cfg.experiment}", "",
        f"Model reported: `{rcfg.model}` (out-of-fold predictions of {len(ids):,} slices, "
        f"{len(folds)} folds). Weighted log loss {table.attrs['weighted_log_loss']:.4f}.", "",
        "## Figure 1", "", "![Figure 1](figure1.png)", "",
        "Bars: the probability the model gives to the true answer, left for the column's own class "
        "(Control: `any`), right averaged over the six labels; red at the prior-only baseline, bright green "
        "at 100%. Header: share of the column's OOF images whose own class is right at threshold 0.5.", "",
        _md_table(fig1_rows.astype({"images": int})), "",
        "## Per-class table", "", _md_table(table), "",
        "## Operating point: precision-recall at a target recall", "", "![PR curves](pr_curves.png)", "",
        _md_table(ops), "",
        f"False negatives are the costly error: at these thresholds the model misses {missed}.", "",
        "## Calibration", "", "![Calibration](calibration.png)", "",
        "## Where the CNN looks: the Grad-CAM pointing game", "", *pointing_md, "",
        "## Training curves", "", "![Training curves](training_curves.png)", "",
        "Best CNN epoch per fold (lowest validation loss): "
        + ", ".join(f"fold {k}: epoch {b[0] + 1} ({b[2]:.4f})" for k, b in best.items()) + ".", "",
        "## CV table (stage 5)", "", cv_md,
    ]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return ReportResult(out, fig1, points, calibration, table, best, pointing)
