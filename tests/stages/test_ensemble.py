"""`make ensemble`: members on the same folds, aligned by image id, three combiners scored out of fold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ichpipe.base.config import ConfigError, load_config, save_config
from ichpipe.base.errors import InputError
from ichpipe.base.label_csv import wide_to_long
from ichpipe.base.labels import LABELS
from ichpipe.fitting.stackers import fit_weights, neighbour_features
from ichpipe.scoring.folds import record_fold_table
from ichpipe.scoring.metrics import weighted_log_loss
from ichpipe.scoring.submission import current_submission, info_path
from ichpipe.stages.ensemble import run_ensemble

REPO = Path(__file__).resolve().parents[2]
L = list(LABELS)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _dataset(root: Path, rng, n_train=24, n_test=6, slices=12, n_folds=4):
    """Metadata of one series per patient, each with a contiguous run of bleeding slices (or none)."""
    rows = []
    for p in range(n_train + n_test):
        split = "train" if p < n_train else "test"
        start, length = rng.integers(0, slices - 4), rng.integers(0, 6)
        for s in range(slices):
            bleeding = start <= s < start + length
            y = [float(bleeding and rng.random() < 0.6) for _ in L[:-1]]
            y.append(float(bleeding))
            rows.append({"image_id": f"ID_{p:04d}{s:04d}", "split": split, "PatientID": f"P{p}",
                         "StudyInstanceUID": f"S{p}", "SeriesInstanceUID": f"R{p}", "slice_index": s,
                         **dict(zip(L, y, strict=True)), "fold": p % n_folds if split == "train" else pd.NA})
    meta = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # rows not in z order
    meta["fold"] = meta.fold.astype("Int64")
    (root / "processed").mkdir(parents=True)
    stored = meta.copy()
    stored.loc[stored.split == "test", L] = np.nan  # as stage 1: test images have no labels
    stored.to_parquet(root / "processed" / "metadata.parquet")
    test = meta[meta.split == "test"].set_index("image_id")[L]
    wide_to_long(test).to_csv(root / "synthetic_test_labels.csv", index=False)
    wide_to_long(test * 0 + 0.5).to_csv(root / "stage_2_sample_submission.csv", index=False)
    return meta  # with the test set's true labels, to make members from


def _member(root: Path, name: str, meta: pd.DataFrame, probs: pd.DataFrame, fold_meta: pd.DataFrame | None = None,
            skip_runs: bool = False):
    """An experiment after stage 5: fold folders with folds.json and the two prediction tables."""
    for k in [] if skip_runs else sorted(meta.fold.dropna().unique()):
        run = root / "runs" / name / f"fold{k}"
        run.mkdir(parents=True)
        record_fold_table(run, meta if fold_meta is None else fold_meta)
    labelled = meta.fold.notna().to_numpy()
    for where, rows in (("oof", labelled), ("test", ~labelled)):
        table = probs.reindex(meta.image_id[rows]).dropna().rename_axis("image_id").reset_index().assign(model="blend")
        (root / "runs" / name / "blend").mkdir(exist_ok=True)
        table[["image_id", "model", *L]].to_parquet(root / "runs" / name / "blend" / f"{where}_predictions.parquet")


def _probs(meta: pd.DataFrame, rng, shift: int = 0, noise: float = 1.0, signal: float = 3.0) -> pd.DataFrame:
    """A member's probabilities: the labels of the slice ``shift`` places further along z, plus noise."""
    by_z = meta.sort_values(["PatientID", "slice_index"])
    y = by_z[L].to_numpy()
    labels = np.zeros_like(y)
    for _, idx in by_z.reset_index(drop=True).groupby("PatientID").indices.items():
        src = np.clip(np.arange(len(idx)) + shift, 0, len(idx) - 1)
        labels[idx] = y[idx[src]]
    logits = signal * (2 * labels - 1) + rng.normal(0, noise, labels.shape)
    return pd.DataFrame(_sigmoid(logits), index=by_z.image_id.to_numpy(), columns=L)


