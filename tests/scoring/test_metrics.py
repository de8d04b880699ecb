import json
import math

import numpy as np
import pandas as pd
import pytest

from ichpipe.__main__ import main
from ichpipe.base.labels import LABELS
from ichpipe.scoring.metrics import per_class_log_loss, weighted_log_loss


def test_constant_half_is_ln2():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert weighted_log_loss(y, np.full(y.shape, 0.5)) == pytest.approx(math.log(2))


def test_hand_computed_weighted_loss():
    y = np.array([[0, 0, 0, 0, 0, 1]])
    p = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.9]])
    # -ln .9 -ln .8 -ln .7 -ln .6 -ln .5 for the subtypes, 2 x -ln .9 for `any`, over 7 weights
    assert weighted_log_loss(y, p) == pytest.approx(0.2999818352217653, abs=1e-12)
    per = per_class_log_loss(y, p)
    assert per["epidural"] == pytest.approx(0.1053605156578263)
    assert per["subdural"] == pytest.approx(math.log(2))
    assert per["any"] == pytest.approx(0.1053605156578263)


def test_any_weighs_twice():
    y = np.zeros((1, 6))
    wrong_any = np.array([[0, 0, 0, 0, 0, 0.5]])
    wrong_epidural = np.array([[0.5, 0, 0, 0, 0, 0]])
    assert weighted_log_loss(y, wrong_any) == pytest.approx(2 * weighted_log_loss(y, wrong_epidural))


def test_predictions_are_clipped():
    y = np.array([[1, 0, 0, 0, 0, 0]])
    p = np.zeros((1, 6))
    assert weighted_log_loss(y, p) == pytest.approx(16.11809565095832 / 7)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        weighted_log_loss(np.zeros((2, 5)), np.zeros((2, 5)))


def _long(ids, rows):
    return pd.DataFrame({"ID": [f"{i}_{c}" for i in ids for c in LABELS], "Label": np.ravel(rows)})


def test_score_cli_with_duplicate_label_rows(tmp_path, capsys):
    truth = _long(["ID_a", "ID_b"], [[0, 0, 0, 0, 1, 1], [0] * 6])
    truth = pd.concat([truth, truth.iloc[:6]])  # the real file repeats some images' rows
    truth.to_csv(tmp_path / "labels.csv", index=False)
    pred = _long(["ID_a", "ID_b"], [[0.1, 0.2, 0.3, 0.4, 0.5, 0.9], [0.5] * 6])
    pred.to_csv(tmp_path / "pred.csv", index=False)
    assert main(["score", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    y = np.array([[0, 0, 0, 0, 1, 1], [0] * 6])
    p = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.9], [0.5] * 6])
    assert out["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert out["per_class"]["subdural"] == pytest.approx(math.log(2))
    assert out["n_images"] == 2


def test_score_cli_reports_ids_without_labels(tmp_path, capsys):
    _long(["ID_a"], [[0] * 6]).to_csv(tmp_path / "labels.csv", index=False)
    _long(["ID_a", "ID_zz"], [[0.5] * 6, [0.5] * 6]).to_csv(tmp_path / "pred.csv", index=False)
    assert main(["score", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "6 predicted IDs have no label" in err and "ID_zz_epidural" in err and "\n" not in err


def test_score_cli_conflicting_labels_and_bad_header(tmp_path, capsys):
    pd.DataFrame({"ID": ["ID_a_any", "ID_a_any"], "Label": [0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"Id": ["ID_a_any"], "Label": [0.5]}).to_csv(tmp_path / "pred.csv", index=False)
    assert main(["score", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv")]) == 2
    assert "header must be 'ID,Label'" in capsys.readouterr().err


def test_score_cli_refuses_labels_other_than_0_and_1(tmp_path, capsys):
    _long(["ID_a", "ID_b"], [[0, 0, 0, 0, 2, 1], [0] * 6]).to_csv(tmp_path / "labels.csv", index=False)
    _long(["ID_a", "ID_b"], [[0.5] * 6, [0.5] * 6]).to_csv(tmp_path / "pred.csv", index=False)
    assert main(["score", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("labels.csv: 1 labels are not 0 or 1, e.g. ID_a_subdural=2") and "\n" not in err
