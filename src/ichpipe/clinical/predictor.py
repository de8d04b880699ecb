"""A model bundle's networks, loaded once, run on one series at a time exactly as the pipeline ran them (stage
3's TTA views and storage dtype, stage 4's sequence models, stage 5's blend), with a Grad-CAM of the CNNs; and
one series' results as ``predict`` (and ``evaluate``) report them: per-slice rows, the series' row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ichpipe.base.device import amp_settings, default_device
from ichpipe.base.labels import ANY_INDEX, LABELS, N_LABELS
from ichpipe.clinical.findings import NOT_ASSESSABLE, series_findings
from ichpipe.clinical.studies import Series, render_series
from ichpipe.networks.bundle_format import Bundle
from ichpipe.networks.dataset import EvalInput, normalize, stack_neighbours, to_input
from ichpipe.networks.inference import embed_loader
from ichpipe.networks.models import load_checkpoint
from ichpipe.networks.sequence_models import SliceFeatures, load_models, predict_bag
from ichpipe.scoring.localisation import mean_grad_cam
from ichpipe.scoring.metrics import sigmoid
from ichpipe.scoring.results import final_blend, weighted_mean


class Predictor:
    """The bundle's models, loaded once; ``probabilities(images)`` → per-slice probabilities of one series."""

    def __init__(self, bundle: Bundle, device: torch.device | None = None):
        self.bundle, self.info = bundle, bundle.info
        self.device = device or default_device()
        inp = self.info.input
        eval_input = EvalInput.of(inp.image_size, inp.crop_border, self.info.preprocess.mode)
        self.transform, self.crop, self.channels = eval_input.transform, eval_input.crop, eval_input.channels
        # as stage 3 ran: its memory layout, and embeddings rounded to the dtype it stored (bundles made before
        # embed.dtype existed stored float32)
        config = self.info.config
        self.channels_last = bool(config["train"].get("channels_last", False))
        self.emb_dtype = np.dtype(config["embed"].get("dtype", "float32"))
        self.cnn = {}
        for k in self.info.folds:
            for e in self.info.epochs[k]:
                model = load_checkpoint(bundle.cnn_path(k, e), self.info.backbone, self.channels,
                                        config["model"].get("kwargs", {}))
                self.cnn[k, e] = model.to(self.device)
                if self.channels_last:
                    self.cnn[k, e] = self.cnn[k, e].to(memory_format=torch.channels_last)
        self.lstm = {key: load_models(bundle.lstm_path(*key), self.device) for key in self.cnn} \
            if self.info.lstm else {}

    def stacked(self, images: np.ndarray) -> np.ndarray:
        """One series' slices (z order) as the network's channels: with 9 channels, each slice with its neighbours."""
        return stack_neighbours(images) if self.channels == 9 else images

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """The network input of one series' slices (z order)."""
        return torch.stack([to_input(img, self.transform, 0, self.crop) for img in self.stacked(images)])

    def probabilities(self, images: np.ndarray, ids: list[str], z: np.ndarray | None = None) -> np.ndarray:
        """(N, 6) final probabilities of one series' slices (z order; ``z`` their positions in mm, which the
        transformer sequence model reads), blended as stage 5 blends the test set."""
        x = self.inputs(images)
        batch = self.info.input.batch_size
        batches = [(x[i:i + batch], None, None) for i in range(0, len(x), batch)]
        b = self.info.blend
        amp = amp_settings(self.info.config["train"]["amp"], self.device)  # as stage 3 ran
        index = pd.Index(ids, name="image_id")

        def frame(probs: np.ndarray) -> pd.DataFrame:
            return pd.DataFrame(probs, index=index, columns=list(LABELS))

        fold_cnn, fold_lstm = [], []
        for k in self.info.folds:
            cnn, lstm, weights = [], [], []
            for e in self.info.epochs[k]:
                dim = getattr(self.cnn[k, e], "head_hidden_size", None) or self.cnn[k, e].num_features
                out = {"emb": np.zeros((len(x), dim), self.emb_dtype), "logits": np.zeros((len(x), N_LABELS),
                                                                                          np.float32)}
                embed_loader(self.cnn[k, e], batches, self.info.input.tta, self.device, amp, False, "", out,
                             self.channels_last)
                cnn.append(frame(sigmoid(out["logits"])))
                weights.append(b.epoch_weights.get(e, 1.0))
                if self.lstm:
                    models, mean, std = self.lstm[k, e]
                    feats = SliceFeatures(np.asarray(ids), out["emb"], out["logits"], None,
                                          np.zeros(len(x), dtype=object), [np.arange(len(x))], z)
                    lstm.append(frame(predict_bag(models, feats, mean, std, self.device, amp)))
            fold_cnn.append(weighted_mean(cnn, weights))  # epochs, then folds: as stage 5 averages the test set
            if lstm:
                fold_lstm.append(weighted_mean(lstm, weights))
        fw = [b.fold_weights.get(k, 1.0) for k in self.info.folds]
        final = final_blend(weighted_mean(fold_cnn, fw), weighted_mean(fold_lstm, fw) if fold_lstm else None,
                            b.lstm_weight)
        return final.clip(b.clip, 1 - b.clip).to_numpy()

    def grad_cam(self, images: np.ndarray, label: int = ANY_INDEX) -> np.ndarray:
        """(N, H, W) Grad-CAM of output ``label`` (default `any`) over the pixels of ``images`` (through the head
        crop, when the bundle crops): the mean of every CNN of the bundle's maps, each scaled to a peak of 1, and
        the mean scaled to [0, 1] per image."""
        x = normalize(self.inputs(images).to(self.device))
        return mean_grad_cam(list(self.cnn.values()), x, self.stacked(images), self.crop is not None, label)


