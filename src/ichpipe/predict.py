"""Run a model bundle on new CT studies: ``python -m ichpipe predict PATH --bundle B --out DIR``.

PATH is a folder (searched recursively) or a zip of DICOM files of one or many studies. Files are
grouped by StudyInstanceUID/SeriesInstanceUID; a series is kept when it is CT, not a localiser or
scout, axial (tilted gantries included) and has at least ``min_slices`` slices; anything else is
skipped with a one-line reason, and unreadable files are listed and skipped. Slices are ordered by
ImagePositionPatient along the slice normal. Each kept series goes through exactly the code of the
pipeline (stage 1's DICOM reading and windowing, the loader's resize/crop, stage 3's TTA, stage 4's
sequence model, stage 5's blend), in memory. Writes, into DIR (all at once: nothing half-written)::

    slices.csv     one row per slice: ids, z, the six probabilities, a 0/1 flag per class at the
                   bundle's operating threshold
    series.csv     one row per series: slices, per class the highest slice probability, a calibrated
                   series-level probability and the number of flagged slices
    skipped.csv    file or series, reason: what was left out and why
    series_<n>.png per series: the flagged slices (or the most suspicious ones) with a Grad-CAM heatmap
                   of the CNN, and the six probabilities along z
    series_<n>.dcm with ``--dicom-sc``: that figure as a DICOM Secondary Capture in the series' study
                   (highdicom), which a PACS viewer opens beside the CT

This is a research tool, not a medical device: its output must not be used for diagnosis.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ichpipe.bundle_format import Bundle, BundlePreprocess, load_bundle
from ichpipe.data import build_transform, input_channels, normalize, stack_neighbours, to_input
from ichpipe.device import amp_settings, default_device
from ichpipe.dicom import DicomError, as_dicom_error, quiet_reads, read_dataset, read_header
from ichpipe.inference import embed_loader
from ichpipe.io import InputError, atomic_dir, name_os_errors
from ichpipe.labels import ANY_INDEX, LABELS, N_LABELS
from ichpipe.metrics import logit, sigmoid
from ichpipe.models import create_model, load_weights
from ichpipe.results import final_blend, weighted_mean
from ichpipe.sequence_models import SliceFeatures, load_models, predict_bag
from ichpipe.submission import write_checked
from ichpipe.windowing import render_file


@dataclass
class Series:
    study: str
    series: str
    patient: str
    files: list[Path] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    z: list[float] = field(default_factory=list)


# A member of a zip larger than this, unpacked, is no CT slice (512 x 512 x 2 bytes is 0.5 MiB; a 2048-px
# multi-frame 8 MiB): it is left out, with a reason, after reading at most this much of it (a zip bomb's
# members claim small sizes, so the limit is enforced on the bytes actually written).
MAX_MEMBER_BYTES = 64 << 20


def _unzip(path: Path, workdir: Path, skipped: list[dict]) -> None:
    """Every member of the zip ``path`` into ``workdir``, one by one, streamed: never outside ``workdir``, never
    more than :data:`MAX_MEMBER_BYTES` of one member (the rest of such a member is not read; it goes to
    ``skipped``)."""
    with zipfile.ZipFile(path) as z:
        for member in z.infolist():
            target = (workdir / member.filename).resolve()
            if member.is_dir() or not target.is_relative_to(workdir.resolve()):
                continue
            what = f"{path}:{member.filename}"
            if member.file_size > MAX_MEMBER_BYTES:
                skipped.append({"what": what, "reason": f"{member.file_size / 2**20:.0f} MiB unpacked, more than "
                                                        f"{MAX_MEMBER_BYTES >> 20} MiB: not a CT slice"})
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with z.open(member) as src, open(target, "wb") as dst, name_os_errors(target):
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > MAX_MEMBER_BYTES:
                            break
                        dst.write(block)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                # a damaged or encrypted member: that member's failure, not the study's
                target.unlink(missing_ok=True)
                skipped.append({"what": what, "reason": f"cannot be unpacked ({type(exc).__name__}: "
                                                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"})
                continue
            if written > MAX_MEMBER_BYTES:
                target.unlink(missing_ok=True)
                skipped.append({"what": what, "reason": f"more than {MAX_MEMBER_BYTES >> 20} MiB unpacked (its header "
                                                        f"says {member.file_size} bytes): not a CT slice"})


def _files(path: Path, workdir: Path, skipped: list[dict]) -> list[Path]:
    if path.is_file() and zipfile.is_zipfile(path):
        _unzip(path, workdir, skipped)
        path = workdir
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: not found (give a folder or a zip of DICOM files)")
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _why_not(ds) -> str | None:
    """Why a file's series is not a head CT axial series the models can read (None: it is)."""
    modality = str(ds.get("Modality", "CT") or "CT")
    if modality != "CT":
        return f"modality {modality}, not CT"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "a localiser/scout image, not an axial slice"
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.array([float(x) for x in iop[:3]]), np.array([float(x) for x in iop[3:]]))
        if abs(normal[2]) < 0.7:  # axial up to ~45 degrees of gantry tilt
            return "not axial (ImageOrientationPatient " + "\\".join(f"{float(x):g}" for x in iop) + ")"
    return None


