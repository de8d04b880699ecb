"""Every path of the pipeline, derived from one data root (``DATA_DIR``, default ``data/``).

The root holds the competition files exactly as Kaggle unzips them; each stage writes its outputs
in a subfolder under it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ichpipe.base.errors import InputError

if TYPE_CHECKING:  # for annotations only
    from ichpipe.base.config import Config, PreprocessConfig


@dataclass(frozen=True)
class DataPaths:
    """The competition's files under ``root``; everything the pipeline writes under ``work`` (default:
    ``root``; set ``data.work_dir`` where the data root is read-only, as ``/kaggle/input`` is)."""

    root: Path
    work: Path

    def __init__(self, root: str | os.PathLike, work: str | os.PathLike | None = None):
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "work", Path(work) if work else Path(root))

    # --- the competition's files -------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return self.root / "stage_2_train"

    @property
    def test_dir(self) -> Path:
        return self.root / "stage_2_test"

    @property
    def train_csv(self) -> Path:
        return self.root / "stage_2_train.csv"

    @property
    def sample_submission_csv(self) -> Path:
        return self.root / "stage_2_sample_submission.csv"

    # --- synthetic only ------------------------------------------------------------------------
    @property
    def test_labels_csv(self) -> Path:
        """The synthetic test set's answer key; absent for the real data."""
        return self.root / "synthetic_test_labels.csv"

    @property
    def synthetic_table(self) -> Path:
        """The synthetic set's per-file table: geometry, labels, quirks, realism measures."""
        return self.root / "synthetic_slices.csv"

    @property
    def synthetic_config(self) -> Path:
        """The resolved config that wrote the synthetic set (written last: a set without it is incomplete)."""
        return self.root / "synthetic_config.yaml"

    @property
    def example_study(self) -> Path:
        """One synthetic test study's DICOMs in a zip, to try `predict` on."""
        return self.root / "synthetic_example_study.zip"

    def mask(self, image_id: str) -> Path:
        """The synthetic answer key's bleed mask of one slice (slices with blood only)."""
        return png_path(self.masks_dir, image_id)

    @property
    def masks_dir(self) -> Path:
        """The synthetic answer key's bleed masks: ``<image_id>.png`` per slice with blood, bit k of a pixel set
        where subtype k (``SUBTYPES`` order) is (read with ``io.read_mask``)."""
        return self.root / "synthetic_masks"

    # --- derived -------------------------------------------------------------------------------
    @property
    def processed(self) -> Path:
        return self.work / "processed"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def eda(self) -> Path:
        return self.work / "eda"

    def pngs(self, pcfg: PreprocessConfig) -> Path:
        """Stage 1's PNG folder for these preprocess settings (one PNG per slice: :func:`png_path`)."""
        return self.processed / output_name(pcfg)

    @property
    def cq500_copy(self) -> Path:
        """`make cq500-synthetic`: the synthetic test studies in CQ500's layout, with reads.csv."""
        return self.work / "cq500_synthetic"

    @property
    def evaluation(self) -> Path:
        """`make evaluate`'s default --out."""
        return self.runs / "evaluate"

    @property
    def judge(self) -> Path:
        return self.work / "judge"

    @property
    def gpu_check(self) -> Path:
        return self.work / "gpu_check"

    @property
    def dicom_check(self) -> Path:
        """`make dicom-check`'s folder: its inputs, predict's outputs on them, each validator's output, summary.md."""
        return self.work / "dicom_check"

    @property
    def benchmark(self) -> Path:
        """`make benchmark`'s own synthetic sets and runs, one folder per spec."""
        return self.work / "benchmark"

    @property
    def metadata(self) -> Path:
        """Stage 1's table: one row per usable image with ids, z order, labels and fold."""
        return self.processed / "metadata.parquet"


SERIES_KEYS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"]  # the metadata columns that name a series


def z_order(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (series keys, ``slice_index``) in series-then-z order: the row order, and for each position
    in it the positions of its series' first and last slice (for neighbours with the ends repeated)."""
    order = np.lexsort([rows.slice_index.to_numpy(), *(rows[k].to_numpy() for k in reversed(SERIES_KEYS))])
    keys = rows[SERIES_KEYS].to_numpy()[order]
    new = np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(order)]
    return order, np.repeat(starts, ends - starts), np.repeat(ends - 1, ends - starts)


def neighbour_positions(n: int, offset: int, first: np.ndarray | int = 0, last: np.ndarray | int | None = None
                        ) -> np.ndarray:
    """For positions 0..n-1 of slices in z order, the position ``offset`` slices away within the same series, the
    series' ends repeated (``first``/``last``: each position's series' first and last position, as :func:`z_order`
    gives them; by default one series). The one rule of every neighbour (2.5D PNGs, 9 channels, the stacker)."""
    return np.clip(np.arange(n) + offset, first, n - 1 if last is None else last)


def png_path(folder: Path, image_id: str) -> Path:
    """The PNG of one slice in a folder of stage 1's PNGs (or of the answer key's masks)."""
    return folder / f"{image_id}.png"


