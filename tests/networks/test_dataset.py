"""The slice dataset and its loader: augmentations from config, workers, normalisation."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch

from ichpipe.base.errors import InputError
from ichpipe.networks.dataset import build_transform, normalize


def test_augment_config_errors_name_the_transform():
    with pytest.raises(InputError, match="train.augment: unknown albumentations transform 'Flipz'"):
        build_transform([{"name": "Flipz"}], 64, train=True)
    with pytest.raises(InputError, match="train.augment: HorizontalFlip: unknown argument.s. q"):
        build_transform([{"name": "HorizontalFlip", "q": 1}], 64, train=True)


LOADER_THREADS = """
import cv2, numpy as np, torch
from ichpipe.networks.dataset import make_loader
class Threads(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        cv2.resize(np.ones((1500, 1500), np.float32), (2000, 2000))  # decoding work in the worker
        return torch.tensor([cv2.getNumThreads(), torch.get_num_threads()])
for _ in range(3):  # this process has used OpenCV's thread pool before its workers fork
    cv2.resize(np.ones((1500, 1500), np.float32), (2000, 2000))
print(torch.cat(list(make_loader(Threads(), 2, workers=2))).tolist())
"""


def test_each_loader_worker_decodes_on_one_thread_and_never_deadlocks():
    # 8 workers x every core's OpenCV threads would fight over the cores; cv2.setNumThreads called inside a
    # forked worker (a worker_init_fn) hung here once the parent had used OpenCV's pool
    res = subprocess.run([sys.executable, "-c", LOADER_THREADS], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str([[1, 1]] * 4)


def test_normalize_builds_its_constants_once_per_device():
    from ichpipe.networks.dataset import IMAGENET_MEAN, IMAGENET_STD, _mean_std

    _mean_std.cache_clear()
    x = torch.randint(0, 256, (2, 9, 4, 4), dtype=torch.uint8)
    for _ in range(3):
        out = normalize(x)
    assert _mean_std.cache_info().misses == 1 and _mean_std.cache_info().hits == 2
    want = (x[:, 4].float() - IMAGENET_MEAN[1] * 255) / (IMAGENET_STD[1] * 255)  # channel 4: G of slice 2
    torch.testing.assert_close(out[:, 4], want)


def _pngs(tmp_path, n=6, size=32):
    import cv2
    import numpy as np
    import pandas as pd

    from ichpipe.base.paths import png_path

    rng = np.random.default_rng(0)
    ids = [f"ID_{i:04x}" for i in range(n)]
    for i in ids:
        path = png_path(tmp_path, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return pd.DataFrame({"image_id": ids})


def test_the_image_cache_gives_the_same_items_and_reads_each_png_once(tmp_path, monkeypatch):
    from ichpipe.networks import dataset
    from ichpipe.networks.dataset import DEFAULT_AUGMENT, ImageCache, SliceDataset

    meta = _pngs(tmp_path)
    reads = []
    real = dataset._read_png
    monkeypatch.setattr(dataset, "_read_png", lambda p: reads.append(p.name) or real(p))
    tf = build_transform(DEFAULT_AUGMENT, 24, train=True)
    plain = SliceDataset(meta, tmp_path, tf, seed=3, crop_margin=0.1)
    cached = SliceDataset(meta, tmp_path, tf, seed=3, crop_margin=0.1, cache=ImageCache(2**20))
    for epoch in range(3):  # augmented differently every epoch, alike with and without the cache
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(meta)):
            assert torch.equal(plain[i][0], cached[i][0])
    # the plain dataset reads every PNG every epoch, the cached one once
    assert sorted(collections.Counter(reads).values()) == [3 + 1] * 6
    assert cached.cache.nbytes == 6 * 32 * 32 * 3
    with pytest.raises(ValueError, match="read-only"):  # a transform writing into a cached image fails loudly
        cached.cache.images[next(iter(cached.cache.images))][0, 0, 0] = 1


def test_the_image_cache_stops_at_its_budget(tmp_path):
    from ichpipe.networks.dataset import ImageCache, SliceDataset, image_cache

    meta = _pngs(tmp_path)
    ds = SliceDataset(meta, tmp_path, build_transform([], 24, train=False), cache=ImageCache(2 * 32 * 32 * 3 + 10))
    for i in range(len(meta)):
        ds[i]
    assert len(ds.cache.images) == 2 and ds.cache.nbytes == 2 * 32 * 32 * 3
    assert image_cache(0) is None and image_cache(1) is image_cache(1)  # one per process, shared by the datasets