def find_series(path: str | os.PathLike, workdir: Path, min_slices: int = 1) -> tuple[list[Series], list[dict]]:
    """The usable series under ``path`` in z order, and what was skipped (file or series, reason)."""
    skipped: list[dict] = []
    found: dict[tuple[str, str], Series] = {}
    rejected: dict[tuple[str, str], str] = {}
    for f in _files(Path(path), workdir, skipped):
        try:
            with quiet_reads(), as_dicom_error():
                ds = read_dataset(f)
                row = read_header(f, ds)
                reason = _why_not(ds)
        except DicomError as exc:
            skipped.append({"what": str(f), "reason": str(exc)})
            continue
        key = (row["StudyInstanceUID"], row["SeriesInstanceUID"])
        if reason:
            rejected.setdefault(key, reason)
            continue
        s = found.setdefault(key, Series(row["StudyInstanceUID"], row["SeriesInstanceUID"], row["PatientID"]))
        if row["image_id"] in s.ids:  # the same slice twice (e.g. once compressed, once not): read it once
            skipped.append({"what": str(f), "reason": f"duplicate of SOPInstanceUID {row['image_id']} "
                                                      f"({s.files[s.ids.index(row['image_id'])].name})"})
            continue
        s.files.append(f)
        s.ids.append(row["image_id"])
        s.z.append(row["z"])
    for (study, series), reason in rejected.items():
        found.pop((study, series), None)
        skipped.append({"what": f"series {series} (study {study})", "reason": reason})
    kept = []
    for s in found.values():
        if len(s.files) < min_slices:
            skipped.append({"what": f"series {s.series} (study {s.study})",
                            "reason": f"{len(s.files)} slice(s), fewer than min_slices={min_slices}"})
            continue
        order = np.argsort(np.asarray(s.z), kind="stable")
        s.files, s.ids, s.z = [s.files[i] for i in order], [s.ids[i] for i in order], [s.z[i] for i in order]
        kept.append(s)
    return sorted(kept, key=lambda s: (s.study, s.series)), skipped


def render_series(s: Series, p: BundlePreprocess) -> tuple[np.ndarray, list[int]]:
    """Stage 1's images of a series, in memory: (N, H, W, 3) uint8, exactly what its PNGs hold; and the
    positions of slices that could not be read (left out)."""
    windows = p.windows[:1] if p.mode == "2.5d" else p.windows
    images, bad = [], []
    for i, f in enumerate(s.files):
        try:
            _, img = render_file(f, windows, p.size)
        except DicomError:
            bad.append(i)
            continue
        images.append(img)
    if p.mode == "2.5d":  # the brain window of slices s-1, s, s+1, as stage 1 stacks them
        brain = [img[..., 0] for img in images]
        images = [np.dstack([brain[max(k - 1, 0)], brain[k], brain[min(k + 1, len(brain) - 1)]])
                  for k in range(len(brain))]
    return (np.stack(images) if images else np.zeros((0, p.size, p.size, 3), np.uint8)), bad


