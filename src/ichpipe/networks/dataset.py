"""Training data: preprocessed PNGs and their labels, augmented by an albumentations pipeline from config.

Augmentation randomness is a pure function of (seed, epoch, sample index): a resumed run, any number
of loader workers and any number of GPUs see exactly the same augmented images.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ichpipe.base.errors import InputError, first_line, quote
from ichpipe.base.label_csv import non_binary_labels
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import neighbour_positions, png_path, z_order
from ichpipe.imaging.crop import crop_border

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The 2nd place's three transforms at albumentations' ShiftScaleRotate defaults (shift 0.0625, scale 0.1,
# p 0.7; their own limits were 0.05, 0.05 and p 0.3: configs/real/resnext101_2nd_place.yaml). ShiftScaleRotate
# is spelled Affine in albumentations 2.x.
DEFAULT_AUGMENT = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "Affine", "translate_percent": [-0.0625, 0.0625], "scale": [0.9, 1.1], "rotate": [-20, 20],
     "border_mode": cv2.BORDER_REPLICATE, "p": 0.7},
    {"name": "Transpose", "p": 0.5},
]


def build_transform(augment: list[dict], image_size: int, train: bool) -> A.Compose:
    """Resize (if needed) + the configured augmentations (train only); uint8 out.

    Normalisation happens on the device (:func:`normalize`): workers ship uint8, 4x less data.
    """
    # Area averaging when shrinking (no aliasing), bilinear when enlarging (INTER_AREA would give blocks).
    steps = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")]
    if train:
        for spec in augment:
            spec = dict(spec)
            name = spec.pop("name", None)
            if not name or not hasattr(A, name):
                raise InputError(f"train.augment: unknown albumentations transform {quote(name)}")
            cls = getattr(A, name)
            accepted = inspect.signature(cls.__init__).parameters
            unknown = [k for k in spec if k not in accepted]
            if unknown:  # albumentations 2.x only warns; a typo in an experiment must not pass silently
                raise InputError(f"train.augment: {name}: unknown argument(s) {', '.join(unknown)}")
            for key, value in spec.items():  # YAML lists → tuples for range arguments
                if isinstance(value, list):
                    spec[key] = tuple(value)
            try:
                steps.append(cls(**spec))
            except (TypeError, ValueError) as exc:
                raise InputError(f"train.augment: {name}: {first_line(exc)}") from None
    return A.Compose(steps)


@functools.lru_cache(maxsize=16)
def _mean_std(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std x 255 per RGB triple, as (1, C, 1, 1) tensors on ``device``: made once per
    (channels, device), not on every batch (each new tensor on a GPU is a host-to-device copy)."""
    k = channels // 3
    mean = torch.tensor(IMAGENET_MEAN * k, device=device).view(1, 3 * k, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD * k, device=device).view(1, 3 * k, 1, 1) * 255
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3k, H, W) batch → float, ImageNet mean/std per RGB triple, on the batch's device."""
    mean, std = _mean_std(x.shape[1], x.device)
    return (x.float() - mean) / std


def make_loader(ds: Dataset, batch_size: int, workers: int, sampler=None, device: torch.device | None = None
                ) -> DataLoader:
    """Batches of uint8 images in order (or ``sampler``'s): decoded in ``workers`` processes (kept alive across
    epochs), pinned for a GPU.

    Each worker decodes on one thread: OpenCV would otherwise start a thread per core in every worker (8
    workers x 16 threads on 16 cores; torch already gives its workers one). The setting is made here, in the
    process that forks the workers, which inherit it: ``cv2.setNumThreads`` inside a forked worker deadlocks
    once this process has used OpenCV's thread pool. This process's own OpenCV calls then run on one thread
    too (its workers decode).
    """
    if workers > 0:
        cv2.setNumThreads(1)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device is not None and device.type == "cuda", persistent_workers=workers > 0,
                      drop_last=False)


def input_channels(mode: str) -> int:
    """Network input channels of a ``preprocess.mode``: 9 for 2.5d_windows (3 slices x 3 windows), else 3."""
    return 9 if mode == "2.5d_windows" else 3


@dataclass(frozen=True)
class EvalInput:
    """How a slice becomes the network's input when nothing is random (validation, stage 3, the report, predict): one
    place, so that every stage feeds the CNN what it was validated on."""

    transform: A.Compose  # resize (and nothing random) to the network's size
    crop: float | None  # the head crop's margin: 0.0, the tight box (train.crop_border); None, no crop
    channels: int  # 3, or 9 for 2.5d_windows

    @classmethod
    def of(cls, image_size: int, crop_border: bool, mode: str) -> EvalInput:
        """From ``train.image_size``, ``train.crop_border`` and ``preprocess.mode`` (a config's or a bundle's)."""
        return cls(build_transform([], image_size, train=False), 0.0 if crop_border else None, input_channels(mode))


def neighbour_ids(meta: pd.DataFrame) -> np.ndarray:
    """(N, 2) image ids of the previous and next slice of each row in its series (z order; the series'
    first and last slices repeat themselves), for the 9-channel input."""
    order, first, last = z_order(meta)
    ids = meta.image_id.to_numpy()[order]
    n = len(order)
    out = np.empty((len(meta), 2), dtype=object)
    out[order] = np.stack([ids[neighbour_positions(n, -1, first, last)], ids[neighbour_positions(n, 1, first, last)]],
                          axis=1)
    return out


