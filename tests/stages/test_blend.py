"""Stage 5: fold/bag averaging, the CV table, validated submissions with their YAML, `make submit`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ichpipe.base.config import load_config, save_config
from ichpipe.base.errors import InputError
from ichpipe.base.label_csv import wide_to_long
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import run_dir
from ichpipe.scoring.folds import record_fold_table
from ichpipe.scoring.metrics import weighted_log_loss
from ichpipe.scoring.results import weighted_mean
from ichpipe.scoring.submission import (
    NO_CREDENTIALS,
    SubmissionError,
    check_unchanged,
    current_submission,
    info_path,
    kaggle_credentials,
    submissions_dir,
    submit_to_kaggle,
)
from ichpipe.stages.blend import run_blend

REPO = Path(__file__).resolve().parents[2]
L = list(LABELS)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _frame(ids, values):
    return pd.DataFrame(values, index=pd.Index(ids, name="image_id"), columns=L)


def _experiment(root: Path, rng, n_folds=2, epochs=(0, 1), lstm=True, extra_sample_ids=(), seeds=()):
    """A fake experiment: metadata, per-fold CNN logits and LSTM probabilities with known values (``seeds``: a bag,
    each seed's runs under runs/exp/seed<s>/; ``known`` then keyed by seed first)."""
    rows = []
    for p in range(8):
        split = "test" if p >= 6 else "train"
        for s in range(5):
            y = rng.integers(0, 2, 6).astype(float) if split == "train" else [np.nan] * 6
            rows.append({"image_id": f"ID_{p:04x}{s:05x}", "split": split, "PatientID": f"P{p}", "slice_index": s,
                         **dict(zip(L, y, strict=True)), "fold": p % n_folds if split == "train" else pd.NA})
    meta = pd.DataFrame(rows)
    meta["fold"] = meta.fold.astype("Int64")
    (root / "processed").mkdir(parents=True)
    meta.to_parquet(root / "processed" / "metadata.parquet")
    test_ids = meta[meta.split == "test"].image_id.tolist()
    truth = _frame(test_ids, rng.integers(0, 2, (len(test_ids), 6)).astype(float))
    wide_to_long(truth).to_csv(root / "synthetic_test_labels.csv", index=False)
    sample = wide_to_long(_frame([*test_ids, *extra_sample_ids], 0.5))
    sample.to_csv(root / "stage_2_sample_submission.csv", index=False)
    cfg = load_config(overrides=[f"data.root={root}", "experiment=exp", f"blend.out_dir={root / 'subs'}",
                                 f"blend.lstm_weight={1 if lstm else 0}", f"seeds=[{','.join(map(str, seeds))}]"])
    if seeds:
        bag = {s: _runs(root / "runs" / "exp" / f"seed{s}", cfg, meta, test_ids, rng, n_folds, epochs, lstm)
               for s in seeds}
        return cfg, meta, truth, bag
    return cfg, meta, truth, _runs(root / "runs" / "exp", cfg, meta, test_ids, rng, n_folds, epochs, lstm)


def _runs(experiment: Path, cfg, meta, test_ids, rng, n_folds, epochs, lstm) -> dict:
    known = {"cnn": {}, "lstm": {}}
    for k in range(n_folds):
        run = experiment / f"fold{k}"
        run.mkdir(parents=True)
        cfg.fold = k
        save_config(cfg, run / "config.yaml")
        record_fold_table(run, meta)  # as stage 2 does
        sets = {"oof": meta[meta.fold == k].image_id.tolist(), "test": test_ids}
        for e in epochs:
            folder = run / "embeddings" / f"epoch{e:02d}"
            folder.mkdir(parents=True)
            for name, ids in sets.items():
                logits = rng.normal(0, 2, (len(ids), 6)).astype(np.float32)
                pd.DataFrame({"image_id": ids}).to_csv(folder / f"{name}_ids.csv", index=False)
                np.save(folder / f"{name}_logits.npy", logits)
                known["cnn"][k, e, name] = _frame(ids, _sigmoid(logits.astype(np.float64)))
            (folder / "done").write_text("none\n")
            if lstm:
                folder = run / "lstm" / f"epoch{e:02d}"
                folder.mkdir(parents=True)
                for name, ids in sets.items():
                    probs = rng.uniform(0.01, 0.99, (len(ids), 6)).astype(np.float32)
                    pd.DataFrame(probs, columns=L).assign(image_id=ids).to_parquet(folder / f"{name}.parquet")
                    known["lstm"][k, e, name] = _frame(ids, probs.astype(np.float64))
                save_config(cfg, folder / "config.yaml")
                (folder / "done").write_text("2 inner folds\n")
    cfg.fold = 0
    return known


def test_a_bag_of_seeds_blends_the_mean_of_its_seeds(tmp_path):
    rng = np.random.default_rng(7)
    cfg, meta, truth, bag = _experiment(tmp_path, rng, lstm=False, seeds=(3, 5))
    cfg.blend.clip = 0
    result = run_blend(cfg, today=dt.date(2026, 12, 7))
    out = tmp_path / "runs" / "exp" / "blend"
    assert result.cv_dir == out and not (tmp_path / "runs" / "exp" / "seed3" / "blend").exists()
    oof = pd.read_parquet(out / "oof_predictions.parquet")
    labelled = meta[meta.fold.notna()]

    def seed_oof(s):  # each seed's bag of epochs, fold by fold
        return pd.concat([(bag[s]["cnn"][k, 0, "oof"] + bag[s]["cnn"][k, 1, "oof"]) / 2 for k in (0, 1)])

    want = (seed_oof(3) + seed_oof(5).loc[seed_oof(3).index]) / 2
    got = oof[oof.model == "blend"].set_index("image_id").loc[want.index, L]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
    for s in (3, 5):  # each seed's own final blend beside the bag's, to see the seeds' spread
        one = oof[oof.model == f"blend_seed{s}"].set_index("image_id").loc[want.index, L]
        np.testing.assert_allclose(one.to_numpy(), seed_oof(s).loc[want.index].to_numpy(), rtol=1e-6)
    assert set(result.scores["oof"]) >= {"blend", "blend_seed3", "blend_seed5"}
    assert result.scores["oof"]["blend"].n_images == len(labelled)
    # each fold's test predictions, averaged over the seeds, for a pseudo-label round
    by_fold = pd.read_parquet(out / "test_by_fold.parquet")
    fold1 = by_fold[(by_fold.model == "blend") & (by_fold.fold == 1)].set_index("image_id")[L]
    want1 = (bag[3]["cnn"][1, 0, "test"] + bag[3]["cnn"][1, 1, "test"] + bag[5]["cnn"][1, 0, "test"]
             + bag[5]["cnn"][1, 1, "test"]) / 4
    np.testing.assert_allclose(fold1.loc[want1.index].to_numpy(), want1.to_numpy(), rtol=1e-6)
    # a seed of the bag without its run: a one-line error naming it
    shutil.rmtree(tmp_path / "runs" / "exp" / "seed5")
    with pytest.raises(InputError, match=r"runs/exp/seed5: seed 5 of the bag \[3, 5\] has no run"):
        run_blend(cfg)
    with pytest.raises(InputError, match=r"seed=4: not one of seeds \[3, 5\]"):
        run_dir(cfg.model_copy(update={"seed": 4}))


def test_weighted_mean_aligns_rows_by_image_id():
    a = _frame(["x", "y"], [[0.2] * 6, [0.4] * 6])
    b = _frame(["y", "x"], [[1.0] * 6, [0.8] * 6])
    out = weighted_mean([a, b], [1.0, 3.0])
    np.testing.assert_allclose(out.loc["x"], 0.25 * 0.2 + 0.75 * 0.8)
    np.testing.assert_allclose(out.loc["y"], 0.25 * 0.4 + 0.75 * 1.0)
    with pytest.raises(InputError, match="must sum to more than 0"):
        weighted_mean([a, b], [0.0, 0.0])


def test_blend_scores_every_model_and_writes_validated_submissions(tmp_path):
    root = tmp_path / "root"
    cfg, meta, truth, known = _experiment(root, np.random.default_rng(0), extra_sample_ids=["ID_unreadable"])
    cfg.preprocess.max_bad_fraction = 0.1  # 1 of 11 test images unreadable: within the limit
    cfg.blend.epoch_weights = {0: 1.0, 1: 3.0}
    cfg.blend.lstm_weight = 0.6
    cfg.blend.clip = 1e-3
    result = run_blend(cfg, today=dt.date(2026, 11, 23))

    labelled = meta[meta.fold.notna()].set_index("image_id")
    clip = (1e-3, 1 - 1e-3)
    bag = {kind: {(k, name): (known[kind][k, 0, name] + 3 * known[kind][k, 1, name]) / 4
                  for k in range(2) for name in ("oof", "test")} for kind in ("cnn", "lstm")}
    oof = {
        "prior": pd.concat([_frame(labelled.index[labelled.fold == k],
                                   np.tile(labelled[labelled.fold != k][L].mean().to_numpy(), (5 * 3, 1)))
                            for k in range(2)]),
        "cnn_single": pd.concat([known["cnn"][k, 1, "oof"] for k in range(2)]),
        "cnn_bagged": pd.concat([bag["cnn"][k, "oof"] for k in range(2)]),
        "lstm": pd.concat([bag["lstm"][k, "oof"] for k in range(2)]),
    }
    oof["blend"] = 0.6 * oof["lstm"] + 0.4 * oof["cnn_bagged"]
    cv = json.loads((root / "runs" / "exp" / "blend" / "cv.json").read_text())
    for model, pred in oof.items():
        y = labelled.loc[pred.index, L].to_numpy()
        expected = weighted_log_loss(y, pred.clip(*clip).to_numpy())
        assert cv["oof"][model]["weighted"] == pytest.approx(expected, rel=1e-6), model
        assert cv["oof"][model]["n_images"] == 30
    test_blend = (0.6 * (bag["lstm"][0, "test"] + bag["lstm"][1, "test"]) / 2
                  + 0.4 * (bag["cnn"][0, "test"] + bag["cnn"][1, "test"]) / 2).clip(*clip)
    assert cv["test"]["blend"]["weighted"] == pytest.approx(
        weighted_log_loss(truth[L].to_numpy(), test_blend.loc[truth.index].to_numpy()), rel=1e-6)
    assert cv["used"]["cnn_epochs"] == {"0": [0, 1], "1": [0, 1]}
    table = (root / "runs" / "exp" / "blend" / "cv.md").read_text()
    assert f"| lstm | {cv['oof']['lstm']['weighted']:.4f} |" in table and "**test**" in table

    score = cv["oof"]["blend"]["weighted"]
    final = root / "subs" / f"2026-11-23_exp_cv{score:.4f}.csv.gz"
    assert result.written["blend"].path == final
    with gzip.open(final, "rt") as f:
        sub = pd.read_csv(f).set_index("ID").Label
    assert len(sub) == 6 * 11
    for image_id in truth.index[:3]:
        for label in L:
            assert sub[f"{image_id}_{label}"] == pytest.approx(test_blend.loc[image_id, label], rel=1e-5)
    prior = labelled[L].mean()
    assert sub["ID_unreadable_any"] == pytest.approx(prior["any"], rel=1e-5)  # no prediction: the prior
    assert result.written["blend"].filled == 1
    info = yaml.safe_load(final.with_name(final.name.replace(".csv.gz", ".yaml")).read_text())
    assert info["model"] == "blend" and info["cv"]["oof"]["weighted"] == pytest.approx(score)
    assert len(info["git"]["commit"]) == 40 and info["configs"]["cnn"]["experiment"] == "exp"
    assert info["configs"]["blend"]["blend"]["lstm_weight"] == 0.6
    cnn = root / "subs" / f"2026-11-23_exp-cnn_cv{cv['oof']['cnn_bagged']['weighted']:.4f}.csv.gz"
    assert cnn.exists() and cnn.with_name(cnn.name.replace(".csv.gz", ".yaml")).exists()
    preds = pd.read_parquet(root / "runs" / "exp" / "blend" / "oof_predictions.parquet")
    assert sorted(preds.model.unique()) == sorted(oof)


def _exp_cfg(root, *overrides):
    return load_config(overrides=[f"data.root={root}", "experiment=exp", f"blend.out_dir={root / 'subs'}", *overrides])


def test_weights_given_as_overrides_or_yaml_are_used_and_unknown_keys_refused(tmp_path):
    root = tmp_path / "root"
    _, meta, _, known = _experiment(root, np.random.default_rng(5))
    labelled = meta[meta.fold.notna()].set_index("image_id")
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text("blend:\n  epoch_weights: {0: 0.0}\n  fold_weights: {1: 0.0}\n")
    for cfg in (_exp_cfg(root, "blend.epoch_weights.0=0", "blend.fold_weights.1=0"),
                load_config(yaml_file, [f"data.root={root}", "experiment=exp", f"blend.out_dir={root / 'subs'}"])):
        assert cfg.blend.epoch_weights == {0: 0.0} and cfg.blend.fold_weights == {1: 0.0}  # integer keys
        scores = run_blend(cfg).scores
        # epoch 0 weighs nothing: the bag is epoch 1 alone, exactly
        bagged = pd.concat([known["cnn"][k, 1, "oof"] for k in range(2)])
        y = labelled.loc[bagged.index, L].to_numpy()
        assert scores["oof"]["cnn_bagged"].weighted == pytest.approx(
            weighted_log_loss(y, bagged.clip(1e-5, 1 - 1e-5).to_numpy()), rel=1e-9)
    with pytest.raises(InputError, match=r"blend.epoch_weights: no embedded epoch \[7\] in this experiment"):
        run_blend(_exp_cfg(root, "blend.epoch_weights.7=0.5"))
    with pytest.raises(InputError, match=r"blend.fold_weights: no fold \[3\] in the metadata"):
        run_blend(_exp_cfg(root, "blend.fold_weights.3=2"))


def test_fold_weight_zero_drops_that_folds_test_predictions(tmp_path):
    root = tmp_path / "root"
    _, _, truth, known = _experiment(root, np.random.default_rng(6), lstm=False)
    cfg = _exp_cfg(root, "blend.fold_weights.1=0", "blend.clip=0", "blend.lstm_weight=0")
    result = run_blend(cfg)
    fold0 = (known["cnn"][0, 0, "test"] + known["cnn"][0, 1, "test"]) / 2
    with gzip.open(result.written["cnn_bagged"].path, "rt") as f:
        sub = pd.read_csv(f).set_index("ID").Label
    image_id = truth.index[0]
    assert sub[f"{image_id}_any"] == pytest.approx(fold0.loc[image_id, "any"], rel=1e-5)


def test_missing_oof_rows_and_mismatched_epochs_are_errors_not_a_smaller_cv(tmp_path):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(7), lstm=False)
    folder = root / "runs" / "exp" / "fold1" / "embeddings" / "epoch01"
    ids = pd.read_csv(folder / "oof_ids.csv")
    ids.iloc[:-2].to_csv(folder / "oof_ids.csv", index=False)
    np.save(folder / "oof_logits.npy", np.load(folder / "oof_logits.npy")[:-2])
    with pytest.raises(InputError,
                       match=r"fold1/embeddings/epoch01: OOF predictions of fold 1 miss 2 of its 15 images"):
        run_blend(cfg)
    # test rows that differ between two epoch folders of a fold
    cfg, *_ = _experiment(tmp_path / "b", np.random.default_rng(7), lstm=False)
    folder = tmp_path / "b" / "runs" / "exp" / "fold0" / "embeddings" / "epoch01"
    ids = pd.read_csv(folder / "test_ids.csv")
    ids.loc[0, "image_id"] = "ID_elsewhere"
    ids.to_csv(folder / "test_ids.csv", index=False)
    with pytest.raises(InputError, match=r"epoch01: holds 10 images, 1 of them not in .*epoch00 \(10 images\)"):
        run_blend(cfg)