class Predictor:
    """The bundle's models, loaded once; ``probabilities(images)`` → per-slice probabilities of one series."""

    def __init__(self, bundle: Bundle, device: torch.device | None = None):
        self.bundle, self.info = bundle, bundle.info
        self.device = device or default_device()
        inp = self.info.input
        self.transform = build_transform([], inp.image_size, train=False)
        self.crop = 0.0 if inp.crop_border else None
        self.channels = input_channels(self.info.preprocess.mode)
        # as stage 3 ran: its memory layout, and embeddings rounded to the dtype it stored (bundles made before
        # embed.dtype existed stored float32)
        config = self.info.config
        self.channels_last = bool(config["train"].get("channels_last", False))
        self.emb_dtype = np.dtype(config["embed"].get("dtype", "float32"))
        self.cnn = {}
        for k in self.info.folds:
            for e in self.info.epochs[k]:
                model = create_model(self.info.backbone, pretrained=False, in_chans=self.channels,
                                     kwargs=config["model"].get("kwargs", {}))
                state = torch.load(bundle.cnn_path(k, e), map_location="cpu", weights_only=True)
                load_weights(model, {n: t.float() if t.is_floating_point() else t for n, t in state.items()},
                             bundle.cnn_path(k, e), self.info.backbone)
                self.cnn[k, e] = model.to(self.device).eval()
                if self.channels_last:
                    self.cnn[k, e] = self.cnn[k, e].to(memory_format=torch.channels_last)
        self.lstm = {key: load_models(bundle.lstm_path(*key), self.device) for key in self.cnn} \
            if self.info.lstm else {}

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """The network input of one series' slices (z order): with 9 channels, each slice with its neighbours."""
        if self.channels == 9:
            images = stack_neighbours(images)
        return torch.stack([to_input(img, self.transform, 0, self.crop) for img in images])

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
                out = {"emb": np.zeros((len(x), dim), self.emb_dtype), "logits": np.zeros((len(x), N_LABELS), np.float32)}
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

    def grad_cam(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) Grad-CAM of the `any` output of the first fold's last CNN, scaled to [0, 1] per image."""
        k = self.info.folds[0]
        model = self.cnn[k, self.info.epochs[k][-1]]
        x = normalize(self.inputs(images).to(self.device))
        with torch.enable_grad():
            features = model.forward_features(x).detach().requires_grad_(True)
            score = model.forward_head(features)[:, ANY_INDEX].sum()
            (grads,) = torch.autograd.grad(score, features)
        cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
        top = cam.flatten(1).max(dim=1).values.clamp(min=1e-8)[:, None, None]
        return (cam / top).detach().cpu().numpy()


