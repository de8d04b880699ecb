"""The slice dataset and its loader: augmentations from config, workers, normalisation."""

from __future__ import annotations

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