def test_too_many_test_images_without_a_prediction_stop_the_blend(tmp_path):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(8), extra_sample_ids=["ID_lost1", "ID_lost2"])
    cfg.preprocess.max_bad_fraction = 0.1
    with pytest.raises(InputError, match=r"2 of 12 test images have no prediction, more than "
                                         r"preprocess.max_bad_fraction=0.1"):
        run_blend(cfg)
    assert not list(root.glob("subs/*.csv.gz"))  # nothing written


def test_runs_on_other_folds_are_refused(tmp_path):
    root = tmp_path / "root"
    cfg, meta, _, _ = _experiment(root, np.random.default_rng(9), lstm=False)
    moved = meta.copy()
    moved.loc[moved.PatientID == "P0", "fold"] = 1  # one patient changes fold after the runs were trained
    moved.to_parquet(root / "processed" / "metadata.parquet")
    with pytest.raises(InputError, match=r"fold0: trained on fold table [0-9a-f]{16} \(2 folds, 6 patients\) but "
                                         r"the metadata now has [0-9a-f]{16}"):
        run_blend(cfg)


def test_blend_without_lstm_and_with_a_missing_fold(tmp_path):
    cfg, *_ = _experiment(tmp_path / "a", np.random.default_rng(1), lstm=False)
    cv = run_blend(cfg).scores["oof"]  # blend.lstm_weight=0: a CNN-only blend, asked for
    assert "lstm" not in cv and cv["blend"].weighted == cv["cnn_bagged"].weighted
    cfg.blend.lstm_weight = 1.0  # before any LSTM has run, the final blend is not silently the CNN's
    with pytest.raises(InputError, match=r"no LSTM output in any fold, but blend.lstm_weight=1.0; run `make lstm`, "
                                         r"or add blend.lstm_weight=0"):
        run_blend(cfg)
    cfg, *_ = _experiment(tmp_path / "b", np.random.default_rng(1))
    for p in (tmp_path / "b" / "runs" / "exp" / "fold1" / "lstm").glob("*/done"):
        p.unlink()
    with pytest.raises(InputError, match=r"no LSTM output for fold\(s\) \[1\]; run `make lstm fold=1`"):
        run_blend(cfg)


