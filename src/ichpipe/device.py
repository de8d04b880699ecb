"""The one place that decides devices, precision and distributed setup."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_runtime() -> Runtime:
    """Single process, or one process per GPU under torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
    raise ValueError(f"train.amp: auto, bf16, fp16 or off, got {mode!r}")


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext()
