"""The device helper: which device, which precision, cuDNN settings, rank-0-first downloads."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ichpipe.base.device import Runtime, amp_settings, configure_cuda, default_device, local_main_first
from ichpipe.base.errors import InputError


def test_ichpipe_device_keeps_work_on_the_cpu(monkeypatch):
    monkeypatch.setenv("ICHPIPE_DEVICE", "cpu")
    assert default_device(1) == torch.device("cpu")
    monkeypatch.setenv("ICHPIPE_DEVICE", "tpu")
    with pytest.raises(InputError, match="ICHPIPE_DEVICE='tpu': auto, cpu or cuda"):
        default_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ICHPIPE_DEVICE", "cuda")
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        default_device()
    monkeypatch.setenv("ICHPIPE_DEVICE", "auto")
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device(1) == torch.device("cuda", 1)


def test_amp_settings_per_device_and_bf16_falls_back_where_the_gpu_has_none(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_settings("auto", cpu) == (False, torch.float32, False)
    assert amp_settings("auto", gpu) == (True, torch.float16, True)
    with pytest.warns(UserWarning, match="train.amp=fp16 is a GPU precision; on the CPU the run stays in float32"):
        assert amp_settings("fp16", cpu) == (False, torch.float32, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_settings("bf16", gpu) == (True, torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.warns(UserWarning, match="Tesla V100-SXM2-16GB has no bfloat16; using fp16 with loss scaling"):
        assert amp_settings("bf16", gpu) == (True, torch.float16, True)
    with pytest.warns(UserWarning, match="train.amp=bf16 is a GPU precision; on the CPU the run stays in float32"):
        assert amp_settings("bf16", cpu) == (False, torch.float32, False)


def test_configure_cuda_turns_on_cudnn_benchmark_and_tf32():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda(True)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        configure_cuda(False)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _ordered(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(torch.device("cpu"), rank, world, rank)
    with local_main_first(rt):
        if rank == 0:
            time.sleep(1.0)  # a slow download: rank 1 must still wait for it
        with open(os.path.join(folder, f"rank{rank}"), "w") as f:
            f.write(repr(time.time()))
    dist.destroy_process_group()


def test_local_rank_zero_downloads_first_the_others_then_read_its_cache(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ordered, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = (float((tmp_path / f"rank{r}").read_text()) for r in (0, 1))
    assert second >= first