def test_an_invalid_submission_is_never_left_behind(tmp_path):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(2))
    logits = root / "runs" / "exp" / "fold0" / "embeddings" / "epoch01" / "test_logits.npy"
    bad = np.load(logits)
    bad[0, 0] = np.nan
    np.save(logits, bad)
    cfg.blend.lstm_weight = 0.0  # the final blend is the CNN: its NaN reaches the submission
    with pytest.raises(SubmissionError, match="empty, NaN or non-numeric labels"):
        run_blend(cfg)
    assert not list((root / "subs").glob("*.csv.gz")) and not list((root / "subs").glob(".*"))


def _fake_kaggle(folder: Path) -> Path:
    """A stand-in for the kaggle CLI that records its arguments."""
    exe = folder / "kaggle"
    exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                   f"open({str(folder / 'args.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_credentials_are_found_where_the_cli_looks(tmp_path):
    assert kaggle_credentials({"HOME": str(tmp_path)}) is None
    assert kaggle_credentials({"HOME": str(tmp_path), "KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}).startswith("the "
                                                                                                             "KAGGLE")
    (tmp_path / ".config" / "kaggle").mkdir(parents=True)
    (tmp_path / ".config" / "kaggle" / "kaggle.json").write_text("{}")
    assert kaggle_credentials({"HOME": str(tmp_path)}) == str(tmp_path / ".config" / "kaggle" / "kaggle.json")


def test_submit_script(tmp_path):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(3))
    run_blend(cfg, today=dt.date(2026, 11, 23))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_kaggle(bin_dir)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE")}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    args = [sys.executable, str(REPO / "scripts" / "08_submit.py"), f"data.root={root}", "experiment=exp",
            f"blend.out_dir={root / 'subs'}"]
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {NO_CREDENTIALS}"
    assert not (bin_dir / "args.json").exists() and "uploading" not in res.stdout  # checked before it says so

    secret = "0123456789abcdef-secret"
    res = subprocess.run(args, capture_output=True, text=True, env={**env, "KAGGLE_USERNAME": "me",
                                                                    "KAGGLE_KEY": secret},
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout + res.stderr
    sent = json.loads((bin_dir / "args.json").read_text())
    final = next(p for p in (root / "subs").glob("*_exp_cv*.csv.gz"))
    assert sent[:6] == ["competitions", "submit", "-c", "rsna-intracranial-hemorrhage-detection", "-f", str(final)]
    assert sent[6] == "-m" and sent[7].startswith("ichpipe exp: blend, OOF ")
    assert f"uploading {final} (data root {root.resolve()})" in res.stdout


def test_submit_takes_the_submission_of_the_current_data_root(tmp_path):
    cfg_a, *_ = _experiment(tmp_path / "a", np.random.default_rng(3))
    cfg_b, *_ = _experiment(tmp_path / "b", np.random.default_rng(4))
    cfg_b.blend.out_dir = cfg_a.blend.out_dir  # one submissions/ folder for both data roots
    a = run_blend(cfg_a, today=dt.date(2026, 11, 23)).written["blend"].path
    b = run_blend(cfg_b, today=dt.date(2026, 11, 24)).written["blend"].path  # newer, of the other root
    assert yaml.safe_load(info_path(a).read_text())["work_dir"] == str((tmp_path / "a").resolve())
    assert current_submission(cfg_a) == Path(a)  # was: b, the newest file of that experiment's name
    assert current_submission(cfg_b) == Path(b)
    cfg_c = load_config(overrides=[f"data.root={tmp_path / 'c'}", "experiment=exp",
                                   f"blend.out_dir={tmp_path / 'a' / 'subs'}"])
    with pytest.raises(InputError, match=r"c/runs/exp/blend/submissions.json: not found; run `make submission` "
                                         r"first \(data root .*c\)$"):
        current_submission(cfg_c)


def test_submissions_go_under_the_work_folder_not_the_installed_package(tmp_path):
    cfg, *_ = _experiment(tmp_path / "root", np.random.default_rng(3))
    cfg.blend.out_dir = "submissions"  # the default: relative
    written = run_blend(cfg, today=dt.date(2026, 11, 23)).written
    assert written["blend"].path.parent == tmp_path / "root" / "submissions"  # was: <repository>/submissions
    assert current_submission(cfg) == written["blend"].path
    cfg.data.work_dir = str(tmp_path / "work")  # outputs elsewhere (a read-only data root): submissions follow
    assert submissions_dir(cfg) == tmp_path / "work" / "submissions"


def test_submit_takes_only_the_current_blend_s_unchanged_submission(tmp_path, monkeypatch):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(3))
    run_blend(cfg, today=dt.date(2026, 11, 23))
    subs = root / "subs"
    (final,) = subs.glob("2026-11-23_exp_cv*.csv.gz")
    assert current_submission(cfg) == final
    # what a killed blend leaves (a hidden temp file), another experiment whose name ends like this one's,
    # and a submission without its YAML: all newer, none taken
    (subs / ".2026-11-24_exp_cv0.1000.csv.gz.x1.tmp.csv.gz").write_text("ID,Label\n")
    other = subs / "2026-11-24_old_exp_cv0.0500.csv.gz"
    other.write_bytes(final.read_bytes())
    info = yaml.safe_load(info_path(final).read_text())
    info_path(other).write_text(yaml.safe_dump({**info, "file": other.name, "experiment": "old_exp"}))
    orphan = subs / "2026-11-24_exp_cv0.0400.csv.gz"
    orphan.write_bytes(final.read_bytes())
    assert current_submission(cfg) == final
    # the next blend sweeps what a killed blend of this experiment left, and nothing of another's
    run_blend(cfg, today=dt.date(2026, 11, 23))
    assert not orphan.exists() and not list(subs.glob(".*tmp*")) and other.exists()
    # a full disk while the YAML is written (of a blend that changed): neither file appears, and the former results
    # stay whole (they name the former submission)
    results = root / "runs" / "exp" / "blend"
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    cfg.blend.lstm_weight = 0.3
    with monkeypatch.context() as m:
        m.setattr(yaml, "safe_dump", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
        with pytest.raises(OSError, match="No space left"):
            run_blend(cfg, today=dt.date(2026, 11, 25))
    assert not list(subs.glob("2026-11-25*")) and not list(subs.glob(".*"))
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before and current_submission(cfg) == final
    # a submission edited after it was written is refused, by default and by name (FILE=...)
    with gzip.open(final, "rt") as f:
        text = f.read()
    with gzip.open(final, "wt") as f:
        f.write(text.replace(",0.", ",0.9", 1))
    for check in (lambda: current_submission(cfg), lambda: check_unchanged(final)):
        with pytest.raises(InputError, match=r"_exp_cv.*\.csv\.gz: changed since .*wrote it \(.*sha256 differs"):
            check()
    own = tmp_path / "mine.csv"  # a file of the user's own, without ichpipe's YAML, may be uploaded by name
    own.write_text(text)
    check_unchanged(own)


def test_a_rerun_that_changes_nothing_keeps_the_submission_of_its_first_day(tmp_path, capsys):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(3))
    first = run_blend(cfg, today=dt.date(2026, 11, 23)).written
    subs = root / "subs"
    names = sorted(p.name for p in subs.iterdir())
    assert all(w.new for w in first.values()) and len(names) == 4  # blend and CNN, each with its YAML
    again = run_blend(cfg, today=dt.date(2026, 11, 24)).written  # after midnight: the same predictions
    assert sorted(p.name for p in subs.iterdir()) == names
    assert {m: (w.path, w.new) for m, w in again.items()} == {m: (w.path, False) for m, w in first.items()}
    same_day = run_blend(cfg, today=dt.date(2026, 11, 23)).written  # was reported "written" (the same name)
    assert {m: (w.path, w.new) for m, w in same_day.items()} == {m: (w.path, False) for m, w in first.items()}
    info = yaml.safe_load(info_path(first["blend"].path).read_text())
    assert info["sha256"] == hashlib.sha256(gzip.decompress(first["blend"].path.read_bytes())).hexdigest()
    cfg.blend.lstm_weight = 0.3  # the blend changes, the CNN's predictions do not
    third = run_blend(cfg, today=dt.date(2026, 11, 24)).written
    assert third["blend"].new and str(third["blend"].path).startswith(str(subs / "2026-11-24_exp_cv"))
    assert third["cnn_bagged"] == dataclasses.replace(first["cnn_bagged"], new=False)
    assert current_submission(cfg) == third["blend"].path
    cfg.blend.lstm_weight = 1.0  # back to the first settings: the first day's file is the current blend again
    fourth = run_blend(cfg, today=dt.date(2026, 11, 25)).written
    assert fourth["blend"].path == first["blend"].path and not fourth["blend"].new
    assert current_submission(cfg) == first["blend"].path  # was: the newer file of the 0.3 blend