def _cfg(root: Path, *overrides: str):
    return load_config(overrides=[f"data.root={root}", f"blend.out_dir={root / 'subs'}", *overrides])


def test_fitted_weights_favour_the_informative_member():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (400, 6)).astype(float)
    good = _sigmoid(3 * (2 * y - 1) + rng.normal(0, 1, y.shape))
    noise = rng.uniform(0.05, 0.95, y.shape)
    for space in ("prob", "logit"):
        w = fit_weights(np.stack([good, noise]), y, space)
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-6)
        assert (w >= 0).all()
        assert (w[0] > 0.85).all(), (space, w)


def test_neighbour_features_follow_z_order_not_row_order():
    rows = pd.DataFrame({"PatientID": ["a", "a", "a", "b", "b"], "StudyInstanceUID": ["s", "s", "s", "t", "t"],
                         "SeriesInstanceUID": ["r", "r", "r", "q", "q"], "slice_index": [2, 0, 1, 1, 0]})
    p = np.full((1, 5, 6), 0.5)
    p[0, :, 0] = [0.9, 0.1, 0.5, 0.8, 0.2]  # class 0 by row; in z order: a = 0.1, 0.5, 0.9; b = 0.2, 0.8
    f = neighbour_features(p, rows, [1])
    lg = np.log(p[0, :, 0] / (1 - p[0, :, 0]))
    # blocks of 6: slice, z-1, z+1, series max, series mean; class 0 is column 0 of each block
    np.testing.assert_allclose(f[:, 0], lg)
    np.testing.assert_allclose(f[:, 6], lg[[2, 1, 1, 4, 4]])  # z-1 (the first slice repeats itself)
    np.testing.assert_allclose(f[:, 12], lg[[0, 2, 0, 3, 3]])  # z+1 (the last slice repeats itself)
    np.testing.assert_allclose(f[:, 18], lg[[0, 0, 0, 3, 3]])  # series max
    np.testing.assert_allclose(f[:, 24], [lg[:3].mean()] * 3 + [lg[3:].mean()] * 2, atol=1e-12)


@pytest.mark.parametrize("stacker", [["ensemble.stacker.model=logistic"], [
    "ensemble.stacker.model=hgb", "ensemble.stacker.min_samples_leaf=5", "ensemble.stacker.max_leaf_nodes=8",
    "ensemble.stacker.max_iter=100"]], ids=["logistic", "hgb"])
def test_ensemble_scores_members_and_combiners_out_of_fold(tmp_path, stacker):
    rng = np.random.default_rng(1)
    meta = _dataset(tmp_path, rng)
    # Member a is right one slice late, member b is pure noise: weights must drop b, and only the stacker
    # (which sees the slice at z+1) can undo a's shift.
    _member(tmp_path, "a", meta, _probs(meta, rng, shift=1))
    _member(tmp_path, "b", meta, pd.DataFrame(rng.uniform(0.2, 0.8, (len(meta), 6)), index=meta.image_id, columns=L))
    result = run_ensemble(_cfg(tmp_path, "ensemble.members=[a, b]", "ensemble.name=ab", *stacker))
    oof = {m: s.weighted for m, s in result.scores["oof"].items()}
    assert set(oof) == {"a", "b", "mean", "weights", "stacker", "final"}
    assert oof["weights"] < oof["mean"] and oof["weights"] < oof["b"]
    assert oof["stacker"] < 0.8 * oof["a"], oof
    assert result.final == "stacker" and oof["final"] == oof["stacker"]
    for label, w in result.detail["weights"]["per_class"].items():
        assert w["a"] > 0.7, (label, w)
    # The OOF table is the predictions' own score: recompute it from the written file.
    written = pd.read_parquet(tmp_path / "runs" / "ab" / "blend" / "oof_predictions.parquet")
    stack = written[written.model == "stacker"].set_index("image_id").loc[meta.image_id[meta.fold.notna()], L]
    truth = meta.set_index("image_id").loc[stack.index, L].to_numpy(float)
    assert weighted_log_loss(truth, stack.to_numpy()) == pytest.approx(oof["stacker"])
    # The submission: validated, named after the ensemble, its YAML names members, combiner and weights.
    path = result.path
    assert path.exists() and path.name.endswith(f"_ab_cv{oof['final']:.4f}.csv.gz")
    info = yaml.safe_load(info_path(path).read_text())
    assert info["combiner"] == "stacker" and set(info["members"]) == {"a", "b"}
    assert info["detail"]["weights"]["per_class"]["any"]["a"] > 0.7
    assert "test" in result.scores and result.scores["test"]["stacker"].weighted < \
        result.scores["test"]["a"].weighted


