"""The training losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichpipe.networks.losses import make_loss
from ichpipe.scoring.metrics import weighted_log_loss


def test_weighted_bce_loss_is_the_competition_metric():
    y = np.array([[0, 0, 0, 0, 1, 1], [0] * 6], dtype=np.float32)
    p = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.9], [0.05] * 6])
    logits = torch.logit(torch.tensor(p, dtype=torch.float32))
    loss = make_loss("weighted_bce", torch.device("cpu"))(logits, torch.tensor(y))
    assert loss.item() == pytest.approx(weighted_log_loss(y, p), rel=1e-5)