def test_submit_refuses_an_invalid_file(tmp_path):
    sample = tmp_path / "sample.csv"
    wide_to_long(_frame(["ID_a", "ID_b"], 0.5)).to_csv(sample, index=False)
    sub = tmp_path / "sub.csv"
    wide_to_long(_frame(["ID_a"], 0.5)).to_csv(sub, index=False)
    with pytest.raises(SubmissionError, match="6 IDs of the sample submission are missing: ID_b_any"):
        submit_to_kaggle(sub, sample, "rsna-intracranial-hemorrhage-detection", "m")


_KILL_MID_BLEND = """
import datetime as dt, os, signal, sys
import pandas as pd
from ichpipe.base.config import load_config
from ichpipe.stages.blend import run_blend
real, calls = pd.DataFrame.to_parquet, []
def to_parquet(self, path, *args, **kwargs):  # the OOF table written, killed before the test table
    real(self, path, *args, **kwargs)
    calls.append(path)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
pd.DataFrame.to_parquet = to_parquet
run_blend(load_config(overrides=sys.argv[1:]), today=dt.date(2026, 11, 24))
"""


def test_a_blend_killed_while_writing_leaves_the_former_results_whole(tmp_path):
    """Issue 31: a kill during stage 5 left the new OOF table beside the old test table, and a hidden temp file that
    later blends did not remove."""
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(3))
    run_blend(cfg, today=dt.date(2026, 11, 23))
    results = root / "runs" / "exp" / "blend"
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    args = [f"data.root={root}", "experiment=exp", f"blend.out_dir={root / 'subs'}", "blend.lstm_weight=0.3"]
    res = subprocess.run([sys.executable, "-c", _KILL_MID_BLEND, *args], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before  # the former results, whole
    assert any(p.name.startswith(".blend.") for p in results.parent.iterdir())  # the killed run's staging folder
    cfg.blend.lstm_weight = 0.3
    new = run_blend(cfg, today=dt.date(2026, 11, 24))
    assert not [p for p in results.parent.iterdir() if p.name.startswith(".blend.")]  # removed by the next blend
    assert current_submission(cfg) == new.written["blend"].path
    for where in ("oof", "test"):  # both tables from the new blend (lstm_weight 0.3: another final blend)
        old = pd.read_parquet(io.BytesIO(before[f"{where}_predictions.parquet"])).query("model == 'blend'")
        now = pd.read_parquet(results / f"{where}_predictions.parquet").query("model == 'blend'")
        assert list(now.image_id) == list(old.image_id) and not np.allclose(now[L], old[L])
    cv = json.loads((results / "cv.json").read_text())
    assert cv["oof"]["blend"]["weighted"] == pytest.approx(new.scores["oof"]["blend"].weighted)


def test_a_second_blend_of_an_experiment_is_refused_while_one_runs(tmp_path):
    root = tmp_path / "root"
    cfg, *_ = _experiment(root, np.random.default_rng(3))
    exp = root / "runs" / "exp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ichpipe.base.files import writer_lock\n"
                               f"with writer_lock({str(exp)!r}, 'stage 5 (blend) of exp'):\n"
                               "    print('locked', flush=True)\n    time.sleep(60)\n"], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"^{exp}: stage 5 \(blend\) of exp \(process {holder.pid}\) is writing "
                                             r"this folder"):
            run_blend(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert not (exp / "blend").exists() and not (root / "subs").exists()  # nothing written by the refused one
    run_blend(cfg)