def test_a_member_better_than_every_combiner_is_the_final(tmp_path):
    """The mean of a good and a useless member is worse than the good one: submit the good one, not the mean."""
    rng = np.random.default_rng(3)
    meta = _dataset(tmp_path, rng)
    _member(tmp_path, "good", meta, _probs(meta, rng))
    _member(tmp_path, "noise", meta, pd.DataFrame(rng.uniform(0.2, 0.8, (len(meta), 6)), index=meta.image_id,
                                                  columns=L))
    result = run_ensemble(_cfg(tmp_path, "ensemble.members=[good, noise]", "ensemble.name=gn",
                               "ensemble.combiners=[mean]"))
    oof = {m: s.weighted for m, s in result.scores["oof"].items()}
    assert oof["good"] < oof["mean"] < oof["noise"]
    assert result.final == "good" and oof["final"] == oof["good"]
    info = yaml.safe_load(info_path(result.path).read_text())
    assert info["combiner"] == "good" and info["cv"]["oof"]["weighted"] == pytest.approx(oof["good"])
    cfg = _cfg(tmp_path, "ensemble.members=[good, noise]", "ensemble.name=gn")
    assert current_submission(cfg) == result.path  # make submit with an ensemble's config: the ensemble's final
    with pytest.raises(ConfigError, match="ensemble.final='best': auto, one of ensemble.combiners"):
        _cfg(tmp_path, "ensemble.members=[good, noise]", "ensemble.final=best")  # refused when the config is read


def test_members_on_other_folds_or_missing_rows_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    meta = _dataset(tmp_path, rng)
    probs = _probs(meta, rng)
    _member(tmp_path, "a", meta, probs)
    other = meta.assign(fold=(meta.fold + 1) % 4)
    _member(tmp_path, "b", meta, probs, fold_meta=other)
    with pytest.raises(InputError, match=r"runs/b/fold0: trained on fold table"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, b]"))
    _member(tmp_path, "c", meta, probs.drop(index=meta.image_id[meta.fold == 2].iloc[0]))
    with pytest.raises(InputError, match=r"member c: no OOF prediction for 1 of 288 images"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, c]"))
    with pytest.raises(InputError, match="name at least two experiments"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a]"))
    with pytest.raises(InputError, match="runs/nope: no run folders"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, nope]"))


def test_ensemble_script_takes_members_on_the_command_line(tmp_path):
    rng = np.random.default_rng(3)
    meta = _dataset(tmp_path, rng)
    _member(tmp_path, "a", meta, _probs(meta, rng))
    _member(tmp_path, "b", meta, _probs(meta, rng, noise=2.0))
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "06_ensemble.py"), f"data.root={tmp_path}",
                          f"blend.out_dir={tmp_path / 'subs'}", "ensemble.combiners=[mean, weights]",
                          "--members", "a", "b"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "| mean |" in run.stdout and "| weights |" in run.stdout and "stacker" not in run.stdout
    assert "written and validated" in run.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "06_ensemble.py"), f"data.root={tmp_path}",
                          "ensemble.combiners=[median]", "--members", "a", "b"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr == ("error: ensemble.combiners[0]: one of mean, weights, stacker, context, sequence, got "
                          "'median'\n")


