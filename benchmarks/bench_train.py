#!/usr/bin/env python
"""Training throughput: synthetic tensors on the device vs the real PNG loader, fp32 vs AMP.

    python benchmarks/bench_train.py [--config configs/demo/cpu_small.yaml] [--steps 20] [key=value ...]

(a) images already on the device (the model's own speed) and (b) the real loader from the
preprocessed PNGs (decode with OpenCV in worker processes, the config's crop and augmentation, pinned
memory), each in fp32 and with AMP (on CUDA: fp16 + GradScaler; on CPU: bf16 autocast), with the
config's optimiser, channels_last and (on CUDA) cudnn.benchmark. Prints img/s, the loader overhead
(1 - b/a, target <= 15%), the AMP speed-up and, on CUDA, the peak GPU memory. Needs `make preprocess` for (b).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time

import torch

from ichpipe.base.config import Config, load_config
from ichpipe.base.device import Amp, autocast, init_runtime
from ichpipe.networks.dataset import (
    DEFAULT_AUGMENT,
    SliceDataset,
    build_transform,
    input_channels,
    make_loader,
    normalize,
)
from ichpipe.networks.losses import make_loss
from ichpipe.networks.models import create_model
from ichpipe.networks.optim import make_optimizer
from ichpipe.stages.train import EpochDataset, EpochSampler, OptimizerStep, load_fold


def measure(model, batches, device, amp_dtype, steps: int, optimizer: str = "adamw", warmup: int = 3) -> float:
    """img/s of optimizer steps over ``batches`` (an iterator of (x, y)); ``amp_dtype`` None = fp32."""
    opt = make_optimizer(optimizer, model.parameters(), 1e-4, 0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    step = OptimizerStep(opt, scaler)
    loss_fn = make_loss("weighted_bce", device)
    model.train()
    images, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, images = time.perf_counter(), 0
        x = normalize(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, Amp(amp_dtype is not None, amp_dtype or torch.float32, False)):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        step()
        opt.zero_grad(set_to_none=True)
        images += len(x)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def _forever(loader):
    """The loader's batches, epoch after epoch (a small set still gives enough steps to time)."""
    while True:
        yield from loader


def throughput(cfg: Config, steps: int, device: torch.device, precisions: dict[str, torch.dtype | None],
               loader: bool = True) -> list[dict]:
    """One row per precision: img/s on device tensors, with the PNG loader (``loader``) and peak GPU memory (GB)."""
    tcfg = cfg.train
    bs, size, channels = tcfg.batch_size, tcfg.image_size, input_channels(cfg.preprocess.mode)
    ds = None
    if loader:
        train_meta, _, png_dir, _ = load_fold(cfg)
        ds = SliceDataset(train_meta, png_dir, build_transform(tcfg.augment or DEFAULT_AUGMENT, size, train=True),
                          cfg.seed, tcfg.crop_margin if tcfg.crop_border else None, channels=channels)
    rows = []
    for label, dtype in precisions.items():
        torch.manual_seed(0)
        model = create_model(cfg.model.backbone, pretrained=False, in_chans=channels,
                             kwargs=cfg.model.kwargs).to(device)
        model = model.to(memory_format=torch.channels_last)
        x = torch.randint(0, 256, (bs, channels, size, size), dtype=torch.uint8, device=device)
        y = (torch.rand(bs, 6, device=device) < 0.1).float()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        a = measure(model, itertools.repeat((x, y)), device, dtype, steps, tcfg.optimizer)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        b = float("nan")
        if ds is not None:
            batches = make_loader(EpochDataset(ds), bs, tcfg.loader_workers, EpochSampler(len(ds), cfg.seed), device)
            b = measure(model, ((xb, yb) for xb, yb, _ in _forever(batches)), device, dtype, steps, tcfg.optimizer)
        rows.append({"precision": label, "device_img_s": a, "loader_img_s": b, "peak_gb": peak, "batch": bs,
                     "size": size})
        del model, x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/cpu_small.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for (a) and (b); default: cores left beside the loader workers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    # On a CPU the loader workers share the cores with the model: give both runs the same threads,
    # so that (b) - (a) measures the loader and not the loss of a core.
    threads = args.threads or max(1, (os.cpu_count() or 1) - cfg.train.loader_workers)
    torch.set_num_threads(threads)
    device = init_runtime(cfg.train.cudnn_benchmark).device
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\n{cfg.model.backbone} at {cfg.train.image_size}px, batch {cfg.train.batch_size}, {args.steps} timed "
          "steps, "
          f"{name}, loader workers {cfg.train.loader_workers}\n")
    rows = throughput(cfg, args.steps, device, {"fp32": None, "AMP " + str(amp_dtype).split(".")[-1]: amp_dtype})
    print("| precision | (a) tensors on device img/s | (b) PNG loader img/s | loader overhead | peak GPU memory |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['device_img_s']:.1f} | {r['loader_img_s']:.1f} | "
              f"{100 * (1 - r['loader_img_s'] / r['device_img_s']):.0f}% | {r['peak_gb']:.1f} GB |")
    (fp32, amp) = rows
    print(f"\nAMP speed-up: {amp['device_img_s'] / fp32['device_img_s']:.2f}x on device tensors, "
          f"{amp['loader_img_s'] / fp32['loader_img_s']:.2f}x with the loader")


if __name__ == "__main__":
    sys.exit(main())
