"""Optimisers and learning-rate schedules of the CNN (stage 2) and the sequence model (stage 4), by name.

The optimisers are torch's (``adamw``; ``adam``, whose weight decay is an L2 term, as the 2nd place used
it with none); the CNN's schedules are timm's, stepped once per optimizer update.
"""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int) -> Scheduler:
    """``total`` optimizer updates: ``warmup`` linear ones (lr/warmup → lr), then ``cosine`` to 0 or ``constant``.

    Stepped per update with ``step_update(updates)``; its state travels in ``last.pt``.
    """
    lr = optimizer.param_groups[0]["lr"]
    common = {"warmup_t": warmup, "warmup_lr_init": lr / max(1, warmup), "warmup_prefix": True, "t_in_epochs": False}
    if schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0, **common)
    if schedule == "constant":  # a step schedule that never decays: timm's warm-up, then lr
        return StepLRScheduler(optimizer, decay_t=max(1, total), decay_rate=1.0, **common)
    raise ValueError(f"train.schedule: cosine or constant, got {schedule!r}")


def accumulation_groups(n_micro: int, accumulate: int) -> list[int]:
    """The size of the accumulation group of each of ``n_micro`` micro-batches: ``accumulate``, except in a
    last, partial group (7 micro-batches in groups of 3: 3, 3, 3, 3, 3, 3, 1). Each micro-batch's loss is
    divided by its group's size, so that every update follows the mean loss of the micro-batches it sums."""
    full = n_micro - n_micro % accumulate
    return [accumulate if i < full else n_micro - full for i in range(n_micro)]