def _embedded_member(root: Path, name: str, meta: pd.DataFrame, rng, width: int, seeds=(None,), train=True):
    """A member after stage 3 (and 5): per fold (and seed), embeddings whose first columns carry the slice's labels
    with noise, of the fold's held-out patients, the CNN's training patients and the test set."""
    truth = meta.set_index("image_id")
    folds = sorted(int(k) for k in meta.fold.dropna().unique())
    for seed in seeds:
        base = root / "runs" / name / (f"seed{seed}" if seed is not None else "")
        for k in folds:
            run = base / f"fold{k}"
            folder = run / "embeddings" / "epoch00"
            folder.mkdir(parents=True)
            record_fold_table(run, meta)
            sets = {"oof": meta[meta.fold == k], "test": meta[meta.split == "test"]}
            if train:
                sets["train"] = meta[meta.fold.notna() & (meta.fold != k)]
            for where, rows in sets.items():
                y = truth.loc[rows.image_id, L].to_numpy(float)
                emb = rng.normal(0, 1, (len(rows), width)).astype(np.float32)
                emb[:, :6] += 2 * y
                pd.DataFrame({"image_id": rows.image_id}).to_csv(folder / f"{where}_ids.csv", index=False)
                np.save(folder / f"{where}_emb.npy", emb.astype(np.float16))
                logits = 2 * (2 * y - 1) + rng.normal(0, 2, y.shape)
                np.save(folder / f"{where}_logits.npy", logits.astype(np.float32))
            (folder / "done").write_text("none\n")
    _member(root, name, meta, _probs(meta, rng, noise=2.0), skip_runs=True)


def test_the_sequence_combiner_reads_each_folds_cnns_and_never_the_predicted_patients_labels(tmp_path, monkeypatch):
    from ichpipe.fitting import sequence_fit

    rng = np.random.default_rng(4)
    meta = _dataset(tmp_path, rng, n_train=16, n_test=4, n_folds=2)
    _embedded_member(tmp_path, "a", meta, rng, 12)
    _embedded_member(tmp_path, "b", meta, rng, 8, seeds=(0, 1))  # a bag of seeds: one block per seed
    calls, reads = [], []
    real_fit, real_features = sequence_fit.fit_predict, sequence_fit.member_features

    def fit_spy(feats, train_series, targets, lcfg, seed, **kw):
        target, series = targets[0]
        calls.append(({feats.patients[feats.series[i][0]] for i in train_series},
                      {target.patients[target.series[i][0]] for i in series}, target.labels is not None))
        return real_fit(feats, train_series, targets, lcfg, seed, **kw)

    def features_spy(folders, name, meta_):
        reads.append(([str(f) for f in folders], name))
        return real_features(folders, name, meta_)

    monkeypatch.setattr(sequence_fit, "fit_predict", fit_spy)
    monkeypatch.setattr(sequence_fit, "member_features", features_spy)
    seq = ["ensemble.combiners=[mean, sequence]", "ensemble.sequence.hidden=8", "ensemble.sequence.reduce_dim=8",
           "ensemble.sequence.epochs=8", "ensemble.sequence.bag_last=2", "ensemble.sequence.inner_folds=2",
           "ensemble.sequence.train_on=train_and_oof", "ensemble.sequence.lr=1e-2"]
    result = run_ensemble(_cfg(tmp_path, "ensemble.members=[a, b]", "ensemble.name=ab", *seq), progress=False)
    # per fold: 2 inner models + the refit; fold k's features are fold k's CNNs' (a, b seed 0, b seed 1), nothing else
    assert len(calls) == 6 and len(reads) == 6
    for folders, _ in reads:
        fold = folders[0].split("/fold")[1][0]
        assert len(folders) == 3 and all(f"/fold{fold}/embeddings/" in f for f in folders)
        assert sum("/b/seed" in f for f in folders) == 2
    labelled = meta[meta.fold.notna()]
    for trained, predicted, on_labelled in calls:
        if on_labelled:  # an inner model: it predicts patients it never trained on
            assert predicted and not trained & predicted
            assert len({int(f) for f in labelled[labelled.PatientID.isin(predicted)].fold}) == 1
    oof = result.scores["oof"]
    assert oof["sequence"].n_images == len(labelled)
    # it starts from the CNNs' mean logits and learns from the embeddings, which carry the labels
    start = []
    for k in (0, 1):
        folders = [tmp_path / "runs" / m / f"fold{k}" / "embeddings" / "epoch00" for m in ("a", "b/seed0", "b/seed1")]
        ids = pd.read_csv(folders[0] / "oof_ids.csv").image_id
        start.append(pd.DataFrame(_sigmoid(np.mean([np.load(f / "oof_logits.npy") for f in folders], axis=0)),
                                  index=ids, columns=L))
    start = pd.concat(start)
    assert oof["sequence"].weighted < 0.8 * weighted_log_loss(meta.set_index("image_id").loc[start.index, L].to_numpy(
        float), start.to_numpy())
    assert (tmp_path / "runs" / "ab" / "fold0" / "sequence" / "done").exists()
    calls.clear()
    again = run_ensemble(_cfg(tmp_path, "ensemble.members=[a, b]", "ensemble.name=ab", *seq), progress=False)
    assert calls == [] and again.scores["oof"]["sequence"].weighted == pytest.approx(oof["sequence"].weighted)
    with pytest.raises(ConfigError, match=r"sequence models made with other settings \(ensemble.sequence.hidden=8 "
                                          r"\(now 6\)\)"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, b]", "ensemble.name=ab", *seq, "ensemble.sequence.hidden=6"))


