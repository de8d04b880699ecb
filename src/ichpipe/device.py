"""The one place that decides devices, precision and distributed setup."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ichpipe.io import InputError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Collectives wait this long for a slow rank before failing (NCCL's own default is 10 minutes, shorter
# than writing a ResNeXt-101 checkpoint on a busy file system may take).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def default_device(local_rank: int = 0) -> torch.device:
    """The GPU of this process when there is one, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_runtime() -> Runtime:
    """Single process, or one process per GPU under torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local)
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device, rank, world, local)


def close_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def amp_settings(mode: str, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, dtype, GradScaler on) for ``train.amp``."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, torch.float32, False
    if mode in ("auto", "fp16"):
        return True, torch.float16, device.type == "cuda"
    if mode == "bf16":
        return True, torch.bfloat16, False
    raise InputError(f"train.amp: auto, bf16, fp16 or off, got {mode!r}")


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext()