def _series_figure(path: Path, s: Series, images: np.ndarray, probs: np.ndarray, flags: np.ndarray,
                   predictor: Predictor, thresholds: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left as it is

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
    fig.suptitle(f"{title} with Grad-CAM of the CNN; probabilities along the series (dotted: thresholds)\n"
                 f"study ...{s.study[-16:]}, series ...{s.series[-16:]} ({len(images)} slices) - research tool, "
                 "not for diagnosis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_secondary_capture(figure: Path, ref: Path, out: Path, series_number: int) -> None:
    """The series figure as a DICOM Secondary Capture in the original study (highdicom), for a PACS viewer."""
    import cv2
    import highdicom as hd

    from ichpipe.dicom import read_dataset

    img = cv2.cvtColor(cv2.imread(str(figure)), cv2.COLOR_BGR2RGB)
    with warnings.catch_warnings():  # highdicom's remarks on the source study's own names are not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=read_dataset(ref), pixel_array=img, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=hd.UID(),
            series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ichpipe")
    sc.SeriesDescription = "ichpipe ICH probabilities - research only, not for diagnosis"  # LO: <= 64 chars
    sc.save_as(out)


def predict(path: str | os.PathLike, bundle_path: str | os.PathLike | Bundle, out: str | os.PathLike,
            min_slices: int = 1, figures: bool = True, progress: bool = True, device: torch.device | None = None,
            dicom_sc: bool = False) -> dict:
    """Predict every usable series under ``path`` with the bundle; write the outputs into ``out`` at once.

    ``dicom_sc``: also each series' figure as a DICOM Secondary Capture (``series_<n>.dcm``) in its study.
    """
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give --out a folder (it is replaced as a whole)")
    with contextlib.ExitStack() as stack:
        bundle = bundle_path if isinstance(bundle_path, Bundle) else stack.enter_context(load_bundle(bundle_path))
        return _predict(path, bundle, out, min_slices, figures, progress, device, dicom_sc, start)


def _predict(path, bundle: Bundle, out: Path, min_slices: int, figures: bool, progress: bool,
             device: torch.device | None, dicom_sc: bool, start: float) -> dict:
    info = bundle.info
    with tempfile.TemporaryDirectory(prefix="ichpipe_predict_") as work:
        series, skipped = find_series(path, Path(work), min_slices)
        if not series:
            reasons = "; ".join(f"{s['what']}: {s['reason']}" for s in skipped[:3]) or "no files"
            raise InputError(f"{path}: no usable CT series ({reasons})")
        predictor = Predictor(bundle, device)
        with atomic_dir(out) as tmp:
            slice_rows, series_rows = [], []
            for n, s in enumerate(tqdm(series, desc="predict", unit="series", disable=not progress)):
                images, bad = render_series(s, info.preprocess)
                for i in bad:
                    skipped.append({"what": str(s.files[i]), "reason": "pixel data unreadable"})
                keep = [i for i in range(len(s.files)) if i not in set(bad)]
                s.files, s.ids, s.z = [s.files[i] for i in keep], [s.ids[i] for i in keep], [s.z[i] for i in keep]
                if not len(images):
                    skipped.append({"what": f"series {s.series}", "reason": "no readable slice"})
                    continue
                probs = predictor.probabilities(images, s.ids, np.asarray(s.z, np.float64))
                thresholds = info.thresholds
                flags = np.stack([probs[:, c] >= thresholds[name].threshold for c, name in enumerate(LABELS)], 1)
                for i in range(len(s.ids)):
                    slice_rows.append({"SOPInstanceUID": s.ids[i], "StudyInstanceUID": s.study,
                                       "SeriesInstanceUID": s.series, "PatientID": s.patient, "slice": i, "z": s.z[i],
                                       **{name: float(probs[i, c]) for c, name in enumerate(LABELS)},
                                       **{f"flag_{name}": int(flags[i, c]) for c, name in enumerate(LABELS)}})
                row = {"StudyInstanceUID": s.study, "SeriesInstanceUID": s.series, "PatientID": s.patient,
                       "slices": len(s.ids), "figure": f"series_{n}.png" if figures else ""}
                for c, name in enumerate(LABELS):
                    cal = info.series_calibration[name]
                    top = float(probs[:, c].max())
                    row[f"max_{name}"] = top
                    row[f"series_{name}"] = float(sigmoid(cal.slope * logit(np.clip(top, 1e-6, 1 - 1e-6))
                                                          + cal.intercept))
                    row[f"flagged_{name}"] = int(flags[:, c].sum())
                series_rows.append(row)
                if figures or dicom_sc:
                    _series_figure(tmp / f"series_{n}.png", s, images, probs, flags, predictor, thresholds)
                if dicom_sc:
                    write_secondary_capture(tmp / f"series_{n}.png", s.files[0], tmp / f"series_{n}.dcm", 900 + n)
            pd.DataFrame(slice_rows).to_csv(tmp / "slices.csv", index=False)
            pd.DataFrame(series_rows).to_csv(tmp / "series.csv", index=False)
            pd.DataFrame(skipped, columns=["what", "reason"]).to_csv(tmp / "skipped.csv", index=False)
    return {"series": len(series_rows), "slices": len(slice_rows), "skipped": skipped, "out": str(out),
            "seconds": time.perf_counter() - start}


def predict_kaggle(data_dir: str | os.PathLike, bundle_path: str | os.PathLike, out_file: str | os.PathLike,
                   max_missing: float = 0.01, progress: bool = True) -> dict:
    """A submission for the competition's test set (``stage_2_test/``) from the bundle alone, validated."""
    from ichpipe.io import read_long_csv
    from ichpipe.paths import DataPaths

    paths = DataPaths(data_dir)
    if not paths.sample_submission_csv.exists():
        raise InputError(f"{paths.sample_submission_csv}: not found; it lists the test images to predict")
    with load_bundle(bundle_path) as bundle, tempfile.TemporaryDirectory(prefix="ichpipe_kaggle_") as tmp:
        result = predict(paths.test_dir, bundle, Path(tmp) / "out", figures=False, progress=progress)
        slices = pd.read_csv(Path(tmp) / "out" / "slices.csv").set_index("SOPInstanceUID")[list(LABELS)]
        prior = bundle.info.prior
    sample_ids = pd.Index(read_long_csv(paths.sample_submission_csv).image_id.unique(), name="image_id")
    pred = slices.reindex(sample_ids)
    missing = ~sample_ids.isin(slices.index)
    if missing.sum() > max_missing * len(sample_ids):
        raise InputError(f"{paths.test_dir}: {int(missing.sum())} of {len(sample_ids)} test images have no "
                         f"prediction, more than {max_missing}; see the skipped files")
    pred.loc[missing] = prior
    out_file = Path(out_file)
    write_checked(pred, out_file, paths.sample_submission_csv, {"bundle": str(bundle_path), "filled": int(missing.sum()),
                                                                   "model": "bundle"})
    return {**result, "file": str(out_file), "filled": int(missing.sum())}
