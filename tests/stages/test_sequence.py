"""Stage 4: the sequence model's masking and neighbours, series order, nested folds without leakage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ichpipe.base.config import ConfigError, LstmConfig
from ichpipe.base.device import amp_settings, default_device
from ichpipe.base.errors import InputError
from ichpipe.base.labels import LABELS
from ichpipe.fitting import sequence_fit
from ichpipe.fitting.sequence_fit import fit_predict, load_features
from ichpipe.networks import sequence_models
from ichpipe.networks.sequence_models import SequenceModel, SliceFeatures
from ichpipe.scoring.metrics import weighted_log_loss
from ichpipe.stages.embed import embed_fold
from ichpipe.stages.sequence import train_sequence_fold
from ichpipe.stages.train import train_fold
from tests.conftest import _train_cfg

KINDS = sequence_models.KINDS
SKIP_KINDS = [k for k in KINDS if k != "lstm_2nd_place"]  # the kinds that add their output to the CNN logits


def _model(seed=0, emb_dim=5, kind="lstm"):
    torch.manual_seed(seed)
    model = SequenceModel(emb_dim, reduce_dim=4, hidden=6, dropout=0.0, kind=kind, heads=2).eval()
    torch.nn.init.normal_(model.head.weight)  # trained-looking head: the LSTM output matters
    return model


@pytest.mark.parametrize("kind", SKIP_KINDS)
def test_untrained_head_returns_the_cnn_logits(kind):
    torch.manual_seed(0)
    model = SequenceModel(5, reduce_dim=4, hidden=6, kind=kind, heads=2).eval()
    emb, logits = torch.randn(2, 7, 5), torch.randn(2, 7, 6)
    out = model(emb, logits, torch.tensor([7, 4]))
    torch.testing.assert_close(out[0], logits[0])
    torch.testing.assert_close(out[1, :4], logits[1, :4])
    assert (out[1, 4:] == 0).all()  # padding gives zeros, not predictions


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_a_series_prediction(kind):
    model = _model(kind=kind)
    emb, logits = torch.randn(1, 4, 5), torch.randn(1, 4, 6)
    alone = model(emb, logits, torch.tensor([4]))
    # The same series in a batch with a longer one, its padding filled with garbage.
    emb2, logits2 = torch.randn(2, 9, 5) * 100, torch.randn(2, 9, 6) * 100
    emb2[0, :4], logits2[0, :4] = emb[0], logits[0]
    batched = model(emb2, logits2, torch.tensor([4, 9]))
    torch.testing.assert_close(batched[0, :4], alone[0], rtol=1e-5, atol=1e-5)
    assert (batched[0, 4:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_each_slice_sees_both_neighbours(kind):
    model = _model(kind=kind)
    emb, logits, lengths = torch.randn(1, 6, 5), torch.randn(1, 6, 6), torch.tensor([6])
    base = model(emb, logits, lengths)
    for changed in (1, 4):  # a change at one slice moves the slices before and after it
        emb2 = emb.clone()
        emb2[0, changed] += 1.0
        out = model(emb2, logits, lengths)
        assert not torch.allclose(out[0, changed - 1], base[0, changed - 1])
        assert not torch.allclose(out[0, changed + 1], base[0, changed + 1])


def _series_features(rng, n_series=48, dim=8):
    """Series with bleeds over consecutive slices; the 'CNN' sees each slice with independent noise."""
    ids, emb, logits, labels, patients, series = [], [], [], [], [], []
    row = 0
    for s in range(n_series):
        n = int(rng.integers(10, 20))
        y = np.zeros((n, 6), np.float32)
        if s % 2:
            start = int(rng.integers(0, n - 5))
            y[start:start + 5, [1, 5]] = 1  # intraparenchymal + any over five slices
        noisy = y[:, 5] * 2 - 1 + rng.normal(0, 1.5, n)  # a weak per-slice signal
        e = rng.normal(0, 1, (n, dim)).astype(np.float32)
        e[:, 0] = noisy
        lg = np.tile(noisy[:, None] * 1.2 - 1.5, (1, 6)).astype(np.float32)
        ids += [f"ID_{row + i:09x}" for i in range(n)]
        emb.append(e)
        logits.append(lg)
        labels.append(y)
        patients += [f"P{s}"] * n
        series.append(np.arange(row, row + n))
        row += n
    return SliceFeatures(np.array(ids), np.concatenate(emb), np.concatenate(logits), np.concatenate(labels),
                         np.array(patients), series)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_models_learn_from_neighbouring_slices(kind):
    feats = _series_features(np.random.default_rng(0))
    train, val = list(range(36)), list(range(36, 48))
    cfg = LstmConfig(reduce_dim=8, hidden=16, epochs=25, bag_last=5, batch_size=4, lr=5e-3, dropout=0.1, kind=kind)
    (pred,), history = fit_predict(feats, train, [(feats, val)], cfg, seed=1)
    rows = np.concatenate([feats.series[i] for i in val])
    assert np.isnan(pred[np.concatenate([feats.series[i] for i in train])]).all()  # only the targets are predicted
    cnn = weighted_log_loss(feats.labels[rows], 1 / (1 + np.exp(-feats.logits[rows])))
    lstm = weighted_log_loss(feats.labels[rows], pred[rows])
    assert lstm < 0.7 * cnn, (kind, lstm, cnn)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(history) == 25 and "val_loss" in history[0]


@pytest.fixture(scope="module")
def embedded(processed):
    """A fold with at least two patients (the tiny set has 1-2 per fold), trained and embedded."""
    root, _, meta = processed
    patients = meta.groupby("fold").PatientID.nunique()
    assert patients.max() >= 2
    fold = int(patients.idxmax())
    cfg = _train_cfg(root, "lstm", "train.epochs=1", "embed.tta=[none]", "lstm.epochs=3", "lstm.bag_last=2",
                     "lstm.inner_folds=2", f"fold={fold}")
    train_fold(cfg, progress=False)
    embed_fold(cfg, progress=False)
    return root, meta, cfg


def test_features_are_series_in_z_order(embedded):
    root, meta, cfg = embedded
    feats = load_features(root / "runs" / "lstm" / f"fold{cfg.fold}" / "embeddings" / "epoch00", "oof", meta)
    rows = np.concatenate(feats.series)
    assert sorted(rows) == list(range(len(feats.ids)))  # every slice in exactly one series
    by_id = meta.set_index("image_id")
    for s in feats.series:
        part = by_id.loc[feats.ids[s]]
        assert part.SeriesInstanceUID.nunique() == 1
        assert (np.diff(part.z.to_numpy()) > 0).all()  # ordered by position, not by file name
        assert len(s) == part.series_length.iloc[0]


def test_nested_folds_never_train_on_the_predicted_patient(embedded, monkeypatch):
    root, meta, cfg = embedded
    calls = []
    real = sequence_fit.fit_predict

    def spy(feats, train_series, targets, lcfg, seed, **kw):
        train_patients = {feats.patients[feats.series[i][0]] for i in train_series}
        target = targets[0][0]
        predicted = {target.patients[target.series[i][0]] for i in targets[0][1]}
        calls.append((train_patients, predicted, target.labels is None))
        return real(feats, train_series, targets, lcfg, seed, **kw)

    monkeypatch.setattr(sequence_fit, "fit_predict", spy)
    results = train_sequence_fold(cfg, progress=False)
    fold_patients = set(meta[meta.fold == cfg.fold].PatientID)
    assert len(calls) == 3  # two inner folds, then the refit for the test set
    for train_patients, val_patients, _ in calls[:2]:
        assert train_patients and val_patients and not train_patients & val_patients
        assert train_patients | val_patients == fold_patients  # only the fold's own (held-out) patients
    refit_train, refit_predicted, on_test = calls[2]
    assert on_test and refit_train == fold_patients and refit_predicted == set(meta[meta.split == "test"].PatientID)
    out = root / "runs" / "lstm" / f"fold{cfg.fold}" / "lstm" / "epoch00"
    oof = pd.read_parquet(out / "oof.parquet")
    assert sorted(oof.image_id) == sorted(meta[meta.fold == cfg.fold].image_id)
    assert not oof[list(LABELS)].isna().any().any()
    test = pd.read_parquet(out / "test.parquet")
    assert sorted(test.image_id) == sorted(meta[meta.split == "test"].image_id)
    truth = meta.set_index("image_id").loc[oof.image_id, list(LABELS)].to_numpy()
    assert results["epoch00"].lstm == pytest.approx(weighted_log_loss(truth, oof[list(LABELS)].to_numpy()))
    history = pd.read_csv(out / "history.csv")
    assert sorted(history.inner_fold.unique()) == [0, 1] and len(history) == 6
    calls.clear()
    again = train_sequence_fold(cfg, progress=False)["epoch00"]  # done: read back, not retrained
    assert (again.cnn, again.lstm) == pytest.approx((results["epoch00"].cnn, results["epoch00"].lstm), rel=1e-6)
    assert calls == []
    # other LSTM settings: refused, naming them (before issue 23: replaced without being asked); replace=true redoes
    wider = _train_cfg(root, "lstm", "train.epochs=1", "embed.tta=[none]", "lstm.epochs=3", "lstm.bag_last=2",
                       "lstm.inner_folds=2", f"fold={cfg.fold}", "lstm.hidden=12")
    with pytest.raises(ConfigError, match=r"sequence models made with other settings \(lstm.hidden=64 \(now 12\)\)"):
        train_sequence_fold(wider, progress=False)
    assert calls == []
    wider.replace = True
    changed = train_sequence_fold(wider, progress=False)["epoch00"]
    assert len(calls) == 3 and changed.lstm != results["epoch00"].lstm
    assert yaml.safe_load((out / "config.yaml").read_text())["lstm"]["hidden"] == 12


def test_train_and_oof_adds_the_cnn_training_patients_but_never_the_predicted_one(processed, monkeypatch):
    root, _, meta = processed
    fold = int(meta.groupby("fold").PatientID.nunique().idxmax())
    cfg = _train_cfg(root, "lstm_train", "train.epochs=1", "embed.tta=[none]", "lstm.epochs=2", "lstm.bag_last=1",
                     "lstm.inner_folds=2", f"fold={fold}", "embed.train=true", "lstm.train_on=train_and_oof")
    train_fold(cfg, progress=False)
    embed_fold(cfg, progress=False)
    cnn_train = meta[meta.fold.notna() & (meta.fold != fold)]
    folder = root / "runs" / "lstm_train" / f"fold{fold}" / "embeddings" / "epoch00"
    assert sorted(pd.read_csv(folder / "train_ids.csv").image_id) == sorted(cnn_train.image_id)
    assert np.load(folder / "train_emb.npy").shape[0] == len(cnn_train)
    calls = []
    real = sequence_fit.fit_predict

    def spy(feats, train_series, targets, lcfg, seed, **kw):
        target, series = targets[0]
        calls.append(({feats.patients[feats.series[i][0]] for i in train_series},
                      {target.patients[target.series[i][0]] for i in series}))
        return real(feats, train_series, targets, lcfg, seed, **kw)

    monkeypatch.setattr(sequence_fit, "fit_predict", spy)
    train_sequence_fold(cfg, progress=False)
    fold_patients, train_patients = set(meta[meta.fold == fold].PatientID), set(cnn_train.PatientID)
    assert len(calls) == 3
    for trained_on, predicted in calls[:2]:  # inner folds: the CNN's training patients + the other inner group
        assert train_patients < trained_on and predicted <= fold_patients and not trained_on & predicted
    assert calls[2][0] == train_patients | fold_patients  # the refit for the test set
    oof = pd.read_parquet(root / "runs" / "lstm_train" / f"fold{fold}" / "lstm" / "epoch00" / "oof.parquet")
    assert sorted(oof.image_id) == sorted(meta[meta.fold == fold].image_id)
    assert not oof[list(LABELS)].isna().any().any()
    # train_on=train, the 2nd place's: one model on the CNN's training patients only, predicting the held-out
    # patients and the test set (both unseen by it and by the CNN); no inner folds
    calls.clear()
    only_train = _train_cfg(root, "lstm_train", "train.epochs=1", "embed.tta=[none]", "lstm.epochs=2",
                            "lstm.bag_last=2", f"fold={fold}", "embed.train=true", "lstm.train_on=train")
    with pytest.raises(ConfigError, match=r"lstm/epoch00: sequence models made with other settings \(.*lstm.train_on="
                                          r"'train_and_oof' \(now 'train'\).*add replace=true to redo it"):
        train_sequence_fold(only_train, progress=False)  # other settings: refused, the finished result kept
    assert calls == []
    only_train.replace = True
    result = train_sequence_fold(only_train, progress=False)["epoch00"]  # told to: redone
    assert calls == [(train_patients, fold_patients)]
    out = root / "runs" / "lstm_train" / f"fold{fold}" / "lstm" / "epoch00"
    oof = pd.read_parquet(out / "oof.parquet").set_index("image_id")
    assert sorted(oof.index) == sorted(meta[meta.fold == fold].image_id) and not oof.isna().any().any()
    truth = meta.set_index("image_id").loc[oof.index, list(LABELS)].to_numpy()
    assert result.lstm == pytest.approx(weighted_log_loss(truth, oof[list(LABELS)].to_numpy()))
    test = pd.read_parquet(out / "test.parquet").set_index("image_id")
    models, mean, std = sequence_models.load_models(out / "models.pt")
    assert len(models) == 2  # the model that made both predictions, bagged over its last 2 epochs
    feats = load_features(folder, "test", meta)
    device = default_device()
    again = sequence_models.predict_bag(models, feats, mean, std, device, amp_settings(only_train.train.amp, device))
    np.testing.assert_allclose(again, test.loc[feats.ids, list(LABELS)].to_numpy(), rtol=1e-5, atol=1e-6)
    history = pd.read_csv(out / "history.csv")
    assert history.inner_fold.tolist() == ["all", "all"] and history.val_loss.notna().all()
    (folder / "train_ids.csv").unlink()  # embedded without embed.train: a clear error, not a silent fallback
    (folder.parent.parent / "lstm" / "epoch00" / "done").unlink()
    with pytest.raises(InputError, match="needs `make embed fold=.* embed.train=true`"):
        train_sequence_fold(cfg, progress=False)
    with pytest.raises(ConfigError, match="lstm.train_on: one of oof, train, train_and_oof, got 'all'"):
        _train_cfg(root, "lstm_train", f"fold={fold}", "lstm.train_on=all")  # refused when the config is read


def test_missing_embeddings_and_bad_bagging_are_clear_errors(processed):
    root, _, _ = processed
    with pytest.raises(InputError, match="no finished embeddings; run `make embed fold=0` first"):
        train_sequence_fold(_train_cfg(root, "never_embedded"), progress=False)
    with pytest.raises(ConfigError, match="lstm.bag_last=9: must not exceed lstm.epochs=3"):
        _train_cfg(root, "x", "lstm.epochs=3", "lstm.bag_last=9")  # refused when the config is read, before any work


def test_cpu_results_equal_the_stored_reference_to_float32_rounding():
    # tests/stages/data/lstm_cpu_reference.npz was written by tests/stages/lstm_reference.py (its docstring says when
    # and why);
    # on the CPU a change that is not meant to move the numbers must not move them. Bit for bit on the machine that
    # wrote it; another CPU's vector kernels round some sums differently (2026-12-07: 3 of 408 values by 3e-8, one
    # float32 step), so the bound is a few float32 steps, far below what any change of the model or data moves.
    from tests.stages.lstm_reference import REFERENCE, compute

    reference, now = np.load(REFERENCE), compute()
    for key in ("val", "test", "val_loss"):
        np.testing.assert_allclose(now[key], reference[key], rtol=0, atol=1e-7, err_msg=key)


def test_the_saved_refit_reproduces_the_test_predictions(embedded):
    root, meta, cfg = embedded
    train_sequence_fold(cfg.model_copy(update={"replace": True}), progress=False)  # whatever a test before left
    folder = root / "runs" / "lstm" / f"fold{cfg.fold}"
    models, mean, std = sequence_models.load_models(folder / "lstm" / "epoch00" / "models.pt")
    assert len(models) == 2  # lstm.bag_last=2
    feats = load_features(folder / "embeddings" / "epoch00", "test", meta)
    device = default_device()  # as stage 4 ran: on the GPU with its mixed precision where there is one
    again = sequence_models.predict_bag(models, feats, mean, std, device, amp_settings(cfg.train.amp, device))
    saved = pd.read_parquet(folder / "lstm" / "epoch00" / "test.parquet").set_index("image_id").loc[feats.ids,
                                                                                                    list(LABELS)]
    np.testing.assert_allclose(again, saved.to_numpy(), rtol=1e-5, atol=1e-6)


def test_the_transformer_reads_slice_positions():
    model = _model(kind="transformer")
    emb, logits, lengths = torch.randn(1, 6, 5), torch.randn(1, 6, 6), torch.tensor([6])
    even = torch.arange(6.0)[None] * 5
    assert torch.allclose(model(emb, logits, lengths), model(emb, logits, lengths, even))  # default: 5 mm apart
    gap = even.clone()
    gap[0, 3:] += 40  # a 45 mm gap in the series: the same slices, another context
    assert not torch.allclose(model(emb, logits, lengths, gap), model(emb, logits, lengths, even))


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(InputError,
                       match="lstm.kind='rnn': one of lstm, gru, gru_attention, transformer, lstm_2nd_place"):
        SequenceModel(5, kind="rnn")
    with pytest.raises(ConfigError, match="lstm.kind: one of lstm, gru, gru_attention, transformer, lstm_2nd_place, "
                                          "got 'rnn'"):
        _train_cfg("data", "x", "lstm.kind=rnn")  # refused when the config is read


def test_the_2nd_place_network_is_theirs():
    # darraghdog/rsna scripts/trainlstm.py NeuralNet at 2048 units: lstm1 6144 -> 2 x 2048, lstm2 4096 -> 2 x 2048,
    # linear1/2 4096 -> 4096, hidden = h1 + h2 + relu(linear1(h1)) + relu(linear2(h2)) + [e, e], head 4096 -> 6
    model = SequenceModel(2048, reduce_dim=0, hidden=2048, layers=2, dropout=0.0, kind="lstm_2nd_place")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["lstms.0.weight_ih_l0"] == (4 * 2048, 3 * 2048) and shapes["lstms.1.weight_ih_l0"] == (4 * 2048, 4096)
    assert shapes["linears.0.weight"] == (4096, 4096) and shapes["head.weight"] == (6, 4096)
    # per BiLSTM 2 directions x 4 gates x 2048 x (inputs + 2048 + 2 biases); linears 4096 x (4096 + 1); head 6 x 4097
    assert sum(v.numel() for v in model.parameters()) == (
        2 * 4 * 2048 * (6144 + 2048 + 2) + 2 * 4 * 2048 * (4096 + 2048 + 2) + 2 * 4096 * 4097 + 6 * 4097) == 268_533_766
    # small: the sum, term by term, against the same computation written out
    torch.manual_seed(0)
    small = SequenceModel(3, reduce_dim=0, hidden=3, layers=2, dropout=0.0, kind="lstm_2nd_place").eval()
    emb, lengths = torch.randn(1, 5, 3), torch.tensor([5])
    e = emb
    x = torch.cat([e, e - torch.cat([e[:, :1], e[:, :-1]], 1), e - torch.cat([e[:, 1:], e[:, -1:]], 1)], -1)
    h1, _ = small.lstms[0](x)
    h2, _ = small.lstms[1](h1)
    hidden = h1 + h2 + torch.relu(small.linears[0](h1)) + torch.relu(small.linears[1](h2)) + torch.cat([e, e], -1)
    torch.testing.assert_close(small(emb, torch.zeros(1, 5, 6), lengths), small.head(hidden))
    # the CNN logits are no input of theirs
    torch.testing.assert_close(small(emb, torch.zeros(1, 5, 6), lengths), small(emb, torch.ones(1, 5, 6), lengths))


def test_float16_embeddings_give_the_float32_predictions_within_tolerance():
    feats = _series_features(np.random.default_rng(3), dim=32)
    feats.emb[:] = np.abs(feats.emb) * 0.7  # ReLU-pooled features: non-negative, ~0.5
    half = SliceFeatures(feats.ids, feats.emb.astype(np.float16), feats.logits, feats.labels, feats.patients,
                         feats.series)
    cfg = LstmConfig(reduce_dim=8, hidden=8, epochs=4, bag_last=2, batch_size=4, lr=5e-3, dropout=0.0)
    train, val = list(range(36)), list(range(36, 48))
    cpu = torch.device("cpu")
    (p32,), _ = fit_predict(feats, train, [(feats, val)], cfg, seed=1, device=cpu)
    (p16,), _ = fit_predict(half, train, [(half, val)], cfg, seed=1, device=cpu)
    rows = np.concatenate([feats.series[i] for i in val])
    # float16 keeps ~3 significant digits (relative error <= 2^-11); trained and predicted on them, the
    # probabilities stay within 1e-4 of float32's (measured 2026-12-01: 3.4e-6), the loss within 0.01%
    assert np.abs(p16[rows] - p32[rows]).max() < 1e-4
    l32, l16 = weighted_log_loss(feats.labels[rows], p32[rows]), weighted_log_loss(feats.labels[rows], p16[rows])
    assert abs(l16 - l32) < 1e-4 * l32
    # one trained model applied to both: within 5e-5 (measured: 2.3e-6)
    keep: dict = {}
    fit_predict(feats, train, [(feats, val)], cfg, seed=1, device=cpu, keep=keep)
    model = SequenceModel(32, **keep["lstm"])
    model.load_state_dict(keep["bag"][-1])
    a = sequence_models.predict_rows(model, feats, val, keep["mean"].numpy(), keep["std"].numpy(), 8, cpu)
    b = sequence_models.predict_rows(model, half, val, keep["mean"].numpy(), keep["std"].numpy(), 8, cpu)
    assert np.abs(a[rows] - b[rows]).max() < 5e-5


def test_the_standardisation_of_a_memory_mapped_float16_array_is_numpy_s(tmp_path):
    rng = np.random.default_rng(0)
    emb = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float16, shape=(1000, 7))
    emb[:] = rng.gamma(2.0, 0.3, (1000, 7))
    rows = rng.permutation(1000)[:600]
    mean, std = sequence_fit.standardisation(emb, rows, chunk=128)
    want = emb[rows].astype(np.float64)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, want.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, want.std(axis=0) + 1e-6, rtol=1e-5)


def test_pseudo_labelled_test_series_join_every_models_training_but_never_a_predicted_patient(embedded, monkeypatch):
    from tests.conftest import write_pseudo_source

    root, meta, cfg = embedded
    write_pseudo_source(root, "lstm_source", meta)
    calls = []
    real = sequence_fit.fit_predict

    def spy(feats, train_series, targets, lcfg, seed, **kw):
        target, series = targets[0]
        trained = {feats.patients[feats.series[i][0]]: feats.labels[feats.series[i]] for i in train_series}
        calls.append((trained, {target.patients[target.series[i][0]] for i in series}))
        return real(feats, train_series, targets, lcfg, seed, **kw)

    monkeypatch.setattr(sequence_fit, "fit_predict", spy)
    pcfg = _train_cfg(root, "lstm", "train.epochs=1", "embed.tta=[none]", "lstm.epochs=3", "lstm.bag_last=2",
                      "lstm.inner_folds=2", f"fold={cfg.fold}", "pseudo.source=lstm_source", "replace=true")
    train_sequence_fold(pcfg, progress=False)
    test_patients = set(meta[meta.split == "test"].PatientID)
    fold_patients = set(meta[meta.fold == cfg.fold].PatientID)
    assert len(calls) == 3
    for trained, predicted in calls[:2]:  # inner models: the other inner group + the pseudo-labelled test series
        assert test_patients <= set(trained) and not set(trained) & predicted and predicted <= fold_patients
        for patient in test_patients:  # with fold k's pseudo-labels (0.1 + 0.2 k)
            np.testing.assert_allclose(trained[patient], 0.1 + 0.2 * cfg.fold, rtol=1e-6)
    assert set(calls[2][0]) == fold_patients | test_patients  # the refit
    out = root / "runs" / "lstm" / f"fold{cfg.fold}" / "lstm" / "epoch00"
    assert json.loads((out / "pseudo.json").read_text())["slices"] == int((meta.split == "test").sum())
    calls.clear()
    train_sequence_fold(pcfg.model_copy(update={"replace": False}), progress=False)
    assert calls == []  # finished with these labels: kept
    write_pseudo_source(root, "lstm_source", meta, values=lambda k, n: np.full((n, 6), 0.3))
    train_sequence_fold(pcfg.model_copy(update={"replace": False}), progress=False)
    assert len(calls) == 3  # the source's labels changed: redone
