"""End to end: `make demo` on a tiny generated set runs every stage: a validated submission and the report."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from ichpipe.base.config import load_config
from ichpipe.base.errors import InputError
from ichpipe.base.label_csv import read_long_csv
from ichpipe.base.labels import LABELS
from ichpipe.clinical.predictor import Predictor, read_series, run_series, series_result
from ichpipe.clinical.structured_report import read_findings
from ichpipe.clinical.studies import find_series
from ichpipe.imaging.dicom import as_valid_uid
from ichpipe.networks.bundle_format import load_bundle
from ichpipe.scoring.submission import check_submission
from ichpipe.stages.bundle import make_bundle
from ichpipe.stages.predict import predict

REPO = Path(__file__).resolve().parents[2]

# The demo's own chain and CONFIG, shrunk until it still learns: 30 patients of 10-14 slices at 128 px
# (64 px PNGs and input; at 96/48 px the realistic phantom's bleeds are too small for the CNN to learn
# anything in this budget), two folds (so each fold has patients enough for the LSTM's three inner
# folds), four CNN epochs, ten LSTM epochs. About three minutes on 2 cores.
TINY_DEMO = [
    "synthetic.n_patients=30", "synthetic.slices_min=10", "synthetic.slices_max=14", "synthetic.size=128",
    "synthetic.control_rate=0.2", "preprocess.size=64", "preprocess.n_folds=2", "train.image_size=64",
    "train.epochs=4", "train.batch_size=16", "train.warmup_steps=2", "train.loader_workers=0",
    "embed.epochs=[2,3]", "embed.tta=[none,hflip]", "lstm.epochs=10", "lstm.bag_last=4", "lstm.inner_folds=3",
    "lstm.lr=1e-3",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo` on the tiny set, once for this module: (data root, submissions folder, command, result)."""
    tmp = tmp_path_factory.mktemp("demo")
    root, subs = tmp / "data", tmp / "subs"
    cmd = ["make", "--no-print-directory", "SKIP_SETUP=1", "demo", f"PY={sys.executable}",
           f"DATA_DIR={root}", "WORKERS=2", *TINY_DEMO, f"blend.out_dir={subs}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, subs, cmd, res


def test_make_demo_runs_every_stage(demo):
    root, subs, cmd, res = demo

    meta = pd.read_parquet(root / "processed" / "metadata.parquet")
    exp = root / "runs" / "demo"
    for k in (0, 1):
        for stage in ("embeddings", "lstm"):
            assert sorted(p.parent.name for p in (exp / f"fold{k}" / stage).glob("*/done")) == ["epoch02", "epoch03"]
    cv = json.loads((exp / "blend" / "cv.json").read_text())
    assert list(cv["oof"]) == ["prior", "cnn_single", "cnn_bagged", "lstm", "blend"]
    assert all(s["n_images"] == meta.fold.notna().sum() for s in cv["oof"].values())
    assert cv["test"]["blend"]["n_images"] == (meta.split == "test").sum()  # scored on the synthetic answer key
    assert "| model | weighted | EDH | IPH | IVH | SAH | SDH | any | images |" in res.stdout  # the CV table is shown
    # The models learn: prior > CNN > LSTM out of fold, and prior > CNN on the synthetic test set's answer key,
    # by margins that a broken label alignment does not reach. Measured on the phantom of 2026-11-25 with the
    # demo's lstm.train_on=train_and_oof: test prior 0.187, CNN 0.157, LSTM 0.155 (99 slices); OOF 0.270,
    # 0.234, 0.226. With the nested LSTM (train_on=oof) the LSTM was worse than
    # the CNN on both (0.2344 OOF, 0.1577 test). On the old phantom, with the training labels shuffled
    # between images, the CNN and the LSTM were worse than the prior (0.257: CNN 0.263, LSTM 0.273).
    # 2026-12-06 (the code of 2026-12-02 and today's give the same numbers to the sixth decimal): OOF 0.2697,
    # CNN 0.2362, LSTM 0.2283; test 0.1871, CNN 0.15541, LSTM 0.15544. On 99 test slices the LSTM and the CNN
    # tie, so the test set only bounds the LSTM by the margin it once won by (0.002); out of fold it must win.
    test = {m: s["weighted"] for m, s in cv["test"].items()}
    oof = {m: s["weighted"] for m, s in cv["oof"].items()}
    assert test["prior"] - test["cnn_bagged"] > 0.02, test
    assert test["lstm"] < test["cnn_bagged"] + 0.002, test
    assert oof["prior"] - oof["cnn_bagged"] > 0.02 and oof["cnn_bagged"] - oof["lstm"] > 0.004, oof

    (final,) = subs.glob("*_demo_cv*.csv.gz")
    assert final.name.endswith(f"_cv{cv['oof']['blend']['weighted']:.4f}.csv.gz")
    assert check_submission(final, root / "stage_2_sample_submission.csv") == []
    with gzip.open(final, "rt") as f:
        assert f.readline().strip() == "ID,Label"
    assert len(list(subs.glob("*_demo-cnn_cv*.csv.gz"))) == 1
    # The second model family and the ensemble of both: every combiner scored on every OOF image.
    assert (root / "runs" / "demo_mobilenet" / "blend" / "cv.json").exists()
    ens = json.loads((root / "runs" / "ensemble" / "blend" / "cv.json").read_text())
    assert ens["members"] == ["demo", "demo_mobilenet"]
    combiners = ("mean", "weights", "stacker", "context", "sequence")  # the demo config's: every one
    assert set(ens["oof"]) == {"demo", "demo_mobilenet", *combiners, "final"}
    assert all(s["n_images"] == meta.fold.notna().sum() for s in ens["oof"].values())
    # the config submits the sequence model (chosen on the benchmark), whatever the OOF order here
    assert ens["oof"]["final"] == ens["oof"]["sequence"] and ens["test"]["final"] == ens["test"]["sequence"]
    assert ens["oof"]["demo"]["weighted"] == pytest.approx(cv["oof"]["blend"]["weighted"])
    (ensemble,) = subs.glob("*_ensemble_cv*.csv.gz")
    assert check_submission(ensemble, root / "stage_2_sample_submission.csv") == []
    assert len(list(subs.glob("*.yaml"))) == 5  # demo, demo-cnn, demo_mobilenet, demo_mobilenet-cnn, ensemble
    assert (root / "eda" / "summary.md").exists()
    report = exp / "report"
    for name in ("report.md", "figure1.png", "pr_curves.png", "calibration.png", "training_curves.png"):
        assert (report / name).stat().st_size > 1000, name
    assert (exp / "fold0" / "tb").is_dir()

    # A second run of the demo's first chain continues: nothing is retrained, the same submission comes out
    # (kept, on whatever day: the rerun's predictions are the same).
    chain = [a for a in cmd if a != "demo"] + ["train", "embed", "lstm", "submission", "resume=true"]
    again = subprocess.run(chain, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already there" in again.stdout and "embedded 0 checkpoint(s)" in again.stdout
    assert "already there (the same predictions)" in again.stdout
    assert [p.name for p in subs.glob("*_demo_cv*.csv.gz")] == [final.name]


def _submission_values(subs) -> pd.DataFrame:
    (final,) = subs.glob("*_demo_cv*.csv.gz")
    long = read_long_csv(final)
    return long.pivot(index="image_id", columns="label", values="Label")[list(LABELS)]


def test_the_bundle_predicts_what_the_pipeline_predicted(demo, tmp_path):
    """No train/serve skew: the demo bundle on the synthetic test DICOMs gives the submission's numbers."""
    root, subs, _, res = demo
    bundle = root / "runs" / "demo" / "bundle"
    example = root / "runs" / "demo" / "predict_example"  # make demo ends with predict on one test study
    for name in ("slices.csv", "series.csv", "series_0.png"):
        assert (example / name).stat().st_size > 100, name
    assert pd.read_csv(example / "skipped.csv").empty  # one synthetic study: nothing to skip
    result = predict(root / "stage_2_test", bundle, tmp_path / "all", figures=False, progress=False, dicom_sr=True)
    slices = pd.read_csv(tmp_path / "all" / "slices.csv").set_index("SOPInstanceUID")
    pipeline = _submission_values(subs)
    assert result.slices == len(pipeline) and sorted(slices.index) == sorted(pipeline.index)
    np.testing.assert_allclose(slices.loc[pipeline.index, list(LABELS)].to_numpy(), pipeline.to_numpy(),
                               rtol=1e-5, atol=1e-5)
    info = load_bundle(bundle).info
    flags = slices[[f"flag_{c}" for c in LABELS]].to_numpy()
    thresholds = np.array([info.thresholds[c].threshold for c in LABELS])
    assert (flags == (slices[list(LABELS)].to_numpy() >= thresholds)).all()
    series = pd.read_csv(tmp_path / "all" / "series.csv")
    assert series.slices.sum() == len(slices) and ((series.series_any >= 0) & (series.series_any <= 1)).all()
    assert (series.max_any.to_numpy() == slices.groupby("SeriesInstanceUID")["any"].max()
            .loc[series.SeriesInstanceUID].to_numpy()).all()
    assert (series.assessable == 1).all()  # every synthetic series is a head CT to the image check
    for c in LABELS:  # a subtype is never likelier than any bleed
        assert (series[f"series_{c}"] <= series.series_any + 1e-12).all()
    # the operating points as measured here, on the OOF series: the bundle holds the same figures
    meta = pd.read_parquet(root / "processed" / "metadata.parquet").set_index("image_id")
    oof = pd.read_parquet(root / "runs" / "demo" / "blend" / "oof_predictions.parquet").query("model == 'blend'")
    joined = meta.loc[oof.image_id, ["StudyInstanceUID", "SeriesInstanceUID", *LABELS]].reset_index(drop=True)
    joined[[f"p_{c}" for c in LABELS]] = oof[list(LABELS)].to_numpy()
    by = joined.groupby("SeriesInstanceUID")
    for c in LABELS:
        op = info.thresholds[c]
        top, y = by[f"p_{c}"].max(), by[c].max() > 0.5
        if not y.any():
            continue
        assert op.series == len(y) and op.positive_series == int(y.sum())
        assert op.series_sensitivity == pytest.approx((top[y] >= op.threshold).mean())
        assert op.series_specificity == pytest.approx((top[~y] < op.threshold).mean())
        assert op.rule_in >= op.threshold and op.rule_in_specificity >= 0.95  # report.rule_in_specificity
        assert op.rule_in_specificity == pytest.approx((top[~y] < op.rule_in).mean())
        assert op.rule_in_sensitivity == pytest.approx((top[y] >= op.rule_in).mean())
        lower = top[~y][top[~y] < op.rule_in].max() if (top[~y] < op.rule_in).any() else -1
        assert not (op.threshold < lower < op.rule_in and (top[~y] < lower).mean() >= 0.95)  # the lowest such point
    # each series' finding follows its highest slice and the two points; present only where the point is specific
    for _, row in series.iterrows():
        for c in LABELS:
            op, top, state = info.thresholds[c], row[f"max_{c}"], row[f"finding_{c}"]
            if state == "present":
                assert top >= op.rule_in and op.rule_in_specificity >= 0.95
                assert c == "any" or row.finding_any == "present"
            elif state == "absent":
                assert top < op.threshold
            else:
                assert state == "indeterminate" and (top >= op.threshold or op.recall is None)
    # each series' Structured Report reads back equal to the tables
    by_series = slices.reset_index().groupby("SeriesInstanceUID")
    for n, row in series.iterrows():
        assert_sr_matches(read_findings(tmp_path / "all" / f"sr_{n}.dcm"), row, by_series.get_group(
            row.SeriesInstanceUID))
    # the same from the bundle alone, as a Kaggle submission
    out = tmp_path / "kaggle.csv.gz"
    run = subprocess.run([sys.executable, "-m", "ichpipe", "predict", "--kaggle", str(root), "--bundle", str(bundle),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert check_submission(out, root / "stage_2_sample_submission.csv") == []


def test_predict_reads_real_files_and_says_what_it_skips(demo, tmp_path):
    root, *_ = demo
    bundle = root / "runs" / "demo" / "bundle"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "693_J2KI.dcm", "693_UNCR.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(open(get_testdata_file(name), "rb").read())
    scout = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesInstanceUID = "1.2.3.4.5.scout"
    scout.SOPInstanceUID = "1.2.3.4.5.scout.1"
    scout.save_as(folder / "scout.dcm")
    (folder / "notes.txt").write_text("not a DICOM")
    (folder / "copy.dcm").write_bytes((folder / "CT_small.dcm").read_bytes())  # the same slice twice
    r = predict(folder, bundle, tmp_path / "out", progress=False, dicom_sc=True, dicom_sr=True)
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    reasons = dict(zip(skipped.what.map(str), skipped.reason, strict=True))
    # real CT files: CT_small (one series: a thoracic vertebra, not assessable) and two slices of a CQ500 head CT
    # series (JPEG 2000 and uncompressed), the only ones with probabilities
    assert r.series == 2 and sorted(slices.SOPInstanceUID) == sorted(
        str(pydicom.dcmread(get_testdata_file(n)).SOPInstanceUID) for n in ("693_J2KI.dcm", "693_UNCR.dcm"))
    series = pd.read_csv(tmp_path / "out" / "series.csv").set_index("SeriesInstanceUID")
    small = str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).SeriesInstanceUID)
    assert series.loc[small, "assessable"] == 0 and series.loc[small, "not_assessable"].startswith(
        "no skull enclosing a brain-sized interior on any of its 1 slice(s)")
    assert (series.loc[small, [f"finding_{c}" for c in LABELS]] == "not assessable").all()
    assert series.loc[small, [f"max_{c}" for c in LABELS]].isna().all() and pd.isna(series.loc[small, "figure"])
    assert (series.drop(small).assessable == 1).all()
    assert reasons[str(folder / "copy.dcm")].startswith("duplicate of SOPInstanceUID")
    assert ((slices[list(LABELS)] > 0) & (slices[list(LABELS)] < 1)).all().all()
    assert any(v == "modality MR, not CT" for v in reasons.values())
    assert any(v == "a localiser/scout image, not an axial slice" for v in reasons.values())
    assert reasons[str(folder / "notes.txt")].startswith("not a readable DICOM file")
    assert len(list((tmp_path / "out").glob("series_*.png"))) == 1  # one figure per assessable series
    assert len(list((tmp_path / "out").glob("series_*.dcm"))) == 1
    for sc_file in (tmp_path / "out").glob("series_*.dcm"):  # and as a Secondary Capture in its study
        sc = pydicom.dcmread(sc_file)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID in set(slices.StudyInstanceUID)
        assert sc.pixel_array.ndim == 3 and "not for diagnosis" in sc.SeriesDescription
        assert sc.BurnedInAnnotation == "YES" and sc.BodyPartExamined == "HEAD"
        # its sources: the slices it shows (both, here), by SOP Instance UID
        assert {i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence} == set(slices.SOPInstanceUID)
    series = pd.read_csv(tmp_path / "out" / "series.csv")
    for n, row in series.iterrows():  # a Structured Report per series, read back equal to series.csv
        path = tmp_path / "out" / f"sr_{n}.dcm"
        sr = pydicom.dcmread(path)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert (sr.StudyInstanceUID, sr.PatientID) == (row.StudyInstanceUID, str(row.PatientID))
        assert sr.SeriesInstanceUID != row.SeriesInstanceUID and "not for diagnosis" in sr.SeriesDescription
        assert_sr_matches(read_findings(path), row, slices[slices.SeriesInstanceUID == row.SeriesInstanceUID])
    with pytest.raises(InputError, match="no usable CT series"):
        predict(folder / "notes.txt", bundle, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()  # nothing written on an error


def assert_sr_matches(findings: dict, row: pd.Series, slices: pd.DataFrame) -> None:
    """An SR's findings equal one series' row of series.csv and its flagged rows of slices.csv (their UIDs as the SR
    holds them: valid ones)."""
    assert set(findings) == set(LABELS)
    for name in LABELS:
        assert findings[name]["finding"] == row[f"finding_{name}"]
        if not row.assessable:
            assert findings[name]["probability"] is None and findings[name]["slices"] == {}
            assert row.not_assessable in findings[name]["why"]
            continue
        flagged = slices[slices[f"flag_{name}"] == 1]
        assert findings[name]["probability"] == pytest.approx(row[f"series_{name}"], rel=1e-6)
        assert findings[name]["slices"] == pytest.approx(
            {as_valid_uid(u): p for u, p in zip(flagged.SOPInstanceUID, flagged[name], strict=True)}, rel=1e-6)


def test_a_changed_bundle_is_refused(demo, tmp_path):
    root, *_ = demo
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "runs" / "demo" / "bundle", bundle)
    load_bundle(bundle)  # intact: loads
    weights = sorted((bundle / "cnn").glob("*.pt"))[0]
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"changed since the bundle was made .sha256 differs"):
        load_bundle(bundle)
    weights.unlink()
    with pytest.raises(InputError, match=r"listed in the bundle's manifest but missing"):
        load_bundle(bundle)


def test_an_fp16_archive_bundle_predicts_alike(demo, tmp_path):
    root, subs, _, _ = demo
    cfg = load_config(REPO / "configs" / "demo" / "cpu_small.yaml", [*TINY_DEMO, f"data.root={root}",
                                                                     f"blend.out_dir={subs}"])
    make_bundle(cfg, tmp_path / "small", fp16=True, archive=True)
    full = sum(p.stat().st_size for p in (root / "runs" / "demo" / "bundle" / "cnn").glob("*.pt"))
    half = sum(p.stat().st_size for p in (tmp_path / "small" / "cnn").glob("*.pt"))
    assert half < 0.6 * full
    example = root / "synthetic_example_study.zip"
    predict(example, tmp_path / "small.tar.gz", tmp_path / "half", figures=False, progress=False)
    a = pd.read_csv(root / "runs" / "demo" / "predict_example" / "slices.csv")[list(LABELS)].to_numpy()
    b = pd.read_csv(tmp_path / "half" / "slices.csv")[list(LABELS)].to_numpy()
    np.testing.assert_allclose(a, b, atol=5e-3)  # fp16 weights, fp32 compute


def test_the_report_plays_the_pointing_game_with_each_slices_own_fold(demo, monkeypatch):
    """The demo's report has the Grad-CAM pointing game; its pairs are the OOF slices flagged correctly at the
    report's operating points whose mask shows that subtype's blood (counted here, capped as asked), and each
    slice's map comes from its own fold's embedded checkpoints (the models that never saw it)."""
    import torch

    import ichpipe.stages.report as R
    from ichpipe.imaging.png import read_mask
    from ichpipe.scoring.metrics import threshold_for_recall

    root, *_ = demo
    page = (root / "runs" / "demo" / "report" / "report.md").read_text()
    assert "## Where the CNN looks: the Grad-CAM pointing game" in page and "| subtype | slices | peak inside" in page
    cfg = load_config(REPO / "configs" / "demo" / "cpu_small.yaml", [*TINY_DEMO, f"data.root={root}",
                                                                     "report.pointing_slices=3"])
    meta = pd.read_parquet(root / "processed" / "metadata.parquet").set_index("image_id")
    oof = pd.read_parquet(root / "runs" / "demo" / "blend" / "oof_predictions.parquet").query("model == 'blend'")
    ids = oof.image_id.to_numpy()
    y, p = meta.loc[ids, list(LABELS)].to_numpy(), oof[list(LABELS)].to_numpy()
    thresholds = {c: threshold_for_recall(y[:, k], p[:, k], 0.95).threshold for k, c in enumerate(LABELS) if y[:,
                                                                                                               k].any()}
    calls = []
    real_game, real_cam = R.pointing_game, R.mean_grad_cam

    def game(ids, flags, masks, cams):
        calls.append({"ids": list(ids), "models": []})
        return real_game(ids, flags, masks, cams)

    def cam(models, *args):
        calls[-1]["models"].append(models)
        return real_cam(models, *args)

    monkeypatch.setattr(R, "pointing_game", game)
    monkeypatch.setattr(R, "mean_grad_cam", cam)
    rows = R.pointing_game_oof(cfg, meta, ids, y, p, {c: thresholds.get(c, 1.0) for c in LABELS}, seed=0)
    for k, sub in enumerate(LABELS[:-1]):
        correct = [i for i in ids[(p[:, k] >= thresholds.get(sub, 1.0)) & (y[:, k] > 0)]
                   if read_mask(root / "synthetic_masks" / f"{i}.png")[sub].any()]
        played = rows[rows.subtype == sub].SOPInstanceUID
        assert len(played) == min(3, len(correct)) and set(played) <= set(correct), sub
    assert len(rows) > 3 and rows[["mass_inside", "blood_share"]].stack().between(0, 1).all()
    assert len(calls) == 2  # one per fold
    for call in calls:
        (fold,) = set(meta.loc[call["ids"], "fold"])
        for models in call["models"]:
            assert len(models) == 2  # embed.epochs=[2,3]
            for model, epoch in zip(models, (2, 3), strict=True):
                saved = torch.load(root / "runs" / "demo" / f"fold{int(fold)}" / "checkpoints" / f"epoch{epoch:02d}.pt",
                                   weights_only=True)
                name, value = next(iter(model.state_dict().items()))
                assert torch.equal(value.cpu(), saved[name])


def test_evaluate_on_the_cq500_copy_reproduces_the_aucs_of_predict(demo, tmp_path, monkeypatch):
    """`evaluate` on the synthetic test set as CQ500: its study-level AUCs are those computed here from predict's
    slices.csv and the answer key; the readers' majority is the truth when they do not err; a rerun reads its cache;
    the pointing game measures every subtype flagged correctly."""
    from sklearn.metrics import roc_auc_score

    from ichpipe.stages.evaluate import evaluate
    from ichpipe.synthetic.cq500 import write_cq500_copy

    root, *_ = demo
    bundle = root / "runs" / "demo" / "bundle"
    copy = write_cq500_copy(root, tmp_path / "cq500", disagree=0.0)
    reads = pd.read_csv(tmp_path / "cq500" / "reads.csv")
    assert len(reads) == copy["studies"] and set(reads.columns) >= {"name", "R1:ICH", "R3:SAH"}
    out = tmp_path / "eval"
    m = evaluate(tmp_path / "cq500", bundle, tmp_path / "cq500" / "reads.csv", out, masks=root / "synthetic_masks",
                 n_boot=200, progress=False)
    predict(root / "stage_2_test", bundle, tmp_path / "pred", figures=False, progress=False)
    slices = pd.read_csv(tmp_path / "pred" / "slices.csv")
    truth = pd.read_csv(root / "synthetic_slices.csv").set_index("image_id")
    slices = slices.join(truth[[f"{c}" for c in LABELS]].add_prefix("true_"), on="SOPInstanceUID")
    studies = slices.groupby("StudyInstanceUID").max(numeric_only=True)
    assert m.studies == len(studies) == copy["studies"]
    for c in LABELS:
        y = studies[f"true_{c}"].to_numpy()
        if 0 < y.sum() < len(y):
            assert m.classes[c]["auc"] == pytest.approx(roc_auc_score(y, studies[c]), abs=1e-12), c
            lo, hi = m.classes[c]["auc_ci"]
            used, n_boot = m.classes[c]["auc_ci_resamples"]
            assert n_boot == 200 and (lo <= m.classes[c]["auc"] <= hi) == (used >= 0.9 * n_boot), c
            assert used >= 0.9 * n_boot or (np.isnan(lo) and np.isnan(hi))  # too few resamples: not estimable
        assert m.classes[c]["positives"] == int(y.sum())
    for name in ("report.md", "metrics.json", "roc.png", "studies.csv", "pointing_game.csv", "misses.csv"):
        assert (out / name).stat().st_size > 50, name
    assert "AUC (95% CI)" in (out / "report.md").read_text() and list((out / "misses").glob("*.png"))
    game = pd.read_csv(out / "pointing_game.csv")
    assert len(game) and game.slices.gt(0).all() and game[["peak_inside", "mass_inside",
                                                           "blood_share"]].stack().between(0, 1).all()
    figures = {f.name: f.read_bytes() for f in (out / "misses").glob("*.png")}
    calls = []
    real = Predictor.probabilities
    monkeypatch.setattr(Predictor, "probabilities", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = evaluate(tmp_path / "cq500", bundle, tmp_path / "cq500" / "reads.csv", out, masks=root / "synthetic_masks",
                     n_boot=200, progress=False)  # from the cache: the same numbers
    assert json.dumps(again.classes) == json.dumps(m.classes)
    assert len(list((out / "cache").glob("*.json"))) == len(studies)
    # the rerun ran no network but the figures' Grad-CAM, and drew the same miss figures from its cache
    assert calls == [] and {f.name: f.read_bytes() for f in (out / "misses").glob("*.png")} == figures
    # another bundle into the same --out: its own predictions, not the first bundle's cache (issue 31: the cache was
    # keyed by series only)
    other = tmp_path / "other_bundle"
    shutil.copytree(bundle, other)
    info = yaml.safe_load((other / "bundle.yaml").read_text())
    info["thresholds"]["any"]["threshold"] = 0.999
    (other / "bundle.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["bundle.yaml"] = hashlib.sha256((other / "bundle.yaml").read_bytes()).hexdigest()
    (other / "manifest.json").write_text(json.dumps(manifest))
    third = evaluate(tmp_path / "cq500", other, tmp_path / "cq500" / "reads.csv", out, masks=root / "synthetic_masks",
                     n_boot=200, progress=False)
    assert len(calls) == len(studies) and len(list((out / "cache").glob("*.json"))) == 2 * len(studies)
    assert third.classes["any"]["at_bundle_threshold"]["threshold"] == 0.999
    flagged = pd.read_csv(out / "slices.csv")
    assert (flagged.flag_any == (flagged["any"] >= 0.999)).all()  # the new bundle's flags, not the cached ones
    calls.clear()
    # a series' result rebuilt from its cached probabilities is the one computed
    with load_bundle(bundle) as b:
        predictor = Predictor(b)
        (s, *_), _ = find_series(tmp_path / "cq500", tmp_path)
        cached = next(json.loads(f.read_text()) for f in (out / "cache").glob("*.json")
                      if json.loads(f.read_text())["row"]["SeriesInstanceUID"] == s.series)
        probs = np.array([[r[c] for c in LABELS] for r in cached["slices"]])
        rebuilt = series_result(predictor, s, read_series(predictor, s, []), probs)
        monkeypatch.setattr(Predictor, "probabilities", real)
        computed = run_series(predictor, s, [])
        assert rebuilt.slices == computed.slices and rebuilt.row == computed.row
        assert (rebuilt.flags == computed.flags).all()


def test_evaluate_reads_real_cq500_slices_and_refuses_bad_labels(demo, tmp_path):
    """Two slices of a real CQ500 study (pydicom's test data) under CQ500's folder and reads.csv names go through;
    labels that match no study, a reads.csv without reader columns, a folder that is no bundle and bundles of another
    ichpipe (another format, a setting missing): one line each."""
    from ichpipe.stages.evaluate import evaluate

    root, *_ = demo
    bundle = root / "runs" / "demo" / "bundle"
    folder = tmp_path / "cq" / "CQ500CT693 CQ500CT693" / "Unknown Study" / "CT Plain"
    folder.mkdir(parents=True)
    for name in ("693_J2KI.dcm", "693_UNCR.dcm"):
        (folder / name).write_bytes(open(get_testdata_file(name), "rb").read())
    readers = {f"R{r}:{k}": 0 for r in (1, 2, 3) for k in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")}
    pd.DataFrame([{"name": "CQ500-CT-693", "Category": "B1", **readers}]).to_csv(tmp_path / "reads.csv", index=False)
    m = evaluate(tmp_path / "cq", bundle, tmp_path / "reads.csv", tmp_path / "out", n_boot=10, progress=False)
    assert m.studies == 1 and m.classes["any"]["positives"] == 0
    pd.DataFrame([{"name": "CQ500-CT-1", **readers}]).to_csv(tmp_path / "other.csv", index=False)
    pd.DataFrame([{"name": "CQ500-CT-693", "ICH": 1}]).to_csv(tmp_path / "noreaders.csv", index=False)
    # bundles of another ichpipe: another format number; this format with a setting missing (each re-signed in its
    # manifest, so that it is the bundle.yaml that is refused, not the changed file)
    from ichpipe.networks.bundle_format import FORMAT, MANIFEST, sha256

    def edited(name, change):
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        info = yaml.safe_load((copy / "bundle.yaml").read_text())
        change(info)
        (copy / "bundle.yaml").write_text(yaml.safe_dump(info))
        manifest = json.loads((copy / MANIFEST).read_text())
        manifest["files"]["bundle.yaml"] = sha256(copy / "bundle.yaml")
        (copy / MANIFEST).write_text(json.dumps(manifest))
        return copy

    newer = edited("newer", lambda info: info.update(format=FORMAT + 1))
    unlike = edited("unlike", lambda info: info.pop("thresholds"))
    for labels, bundle_path, message in [("other.csv", bundle, "none of its studies matches"),
                                         ("noreaders.csv", bundle, "reader columns"),
                                         ("reads.csv", tmp_path / "cq", "not a model bundle"),
                                         ("reads.csv", newer, f"bundle format {FORMAT + 1}, this ichpipe reads format"),
                                         ("reads.csv", unlike, "bundle.yaml: thresholds: Field required")]:
        run = subprocess.run([sys.executable, "-m", "ichpipe", "evaluate", str(tmp_path / "cq"), "--bundle",
                              str(bundle_path), "--labels", str(tmp_path / labels), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
