"""Training losses of the CNN (stage 2) and the sequence model (stage 4): the metric as a loss."""

from __future__ import annotations

import torch
from torch import nn

from ichpipe.base.errors import InputError
from ichpipe.base.labels import WEIGHTS


def make_loss(name: str, device: torch.device):
    """``weighted_bce``: the competition metric (``any`` x2) on logits; ``mse``: weighted MSE on probabilities."""
    weights = torch.tensor(WEIGHTS, dtype=torch.float32, device=device)
    if name == "weighted_bce":
        def loss(logits, y):
            bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
            return (bce * weights).sum(dim=1).mean() / weights.sum()
    elif name == "mse":
        def loss(logits, y):
            return ((torch.sigmoid(logits.float()) - y) ** 2 * weights).sum(dim=1).mean() / weights.sum()
    else:
        raise InputError(f"train.loss: weighted_bce or mse, got {name!r}")
    return loss
