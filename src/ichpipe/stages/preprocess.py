"""Stage 1: every DICOM → a 3-window PNG, plus one metadata table with labels and patient folds.

Outputs, under ``<data root>/processed/``::

    <name>/ID_<hex>.png          RGB = brain, subdural, bone windows (or, in 2.5D mode, the brain
                                 window of slices s-1, s, s+1 in z order); <name> = "<size>" by default
    <name>/bad_files.csv         file, reason: every input left out, and why
    <name>/same_position.csv     SeriesInstanceUID, z, image_id: slices of one series at the same position (kept,
                                 each with its labels; listed and counted, as they may be a duplicate or two
                                 series under one UID)
    <name>/preprocess_config.yaml the resolved config of the run
    <name>/parts/chunk<S>/chunk_<k>_<files hash>.parquet  per-chunk metadata and each input's size and
                                 modification time, written as chunks finish
    metadata.parquet             one row per usable image: ids, z, slice index, series length,
                                 size, window tags, quirk flags, the six labels (train), fold (train);
                                 written last, only when the stage succeeds

One fold table serves every preprocess output and every run: each run records the table's hash
(``runs/<experiment>/fold<k>/folds.json``), later stages refuse a run whose folds differ from the
table, and this stage refuses to change the folds of a table that runs were trained on unless
``preprocess.replace_folds=true``.

Work is split into fixed chunks of the sorted input list. Each finished chunk writes its part file
atomically, named by a hash of its files; each PNG is written to a temporary name and renamed. A
killed run therefore leaves no half-written file, and a rerun goes by the files: it does the chunks
whose inputs changed (files added later give other chunks) or whose PNGs are missing or truncated,
and skips every PNG that is there and whole and was made from the input as it is now (its size and
modification time as recorded: a DICOM replaced under the same name is rendered again). ``shard=(i, n)`` runs only
chunks ``k`` with ``k % n == i``, for cluster array jobs; the table is assembled by whichever run
finds every chunk done.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from ichpipe.base.config import Config, PreprocessConfig, save_config
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, file_stamp, sweep_temp_files, write_bytes_atomic
from ichpipe.base.label_csv import read_labels
from ichpipe.base.labels import LABELS
from ichpipe.base.parallel import n_workers, run_pool
from ichpipe.base.paths import DataPaths, data_paths, neighbour_positions, png_path
from ichpipe.imaging.dicom import DicomError, read_header
from ichpipe.imaging.png import read_png
from ichpipe.imaging.windowing import render_file
from ichpipe.scoring.folds import assign_folds, fold_table_id, runs_on_fold_table

SPLITS = ("train", "test")
META_COLUMNS = ["image_id", "split", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "z", "slice_index",
                "series_length", "rows", "cols", "pixel_spacing", "window_center", "window_width",
                "multivalue_window", "fixed_12bit"]


class PreprocessError(InputError):
    """The stage cannot finish (too many bad files, inconsistent outputs); one line."""


def png_settings(cfg: PreprocessConfig) -> tuple[int, str, str]:
    return cfg.png_level, cfg.png_filter, cfg.png_strategy


PNG_FILTERS = {"none": cv2.IMWRITE_PNG_FILTER_NONE, "sub": cv2.IMWRITE_PNG_FILTER_SUB,
               "up": cv2.IMWRITE_PNG_FILTER_UP, "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
               "adaptive": cv2.IMWRITE_PNG_ALL_FILTERS}
PNG_STRATEGIES = {"default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT, "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
                  "rle": cv2.IMWRITE_PNG_STRATEGY_RLE}


def encode_png(img: np.ndarray, level: int = 1, png_filter: str = "none", strategy: str = "filtered") -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) RGB uint8 image.

    The defaults come from ``make bench-preprocess``: on noisy CT windows, libpng's per-row filters
    cost more time than they save bytes, so no filter at zlib level 1 is both faster and smaller.
    """
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img  # OpenCV writes BGR
    params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, PNG_FILTERS[png_filter],
              cv2.IMWRITE_PNG_STRATEGY, PNG_STRATEGIES[strategy]]
    ok, buf = cv2.imencode(".png", bgr, params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


@dataclass
class ChunkJob:
    index: int
    files: list[tuple[str, str]]  # (split, path)
    out_dir: str  # where this pass writes its PNGs
    part_path: str
    windows: list[list[float]]
    size: int
    png: tuple[int, str, str]  # zlib level, filter, strategy
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # (size, mtime_ns) as an earlier run recorded


def png_current(png: Path, dicom: Path, stamp: tuple[int, int], recorded: tuple[int, int] | None) -> bool:
    """Whether the whole PNG ``png`` was made from ``dicom`` as it is now: its stamp equals the one recorded when
    the PNG was made, or (none recorded: a run killed before its chunk finished) the PNG is newer than the DICOM."""
    if not png_ok(png):
        return False
    return recorded == stamp if recorded is not None else png.stat().st_mtime_ns >= stamp[1]


def process_chunk(job: ChunkJob) -> tuple[int, int, int]:
    """Process one chunk; write its part file last. Returns (files, bad, skipped)."""
    rows, bad, skipped = [], 0, 0
    out_dir = Path(job.out_dir)
    for split, path in job.files:
        path = Path(path)
        out = png_path(out_dir, path.stem)
        stamp = file_stamp(path)
        try:
            img = None
            if png_current(out, path, stamp, job.stamps.get(str(path))):  # made from this file: header only
                meta = read_header(path)
                skipped += 1
            else:
                meta, img = render_file(path, job.windows, job.size)
            if meta["image_id"] != path.stem:  # checked before writing: a bad file leaves no PNG
                raise DicomError(f"SOPInstanceUID {meta['image_id']} differs from the file name")
            if img is not None:
                write_bytes_atomic(out, encode_png(img[..., 0] if img.shape[-1] == 1 else img, *job.png))
            rows.append({**meta, "split": split, "file": str(path), "error": ""})
        except DicomError as exc:
            bad += 1
            rows.append({"image_id": path.stem, "split": split, "file": str(path), "error": str(exc)})
        rows[-1].update(size=stamp[0], mtime_ns=stamp[1])
    with atomic_path(job.part_path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    return len(job.files), bad, skipped


def list_inputs(paths: DataPaths) -> list[tuple[str, str]]:
    """Every (split, path) of the competition layout, sorted (chunks depend on this order)."""
    files = []
    for split, folder in zip(SPLITS, (paths.train_dir, paths.test_dir), strict=True):
        if folder.exists():
            files += [(split, str(p)) for p in sorted(folder.glob("*.dcm"))]
    if not files:
        raise PreprocessError(f"{paths.root}: no stage_2_train/*.dcm or stage_2_test/*.dcm files "
                              f"(run `make synthetic` or set DATA_DIR to the Kaggle data)")
    return files


def _check_previous_run(out_dir: Path, cfg: PreprocessConfig) -> None:
    saved = out_dir / "preprocess_config.yaml"
    if not saved.exists():
        return
    prev = yaml.safe_load(saved.read_text()).get("preprocess", {})
    for key in ("size", "windows", "mode"):
        if prev.get(key) != getattr(cfg, key):
            raise PreprocessError(f"{out_dir}: written with preprocess.{key}={prev.get(key)}, now {getattr(cfg, key)}; "
                                  f"set preprocess.name=<new folder> or delete {out_dir}")


@dataclass
class PreprocessSummary:
    """What a run of stage 1 did. ``complete``: every chunk is done and the metadata table written (a shard that
    leaves chunks to others is not; ``pending_chunks`` says how many)."""

    files: int  # inputs found
    processed: int  # rendered by this run
    skipped: int  # whole, current PNGs kept
    seconds: float
    out_dir: Path
    labels_without_dicom: int
    complete: bool = False
    pending_chunks: int = 0
    images: int = 0  # rows of the metadata table
    bad: int = 0  # inputs left out (bad_files.csv)
    same_position: int = 0  # slices sharing their series' position with another (same_position.csv)
    metadata: Path | None = None


def run_preprocess(cfg: Config, shard: tuple[int, int] = (0, 1), progress: bool = True) -> PreprocessSummary:
    """Run (or resume) the stage. See the module docstring for the outputs."""
    pcfg = cfg.preprocess
    paths = data_paths(cfg)
    files = list_inputs(paths)  # inputs and labels first: a wrong DATA_DIR creates nothing
    labels = _read_labels_first(paths, files)
    without_dicom = _labels_without_dicom(paths, files, labels, pcfg.max_bad_fraction)
    out_dir = paths.pngs(pcfg)
    _check_previous_run(out_dir, pcfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "preprocess_config.yaml")
    # In 2.5D mode the first pass writes single brain-window slices; the second stacks neighbours.
    pass_dir = out_dir / "brain" if pcfg.mode == "2.5d" else out_dir
    pass_dir.mkdir(parents=True, exist_ok=True)
    windows = pcfg.windows[:1] if pcfg.mode == "2.5d" else pcfg.windows
    # Resume is by file: a part is named by the files of its chunk, so files that arrive later (the test
    # set unzipped after a first run) give new parts, and a finished part whose PNGs are missing or
    # truncated is redone. Finished PNGs are skipped either way, at the cost of a header read each.
    parts_dir = out_dir / "parts" / f"chunk{pcfg.chunk_size}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    chunks = [files[i:i + pcfg.chunk_size] for i in range(0, len(files), pcfg.chunk_size)]
    parts = [parts_dir / f"chunk_{k:06d}_{_digest(chunk)}.parquet" for k, chunk in enumerate(chunks)]
    n_chunks = len(chunks)
    todo = [k for k in range(shard[0], n_chunks, shard[1]) if not _part_complete(parts[k], pass_dir)]
    stamps = _recorded_stamps(parts_dir) if todo else {}
    jobs = [ChunkJob(k, chunks[k], str(pass_dir), str(parts[k]), windows, pcfg.size, png_settings(pcfg),
                     {f: stamps[f] for _, f in chunks[k] if f in stamps}) for k in todo]
    workers = n_workers(cfg.data.workers)
    start = time.perf_counter()
    results = run_pool(process_chunk, jobs, workers, total=sum(len(j.files) for j in jobs), size=lambda r: r[0],
                       desc="preprocess", progress=progress)
    processed = sum(r[0] - r[2] for r in results)
    summary = PreprocessSummary(files=len(files), processed=processed, skipped=len(files) - processed,
                                seconds=time.perf_counter() - start, out_dir=out_dir,
                                labels_without_dicom=without_dicom)
    done = sum(p.exists() for p in parts)
    if done < n_chunks:
        summary.pending_chunks = n_chunks - done
        return summary
    sweep_temp_files(pass_dir)  # every chunk is done: no writer left, so stray temp files are a kill's
    meta, bad, same_position = _merge(cfg, paths, out_dir, parts, labels)
    # The table is written last, only when the stage succeeds: a failed run leaves the previous table (or none).
    if len(bad) > pcfg.max_bad_fraction * len(files):
        raise PreprocessError(f"{len(bad)} of {len(files)} files are unusable, more than preprocess.max_bad_fraction="
                              f"{pcfg.max_bad_fraction}; see {out_dir / 'bad_files.csv'}")
    _check_fold_change(paths, meta, pcfg)
    if pcfg.mode == "2.5d":
        _stack_neighbours(meta, pass_dir, out_dir, pcfg, workers, progress)
    with atomic_path(paths.metadata) as tmp:
        meta.to_parquet(tmp, index=False)
    summary.complete, summary.images, summary.bad = True, len(meta), len(bad)
    summary.same_position, summary.metadata = same_position, paths.metadata
    return summary


def _check_fold_change(paths: DataPaths, meta: pd.DataFrame, pcfg: PreprocessConfig) -> None:
    """Refuse to replace a fold table that finished runs were trained on (their OOF rows would leak)."""
    if not paths.metadata.exists() or pcfg.replace_folds:
        return
    old = pd.read_parquet(paths.metadata, columns=["PatientID", "fold"])
    old_id, new_id = fold_table_id(old), fold_table_id(meta)
    if old_id == new_id:
        return
    runs = runs_on_fold_table(paths.work, old_id)
    if runs:
        raise PreprocessError(f"{paths.metadata}: these settings (preprocess.n_folds={pcfg.n_folds}, fold_seed="
                              f"{pcfg.fold_seed}) give fold table {new_id}, but {len(runs)} run folder(s) were trained "
                              f"on the current table {old_id}, e.g. {runs[0]}; keep the former n_folds/fold_seed, "
                              f"or add preprocess.replace_folds=true (those runs then stop working)")


def _digest(chunk: list[tuple[str, str]]) -> str:
    return hashlib.sha1("\n".join(f"{split}\t{path}" for split, path in chunk).encode()).hexdigest()[:10]


PNG_END = b"IEND\xaeB`\x82"  # the last 8 bytes of every complete PNG


def png_ok(path: Path) -> bool:
    """A PNG that exists and was written to the end (cheap: a stat and its last 8 bytes, no decode)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:  # missing, or shorter than 8 bytes
        return False


def _part_complete(part: Path, pass_dir: Path) -> bool:
    """A finished chunk: its part file exists, every input is as it was then (size and modification time: a file
    replaced since is redone), and every good file's PNG is there and whole."""
    if not part.exists():
        return False
    rows = pd.read_parquet(part)
    if "mtime_ns" not in rows.columns:  # written before inputs were stamped: checked file by file
        return False
    for file, size, mtime in zip(rows.file, rows["size"], rows.mtime_ns, strict=True):
        try:
            if file_stamp(file) != (size, mtime):
                return False
        except OSError:  # removed since
            return False
    return all(png_ok(png_path(pass_dir, i)) for i in rows.image_id[rows.error == ""])


def _recorded_stamps(parts_dir: Path) -> dict[str, tuple[int, int]]:
    """Each input's (size, mtime_ns) as the part files of earlier runs recorded it (the newest part wins)."""
    stamps: dict[str, tuple[int, int]] = {}
    for part in sorted(parts_dir.glob("chunk_*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        rows = pd.read_parquet(part)
        if "mtime_ns" in rows.columns:
            stamps.update({f: (int(s), int(m)) for f, s, m in zip(rows.file, rows["size"], rows.mtime_ns, strict=True)})
    return stamps


def _read_labels_first(paths: DataPaths, files: list[tuple[str, str]]) -> pd.DataFrame:
    """The training labels, read and checked before the DICOM pass (not 'N files unusable' after it)."""
    if any(split == "train" for split, _ in files):
        if not paths.train_csv.exists():
            raise PreprocessError(f"{paths.train_csv}: not found; the training DICOMs need their labels")
        return read_labels(paths.train_csv)
    return pd.DataFrame(columns=list(LABELS), dtype=float)


def _labels_without_dicom(paths: DataPaths, files: list[tuple[str, str]], labels: pd.DataFrame,
                          max_fraction: float) -> int:
    """How many labelled images have no file in ``stage_2_train/`` (a partial download or unzip); above
    ``max_fraction`` of the labelled images an error, before any work."""
    have = {Path(f).stem for split, f in files if split == "train"}
    missing = labels.index[~labels.index.isin(have)] if have else labels.index[:0]
    if len(missing) > max_fraction * len(labels):
        raise PreprocessError(f"{paths.train_csv}: {len(missing)} of {len(labels)} labelled images have no DICOM in "
                              f"{paths.train_dir} (e.g. {', '.join(missing[:3])}), more than "
                              f"preprocess.max_bad_fraction={max_fraction}; is the download or unzip complete?")
    return len(missing)


def _merge(cfg: Config, paths: DataPaths, out_dir: Path, part_files: list[Path], labels: pd.DataFrame):
    """Assemble the metadata table from the parts (z order, labels, folds); write the bad-files report."""
    parts = pd.concat([pd.read_parquet(p) for p in part_files], ignore_index=True)
    bad = parts[parts.error != ""][["file", "error"]].rename(columns={"error": "reason"})
    meta = parts[parts.error == ""].drop(columns=["error", "file"])
    is_train = meta.split == "train"
    unlabelled = is_train & ~meta.image_id.isin(labels.index)
    if unlabelled.any():
        files = str(paths.train_dir) + "/" + meta.loc[unlabelled, "image_id"] + ".dcm"
        bad = pd.concat([bad, pd.DataFrame({"file": files, "reason": f"no labels in {paths.train_csv.name}"})])
        meta = meta[~unlabelled]
    dup = meta.image_id.duplicated(keep=False)
    if dup.any():
        raise PreprocessError(f"{paths.root}: SOPInstanceUID used by more than one file, e.g. "
                              f"{meta.image_id[dup].head(3).tolist()}")
    meta = meta.sort_values(["SeriesInstanceUID", "z", "image_id"], kind="stable")
    same = meta[meta.duplicated(["SeriesInstanceUID", "z"], keep=False)]
    with atomic_path(out_dir / "same_position.csv") as tmp:  # kept (each has its labels), but listed and said
        same[["SeriesInstanceUID", "z", "image_id"]].to_csv(tmp, index=False)
    meta["slice_index"] = meta.groupby("SeriesInstanceUID").cumcount()
    meta["series_length"] = meta.groupby("SeriesInstanceUID")["image_id"].transform("size")
    meta = meta[META_COLUMNS].astype({"rows": "int32", "cols": "int32", "multivalue_window": bool, "fixed_12bit": bool})
    meta = meta.join(labels.astype("float32"), on="image_id")
    meta["fold"] = assign_folds(meta, cfg.preprocess.n_folds, cfg.preprocess.fold_seed)
    meta = meta.sort_values(["split", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "slice_index"],
                            ascending=[False, True, True, True, True], kind="stable").reset_index(drop=True)
    with atomic_path(out_dir / "bad_files.csv") as tmp:
        bad.to_csv(tmp, index=False)
    return meta, bad, len(same)


def _stack_job(job) -> tuple[int, int, int]:
    series_ids, brain_dir, out_dir, png = job
    written = 0
    for ids in series_ids:
        slices = [read_png(png_path(Path(brain_dir), i)) for i in ids]
        before, after = neighbour_positions(len(ids), -1), neighbour_positions(len(ids), 1)
        for s, image_id in enumerate(ids):
            out = png_path(Path(out_dir), image_id)
            sources = [png_path(Path(brain_dir), ids[k]) for k in (before[s], s, after[s])]
            if png_ok(out) and out.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in sources):
                continue  # made from the brain-window PNGs as they are now
            rgb = np.dstack([slices[before[s]], slices[s], slices[after[s]]])
            write_bytes_atomic(out, encode_png(rgb, *png))
            written += 1
    return sum(len(i) for i in series_ids), 0, 0


def _stack_neighbours(meta: pd.DataFrame, brain_dir: Path, out_dir: Path, pcfg: PreprocessConfig,
                      workers: int, progress: bool) -> None:
    """2.5D: RGB = brain window of slices s-1, s, s+1 (edges repeat themselves), series in z order."""
    series = [g.image_id.tolist() for _, g in meta.sort_values("slice_index").groupby("SeriesInstanceUID", sort=True)]
    per_job = max(1, pcfg.chunk_size // 32)
    jobs = [(series[i:i + per_job], str(brain_dir), str(out_dir), png_settings(pcfg)) for i in range(0, len(series),
                                                                                                     per_job)]
    run_pool(_stack_job, jobs, workers, total=len(meta), size=lambda r: r[0], desc="2.5d stack", progress=progress)
