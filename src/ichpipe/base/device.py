"""The one place that decides devices, precision and distributed setup."""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ichpipe.base.errors import InputError


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
    """The GPU of this process when there is one, else the CPU. ``ICHPIPE_DEVICE=cpu`` keeps a GPU
    machine's work on the CPU (the test of DDP over gloo does, whatever the machine has)."""
    wanted = os.environ.get("ICHPIPE_DEVICE", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise InputError(f"ICHPIPE_DEVICE={wanted!r}: auto, cpu or cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise InputError("ICHPIPE_DEVICE=cuda, but torch sees no CUDA GPU")
    return torch.device("cuda", local_rank) if wanted != "cpu" and torch.cuda.is_available() else torch.device("cpu")


def configure_cuda(benchmark: bool = True) -> None:
    """cuDNN picks the fastest kernels for the (fixed) input size after timing them once
    (``train.cudnn_benchmark``); float32 matrix products may use TF32 (what cuDNN convolutions do already)."""
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def init_runtime(cudnn_benchmark: bool = True) -> Runtime:
    """Single process, or one process per GPU under torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_cuda(cudnn_benchmark)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Runtime(device, rank, world, local)


@contextlib.contextmanager
def local_main_first(rt: Runtime):
    """The body runs on each machine's local rank 0 first, then on the other ranks: pretrained weights are
    downloaded once into the machine's cache, not by every process at the same time."""
    if rt.distributed and rt.local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if rt.distributed and rt.local_rank == 0:
            dist.barrier()


def close_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


class Amp(NamedTuple):
    """Mixed precision as ``train.amp`` resolves on a device."""

    enabled: bool  # autocast on
    dtype: torch.dtype  # its dtype
    scaler: bool  # a GradScaler (fp16 on CUDA)


NO_AMP = Amp(False, torch.float32, False)


def amp_settings(mode: str, device: torch.device) -> Amp:
    """(autocast on, dtype, GradScaler on) for ``train.amp``. ``bf16`` on a GPU without bfloat16 (T4, V100)
    falls back to fp16 with loss scaling; ``fp16`` and ``bf16`` on a CPU (without fast half-precision
    kernels: bf16 autocast ran ~8x slower than float32 on this project's machines) to float32; each says so."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return NO_AMP
    if mode in ("fp16", "bf16") and device.type == "cpu":  # bf16 autocast measured ~8x slower than float32 here
        warnings.warn(f"train.amp={mode} is a GPU precision; on the CPU the run stays in float32", stacklevel=2)
        return NO_AMP
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        warnings.warn(f"train.amp=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; using fp16 with "
                      "loss scaling instead", stacklevel=2)
        mode = "fp16"
    if mode in ("auto", "fp16"):
        return Amp(True, torch.float16, device.type == "cuda")
    if mode == "bf16":
        return Amp(True, torch.bfloat16, False)
    raise InputError(f"train.amp: auto, bf16, fp16 or off, got {mode!r}")


def autocast(device: torch.device, amp: Amp):
    """``torch.autocast`` as ``amp`` says (a no-op context when it is off)."""
    return torch.autocast(device.type, dtype=amp.dtype, enabled=True) if amp.enabled else contextlib.nullcontext()
