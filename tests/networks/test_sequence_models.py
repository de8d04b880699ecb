"""The sequence network's several-CNN input (blocks projected one by one), the lazy side-by-side features, and the
forward-and-backward test view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichpipe.base.errors import InputError
from ichpipe.networks.sequence_models import ConcatColumns, SequenceModel, SliceFeatures, predict_rows


def test_concat_columns_reads_each_array_in_its_own_row_order():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)).astype(np.float16), rng.normal(size=(5, 2)).astype(np.float32)
    to_a, to_b = np.array([4, 3, 2, 1, 0]), np.array([0, 2, 4, 1, 3])
    joined = ConcatColumns([a, b], [to_a, to_b])
    assert joined.shape == (5, 5) and joined.widths == (3, 2) and len(joined) == 5
    rows = np.array([3, 0, 3])
    np.testing.assert_array_equal(joined[rows], np.hstack([a[to_a[rows]].astype(np.float32), b[to_b[rows]]]))
    np.testing.assert_array_equal(joined[1:3], joined[np.array([1, 2])])


def test_blocks_are_projected_one_by_one():
    torch.manual_seed(0)
    model = SequenceModel(8, reduce_dim=4, hidden=6, dropout=0.0, blocks=(5, 3)).eval()
    assert [m[0].in_features for m in model.reduces] == [5, 3]
    torch.nn.init.normal_(model.head.weight)
    emb, logits, lengths = torch.randn(1, 6, 8), torch.randn(1, 6, 6), torch.tensor([6])
    out = model(emb, logits, lengths)
    first = model.reduces[0](emb[..., :5])
    changed = emb.clone()
    changed[..., 5:] += 1.0  # the second CNN's features change: the first block's projection does not
    torch.testing.assert_close(model.reduces[0](changed[..., :5]), first)
    assert not torch.allclose(model(changed, logits, lengths), out)
    with pytest.raises(InputError, match=r"feature blocks \(5, 2\) must add up to the width 8"):
        SequenceModel(8, reduce_dim=4, blocks=(5, 2))


def test_the_reverse_view_averages_the_series_read_forward_and_backward():
    rng = np.random.default_rng(1)
    n = 14
    series = [np.arange(0, 6), np.arange(6, 14)]
    feats = SliceFeatures(np.arange(n).astype(str), rng.normal(size=(n, 5)).astype(np.float32),
                          rng.normal(size=(n, 6)).astype(np.float32), None, np.zeros(n).astype(str), series)
    backward = SliceFeatures(feats.ids, feats.emb, feats.logits, None, feats.patients, [s[::-1] for s in series])
    torch.manual_seed(0)
    model = SequenceModel(5, reduce_dim=4, hidden=6, dropout=0.0).eval()
    torch.nn.init.normal_(model.head.weight)
    mean, std = np.zeros(5, np.float32), np.ones(5, np.float32)
    cpu = torch.device("cpu")
    forward = predict_rows(model, feats, [0, 1], mean, std, 4, cpu)
    back = predict_rows(model, backward, [0, 1], mean, std, 4, cpu)
    assert np.abs(forward - back).max() > 1e-3  # a bidirectional model still reads order: the views differ
    both = predict_rows(model, feats, [0, 1], mean, std, 4, cpu, reverse_view=True)
    np.testing.assert_allclose(both, (forward + back) / 2, rtol=1e-6, atol=1e-7)
