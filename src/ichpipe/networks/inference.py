"""Running a trained CNN over images with test-time augmentation: what stage 3 stores and `predict` computes
(the views, their probability mean, the pooled embeddings)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ichpipe.base.device import autocast
from ichpipe.base.errors import InputError
from ichpipe.networks.dataset import normalize

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504: a larger embedding value would be stored as inf


VIEWS = {"none": lambda x: x, "hflip": lambda x: x.flip(-1), "transpose": lambda x: x.transpose(-1, -2)}


def mean_probability_logit(view_logits: torch.Tensor) -> torch.Tensor:
    """(V, ..., 6) logits of V views → the logit of their mean probability (one view: its logits as they are).

    TTA views, epoch bags, folds and inner LSTMs are all averaged as probabilities; stage 3 stores the
    result as a logit, stably: log(mean p) - log(mean (1 - p)) with log-sum-exp of log-sigmoids.
    """
    if view_logits.shape[0] == 1:
        return view_logits[0]
    x = view_logits.double()
    return (torch.logsumexp(F.logsigmoid(x), 0) - torch.logsumexp(F.logsigmoid(-x), 0)).float()


@torch.no_grad()
def embed_loader(model, loader: DataLoader, views: list[str], device, amp, progress: bool, desc: str,
                 out: dict[str, np.ndarray], channels_last: bool = False) -> None:
    """Write the view-mean embeddings (N, D) and probability-mean logits (N, 6) of ``loader`` into ``out``.

    ``out`` holds preallocated arrays (memory-mapped ``.npy`` files: nothing of size N x D is built in
    RAM) under ``emb`` and ``logits``, and optionally ``emb_views`` (V, N, D) and ``logits_views``; their
    dtypes are the stored ones (``embed.dtype``: float16 embeddings are rounded once, on assignment).
    ``channels_last``: the views go to the model in that memory layout (a model converted to it runs
    faster on a GPU with it).
    """
    model.eval()
    classifier = model.get_classifier()
    row = 0
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = normalize(x.to(device, non_blocking=True))
        e_views, l_views = [], []
        for view in views:
            with autocast(device, amp):
                pooled = model.forward_head(model.forward_features(VIEWS[view](x).contiguous(memory_format=layout)),
                                            pre_logits=True)
                e_views.append(pooled.float())
                l_views.append(classifier(pooled).float())
        e, lg = torch.stack(e_views), torch.stack(l_views)
        rows = slice(row, row + len(x))
        if out["emb"].dtype == np.float16 and float(e.abs().max()) > FLOAT16_MAX:
            raise InputError(f"{desc or 'embeddings'}: the model's pooled features reach {float(e.abs().max()):.3g}, "
                             f"beyond float16's {FLOAT16_MAX:.0f}; set embed.dtype=float32")
        out["emb"][rows] = e.mean(0).cpu().numpy()
        out["logits"][rows] = mean_probability_logit(lg).cpu().numpy()
        if "emb_views" in out:
            out["emb_views"][:, rows] = e.cpu().numpy()
            out["logits_views"][:, rows] = lg.cpu().numpy()
        row += len(x)
