import numpy as np
import pandas as pd
import pytest

from ichpipe.__main__ import main
from ichpipe.base.labels import LABELS
from ichpipe.scoring.submission import SubmissionError, check_submission, validate_submission, write_submission


@pytest.fixture()
def sample(tmp_path):
    ids = [f"ID_{i:09x}" for i in range(4)]
    rows = pd.DataFrame({"ID": [f"{i}_{c}" for i in ids for c in LABELS], "Label": 0.5})
    path = tmp_path / "sample.csv"
    rows.to_csv(path, index=False)
    return path, ids


def test_written_submission_is_valid_and_round_trips(tmp_path, sample):
    sample_path, ids = sample
    preds = pd.DataFrame(np.linspace(0, 1, 24).reshape(4, 6), index=ids, columns=list(LABELS))
    path = write_submission(preds, tmp_path / "sub.csv.gz")
    validate_submission(path, sample_path)
    back = pd.read_csv(path)
    assert list(back.columns) == ["ID", "Label"] and len(back) == 24
    assert back.loc[back.ID == f"{ids[1]}_any", "Label"].item() == pytest.approx(preds.loc[ids[1], "any"])
    assert back.ID.iloc[:6].tolist() == [f"{ids[0]}_{c}" for c in LABELS]


def _broken(tmp_path, sample, mutate):
    sample_path, _ = sample
    df = pd.read_csv(sample_path)
    df = mutate(df)
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    return check_submission(path, sample_path)


def test_each_problem_is_one_line_naming_ids(tmp_path, sample):
    _, ids = sample
    problems = _broken(tmp_path, sample, lambda d: pd.concat([d.iloc[1:], d.iloc[[2]]]))
    assert problems == [f"1 duplicate IDs: {ids[0]}_intraventricular",
                        f"1 IDs of the sample submission are missing: {ids[0]}_epidural"]
    problems = _broken(tmp_path, sample, lambda d: d.assign(Label=[np.nan, 1.5, -0.1] + [0.5] * 21))
    assert problems == [f"1 empty, NaN or non-numeric labels: {ids[0]}_epidural",
                        f"2 labels outside [0, 1]: {ids[0]}_intraparenchymal, {ids[0]}_intraventricular"]
    problems = _broken(tmp_path, sample, lambda d: d.replace({f"{ids[3]}_any": "ID_zzz_any"}))
    assert problems == [f"1 IDs of the sample submission are missing: {ids[3]}_any",
                        "1 IDs are not in the sample submission: ID_zzz_any"]
    problems = _broken(tmp_path, sample, lambda d: d.rename(columns={"Label": "label"}))
    assert problems == ["header must be 'ID,Label', found 'ID,label'"]


def test_validate_raises_and_cli_exit_codes(tmp_path, sample, capsys):
    sample_path, _ = sample
    bad = tmp_path / "bad.csv"
    pd.read_csv(sample_path).iloc[:-1].to_csv(bad, index=False)
    with pytest.raises(SubmissionError, match="missing"):
        validate_submission(bad, sample_path)
    assert main(["validate", str(bad), "--sample", str(sample_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["validate", str(sample_path), "--sample", str(sample_path)]) == 0
    assert main(["validate", str(tmp_path / "nope.csv"), "--sample", str(sample_path)]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err


def test_a_bad_sample_submission_is_one_line(tmp_path, sample, capsys):
    sample_path, _ = sample
    for name, text in (("garbage.csv", "garbage\n"), ("empty.csv", ""), ("labels.csv", "Id,Label\nx,0\n")):
        bad_sample = tmp_path / name
        bad_sample.write_text(text)
        assert main(["validate", str(sample_path), "--sample", str(bad_sample)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and "Traceback" not in err
