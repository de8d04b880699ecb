#!/usr/bin/env python
"""Training throughput: synthetic tensors on the device vs the real PNG loader, fp32 vs AMP.

    python benchmarks/bench_train.py [--config configs/cnn/cpu_small.yaml] [--steps 20] [key=value ...]

(a) images already on the device (the model's own speed) and (b) the real loader from the
preprocessed PNGs (decode with OpenCV in worker processes, augmentation, pinned memory), each in
fp32 and with AMP (on CUDA: fp16 + GradScaler; on CPU: bf16 autocast). Prints img/s, the loader
overhead (1 - b/a, target <= 15%) and the AMP speed-up. Needs `make preprocess` for (b).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time

import torch

from ichpipe.config import load_config
from ichpipe.data import DEFAULT_AUGMENT, SliceDataset, build_transform, normalize
from ichpipe.device import autocast, init_runtime
from ichpipe.losses import make_loss
from ichpipe.models import create_model
from ichpipe.train import EpochDataset, EpochSampler, _loader, load_fold


def measure(model, batches, device, amp_dtype, steps: int, warmup: int = 3) -> float:
    """img/s of optimizer steps over ``batches`` (an iterator of (x, y))."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
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
        with autocast(device, amp_dtype is not None, amp_dtype or torch.float32):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        images += len(x)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cnn/cpu_small.yaml")
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
    rt = init_runtime()
    device, tcfg = rt.device, cfg.train
    bs, size = tcfg.batch_size, tcfg.image_size
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    train_meta, _, png_dir, _ = load_fold(cfg)
    ds = SliceDataset(train_meta, png_dir, build_transform(tcfg.augment or DEFAULT_AUGMENT, size, train=True), cfg.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{cfg.model.backbone} at {size}px, batch {bs}, {args.steps} timed steps, {name}, "
          f"loader workers {tcfg.loader_workers}\n")
    print("| precision | (a) tensors on device img/s | (b) PNG loader img/s | loader overhead |")
    print("|---|---|---|---|")
    results = {}
    for label, dtype in (("fp32", None), ("AMP " + str(amp_dtype).split(".")[-1], amp_dtype)):
        torch.manual_seed(0)
        model = create_model(cfg.model.backbone, pretrained=False).to(device).to(memory_format=torch.channels_last)
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device)
        y = (torch.rand(bs, 6, device=device) < 0.1).float()

        a = measure(model, itertools.repeat((x, y)), device, dtype, args.steps)
        sampler = EpochSampler(len(ds), cfg.seed)
        loader = _loader(EpochDataset(ds), bs, tcfg.loader_workers, sampler, device)
        b = measure(model, ((xb, yb) for xb, yb, _ in loader), device, dtype, args.steps)
        results[label] = (a, b)
        print(f"| {label} | {a:.1f} | {b:.1f} | {100 * (1 - b / a):.0f}% |")
    (fa, fb), (ma, mb) = results.values()
    print(f"\nAMP speed-up: {ma / fa:.2f}x on device tensors, {mb / fb:.2f}x with the loader")


if __name__ == "__main__":
    sys.exit(main())