def stack_neighbours(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) images of one series in z order → (N, H, W, 9): slices s-1, s, s+1 (ends repeated)."""
    n = len(images)
    return np.concatenate([images[neighbour_positions(n, -1)], images, images[neighbour_positions(n, 1)]], axis=3)


def checked_labels(meta: pd.DataFrame) -> np.ndarray:
    """(N, 6) float32 labels of metadata rows; a missing column, NaN or a value outside {0, 1} is an error."""
    missing = [c for c in LABELS if c not in meta.columns]
    if missing:
        raise InputError(f"metadata: no label column(s) {', '.join(missing)}; run `make preprocess` again")
    found = non_binary_labels(meta.set_index("image_id"))
    if found:
        n, image, column, value = found
        raise InputError(f"metadata: image {image} has label {column}={value} ({n} images have a label that is "
                         f"not 0 or 1)")
    return meta[list(LABELS)].to_numpy(dtype=np.float32)


def to_input(img: np.ndarray, transform: A.Compose, seed: int, crop_margin: float | None) -> torch.Tensor:
    """A stage-1 RGB image (H, W, 3 uint8) → the network's uint8 CHW input: border crop, resize, augmentation.

    The one path from image to tensor, for training, stage 3 and `predict` alike.
    """
    if crop_margin is not None:
        img = crop_border(img, np.random.default_rng(seed), crop_margin)
    transform.set_random_seed(seed)
    x = transform(image=img)["image"]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _read_png(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{path}: missing or unreadable PNG (run `make preprocess`)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ImageCache:
    """Decoded stage-1 PNGs kept in memory after their first read, up to ``budget`` bytes (later reads past the
    budget go to the disk as before). The images are read-only: a transform that wrote into one would change what
    the next epoch reads, so it fails instead."""

    def __init__(self, budget: int):
        self.budget, self.nbytes, self.images = budget, 0, {}

    def read(self, path: Path, read) -> np.ndarray:
        key = str(path)
        img = self.images.get(key)
        if img is None:
            img = read(path)
            if self.nbytes + img.nbytes <= self.budget:
                img.flags.writeable = False
                self.images[key] = img
                self.nbytes += img.nbytes
        return img


@functools.lru_cache(maxsize=1)
def image_cache(megabytes: int) -> ImageCache | None:
    """The process's cache of ``train.image_cache_mb`` (shared by every dataset and fold it runs); None when 0."""
    return ImageCache(megabytes * 2**20) if megabytes > 0 else None


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


class SliceDataset(Dataset):
    """(uint8 CHW image, six labels, row index) per metadata row, from ``png_dir/<image_id>.png``.

    ``labelled``: the rows must carry six labels in {0, 1} (training, validation); otherwise (test
    images) the labels are zeros. ``targets``: (N, 6) training targets in [0, 1] instead (the labelled rows'
    labels, then pseudo-labels). ``channels=9``: the image is stacked with its series neighbours'
    (previous, itself, next: 9 channels, augmented alike). ``cache``: decoded PNGs kept in memory
    (``image_cache``); the items are the same with or without it.
    """

    def __init__(self, meta: pd.DataFrame, png_dir: str | Path, transform: A.Compose, seed: int = 0,
                 crop_margin: float | None = None, labelled: bool = False, channels: int = 3,
                 targets: np.ndarray | None = None, cache: ImageCache | None = None):
        self.ids = meta.image_id.to_numpy()
        self.neighbours = neighbour_ids(meta) if channels == 9 else None
        if targets is not None:
            targets = np.asarray(targets, np.float32)
            if targets.shape != (len(meta), len(LABELS)) or not ((targets >= 0) & (targets <= 1)).all():
                raise InputError(f"training targets: need ({len(meta)}, {len(LABELS)}) values in [0, 1], got "
                                 f"{targets.shape}")
            self.labels = targets
        else:
            self.labels = checked_labels(meta) if labelled else np.zeros((len(meta), len(LABELS)), np.float32)
        self.png_dir = Path(png_dir)
        self.transform = transform
        self.seed = seed
        self.crop_margin = crop_margin  # None: no border crop; 0: tight box; > 0: random margin
        self.epoch = 0
        self.cache = cache

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check_files(self) -> None:
        """Every PNG there and not empty, before the first batch (cheap: one stat each), else one line."""
        missing = [i for i in self.ids if not _nonempty(png_path(self.png_dir, i))]
        if missing:
            raise InputError(f"{self.png_dir}: {len(missing)} of {len(self.ids)} PNGs are missing or empty, e.g. "
                             f"{missing[0]}.png; run `make preprocess` again (it rebuilds them)")

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, image_id: str) -> np.ndarray:
        path = png_path(self.png_dir, image_id)
        return self.cache.read(path, _read_png) if self.cache is not None else _read_png(path)

    def image(self, i: int) -> np.ndarray:
        """Row ``i``'s stage-1 image (H, W, 3 uint8; with 9 channels stacked with its neighbours'), before the crop."""
        img = self._read(self.ids[i])
        if self.neighbours is not None:
            prev, nxt = self.neighbours[i]
            img = np.dstack([self._read(prev), img, self._read(nxt)])
        return img

    def __getitem__(self, i: int):
        img = self.image(i)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        return to_input(img, self.transform, seed, self.crop_margin), torch.from_numpy(self.labels[i]), i