def data_paths(cfg: Config) -> DataPaths:
    """The paths of a Config: ``data.root`` to read the competition's files, ``data.work_dir`` to write."""
    return DataPaths(cfg.data.root, cfg.data.work_dir or None)


def work_dir_id(cfg: Config) -> str:
    """The work folder of a Config as a submission records it (absolute): submissions of one experiment made
    under two data roots share blend.out_dir, and `make submit` takes only the current root's."""
    return str(data_paths(cfg).work.resolve())


def read_metadata(paths: DataPaths | str | os.PathLike) -> pd.DataFrame:
    """Stage 1's metadata table; a one-line error when stage 1 has not run."""
    path = (paths if isinstance(paths, DataPaths) else DataPaths(paths)).metadata
    if not path.exists():
        raise InputError(f"{path}: not found; run `make preprocess` first")
    return pd.read_parquet(path)


def epoch_number(path: str | os.PathLike) -> int:
    """NN of an ``epoch<NN>`` folder or ``epoch<NN>.pt`` checkpoint."""
    return int(Path(path).stem.removeprefix("epoch"))


def finished_dirs(folder: str | os.PathLike) -> list[Path]:
    """The ``epoch<NN>`` sub-folders of ``folder`` whose ``done`` marker is written, in epoch order."""
    return sorted(p.parent for p in Path(folder).glob("epoch*/done"))


def experiment_dir(cfg: Config) -> Path:
    """``<work dir>/runs/<experiment>``: the folds' run folders, stage 5's CV table and prediction tables, the
    report and the bundle (``cfg``: a Config). In a bag of seeds (``seeds``), the run of ``cfg.seed``:
    ``runs/<experiment>/seed<s>`` (:func:`bag_dir` is the bag's own folder)."""
    if cfg.seeds:
        if cfg.seed not in cfg.seeds:
            raise InputError(f"seed={cfg.seed}: not one of seeds {list(cfg.seeds)}; in a bag of seeds every stage "
                             f"runs each of them (or give seed=<one of them>)")
        return bag_dir(cfg) / f"seed{cfg.seed}"
    return bag_dir(cfg)


def bag_dir(cfg: Config) -> Path:
    """``<work dir>/runs/<experiment>``: the experiment's folder; for a bag of seeds, the folder of its seeds' runs
    and of stage 5's results, which average them."""
    return data_paths(cfg).runs / cfg.experiment


def seed_configs(cfg: Config) -> list[Config]:
    """The configs of the runs an experiment is made of: itself, or one per seed of its bag (``seeds``)."""
    return [cfg] if not cfg.seeds else [cfg.model_copy(update={"seed": s}) for s in cfg.seeds]


def blend_dir(cfg: Config, experiment: str | None = None) -> Path:
    """``<work dir>/runs/<experiment>/blend``: stage 5's results of an experiment (of a bag of seeds: the bag's; or
    ``make ensemble``'s, under its name), replaced as one folder: the CV table (cv.md, cv.json), the prediction
    tables, the submissions it made (submissions.json) and its config."""
    return data_paths(cfg).runs / (experiment or cfg.experiment) / "blend"


def checkpoint_path(run: Path, epoch: int) -> Path:
    """Stage 2's weights of ``epoch`` in a fold's run folder."""
    return run / "checkpoints" / f"epoch{epoch:02d}.pt"


def run_dir(cfg: Config, fold: int | None = None) -> Path:
    """``<work dir>/runs/<experiment>/fold<k>``: where stages 2-4 of one fold write (``cfg``: a Config)."""
    return experiment_dir(cfg) / f"fold{cfg.fold if fold is None else fold}"


def output_name(cfg: PreprocessConfig) -> str:
    """The folder of stage 1's PNGs under ``processed/`` for a PreprocessConfig: ``preprocess.name``, else
    ``<size>`` (``<size>_2.5d`` in 2.5D mode)."""
    return cfg.name or (f"{cfg.size}_2.5d" if cfg.mode == "2.5d" else f"{cfg.size}")


def named_path(cfg: Config, name: str) -> Path:
    """A path of :data:`NAMED_PATHS` for ``cfg`` (the Makefile asks for them: ``python -m ichpipe.base.cli path
    NAME``, so that it spells no path of its own and honours ``data.work_dir``)."""
    paths = data_paths(cfg)
    named = {
        "work": paths.work, "processed": paths.processed, "runs": paths.runs, "experiment": bag_dir(cfg),
        "bundle": bag_dir(cfg) / "bundle", "predict_example": bag_dir(cfg) / "predict_example",
        "example_study": paths.example_study, "cq500_copy": paths.cq500_copy, "masks": paths.masks_dir,
        "evaluation": paths.evaluation, "benchmark": paths.benchmark, "gpu_check": paths.gpu_check,
        "judge": paths.judge, "dicom_check": paths.dicom_check,
    }
    if name not in named:
        raise InputError(f"{name}: no such path (known: {', '.join(named)})")
    return named[name]