@dataclass
class SeriesResult:
    """One series through the bundle: its images (z order, unreadable slices dropped), (N, 6) probabilities, the
    0/1 flags at the bundle's thresholds, its rows of ``slices.csv`` and its row of ``series.csv``. A series that is
    not assessable (not a head CT: ``row["not_assessable"]`` says why) has no probabilities, flags or slice rows."""

    images: np.ndarray
    probs: np.ndarray | None
    flags: np.ndarray | None
    slices: list[dict]
    row: dict

    @property
    def assessable(self) -> bool:
        return self.probs is not None


def read_series(predictor: Predictor, s: Series, skipped: list[dict]) -> np.ndarray | None:
    """``s``'s images (z order) as the bundle's stage 1 made them; its unreadable slices dropped from ``s`` and added
    to ``skipped`` (None when none is readable)."""
    images, bad = render_series(s, predictor.info.preprocess)
    for i, reason in bad.items():
        skipped.append({"what": str(s.files[i]), "reason": reason})
    keep = [i for i in range(len(s.files)) if i not in bad]
    s.files, s.ids, s.z = [s.files[i] for i in keep], [s.ids[i] for i in keep], [s.z[i] for i in keep]
    if not len(images):
        skipped.append({"what": f"series {s.series}", "reason": "no readable slice"})
        return None
    return images


def run_series(predictor: Predictor, s: Series, skipped: list[dict]) -> SeriesResult | None:
    """``s`` through the bundle (its unreadable slices dropped from ``s`` and added to ``skipped``; None when none is
    readable); a series that is not a head CT is not run: its result says why."""
    images = read_series(predictor, s, skipped)
    if images is None:
        return None
    reason = s.why_not_assessable()
    if reason:
        return SeriesResult(images, None, None, [], _series_row(s, reason))
    return series_result(predictor, s, images, predictor.probabilities(images, s.ids, np.asarray(s.z, np.float64)))


def _series_row(s: Series, reason: str = "") -> dict:
    """A series' row of ``series.csv`` before its per-class columns; a not assessable one's are empty."""
    _, at, count = np.unique(np.asarray(s.z, np.float64), return_inverse=True, return_counts=True)
    row = {"StudyInstanceUID": s.study, "SeriesInstanceUID": s.series, "PatientID": s.patient,
           "slices": len(s.ids), "same_position_slices": int((count[at] > 1).sum()), "figure": "",
           "assessable": int(not reason), "not_assessable": reason}
    if reason:
        for name in LABELS:
            row.update({f"max_{name}": float("nan"), f"series_{name}": float("nan"), f"flagged_{name}": 0,
                        f"finding_{name}": NOT_ASSESSABLE})
    return row


def series_result(predictor: Predictor, s: Series, images: np.ndarray, probs: np.ndarray) -> SeriesResult:
    """One series' result from its images and (N, 6) probabilities: the flags at the bundle's thresholds, its rows.

    ``series_<class>`` is the calibrated probability that the series shows the class (Platt scaling of its highest
    slice probability), a subtype's capped at `any`'s; ``finding_<class>`` the finding reported
    (ichpipe.clinical.findings)."""
    info = predictor.info
    thresholds = info.thresholds
    flags = np.stack([probs[:, c] >= thresholds[name].threshold for c, name in enumerate(LABELS)], 1)
    slices = [{"SOPInstanceUID": s.ids[i], "StudyInstanceUID": s.study, "SeriesInstanceUID": s.series,
               "PatientID": s.patient, "slice": i, "z": s.z[i],
               **{name: float(probs[i, c]) for c, name in enumerate(LABELS)},
               **{f"flag_{name}": int(flags[i, c]) for c, name in enumerate(LABELS)}} for i in range(len(s.ids))]
    row = _series_row(s)
    for c, name in enumerate(LABELS):
        top = float(probs[:, c].max())
        row[f"max_{name}"] = top
        row[f"series_{name}"] = info.series_calibration[name].apply(top)
        row[f"flagged_{name}"] = int(flags[:, c].sum())
    for name in LABELS:  # a series cannot be likelier to show a subtype than to show any bleed
        row[f"series_{name}"] = min(row[f"series_{name}"], row["series_any"])
    for name, f in series_findings(row, thresholds).items():
        row[f"finding_{name}"] = f.state
    return SeriesResult(images, probs, flags, slices, row)