def test_the_sequence_combiner_refuses_members_without_what_it_reads(tmp_path):
    rng = np.random.default_rng(5)
    meta = _dataset(tmp_path, rng, n_train=8, n_test=2, n_folds=2)
    _embedded_member(tmp_path, "a", meta, rng, 6)
    _embedded_member(tmp_path, "notrain", meta, rng, 6, train=False)
    _member(tmp_path, "noemb", meta, _probs(meta, rng))
    seq = ["ensemble.combiners=[sequence]", "ensemble.sequence.epochs=1", "ensemble.sequence.bag_last=1"]
    with pytest.raises(InputError, match=r"runs/noemb/fold0/embeddings: no finished embeddings of member noemb; .*"
                                         r"`make embed experiment=noemb fold=0`"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, noemb]", *seq), progress=False)
    with pytest.raises(InputError, match=r"notrain/fold0/embeddings/epoch00: no training-patient embeddings; "
                                         r"ensemble.sequence.train_on=train needs every member embedded"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, notrain]", *seq, "ensemble.sequence.train_on=train"),
                     progress=False)


def test_a_bag_member_missing_a_seed_is_refused(tmp_path):
    rng = np.random.default_rng(6)
    meta = _dataset(tmp_path, rng, n_train=8, n_test=2, n_folds=2)
    _embedded_member(tmp_path, "a", meta, rng, 6)
    _embedded_member(tmp_path, "bag", meta, rng, 6, seeds=(0, 1))
    save_config(_cfg(tmp_path, "experiment=bag", "seeds=[0, 1]"), tmp_path / "runs" / "bag" / "blend" / "config.yaml")
    assert run_ensemble(_cfg(tmp_path, "ensemble.members=[a, bag]", "ensemble.combiners=[mean]"), progress=False)
    shutil.rmtree(tmp_path / "runs" / "bag" / "seed1")
    with pytest.raises(InputError, match=r"runs/bag/seed1: seed 1 of member bag's bag \[0, 1\] has no run folder"):
        run_ensemble(_cfg(tmp_path, "ensemble.members=[a, bag]", "ensemble.combiners=[mean]"), progress=False)
