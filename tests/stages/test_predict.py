"""`predict`: what it refuses before any work, and what it never deletes."""

from __future__ import annotations

import shutil
from pathlib import Path


def test_predict_out_never_names_the_study_its_parent_or_a_users_folder(tiny_data, tmp_path, capsys, monkeypatch):
    """``predict S --out S`` exited 0 with S's DICOMs gone; ``--out`` its parent or ``.`` wiped those."""
    from ichpipe.__main__ import main

    src, truth = tiny_data
    study = tmp_path / "patients" / "study"
    study.mkdir(parents=True)
    for image_id in truth[truth.split == "test"].image_id[:4]:
        shutil.copy(src / "stage_2_test" / f"{image_id}.dcm", study)
    (tmp_path / "patients" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "patients")
    for out, why in ((study, "holds the input"), (study.parent, "holds the input"), (Path("."), "holds the input"),
                     (tmp_path / "patients", "holds the input")):
        assert main(["predict", str(study), "--bundle", str(tmp_path / "no_bundle"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: {why}") and err.count("\n") == 1, err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    assert main(["predict", str(study), "--bundle", str(tmp_path / "no_bundle"), "--out", str(mine)]) == 2
    assert "holds files ichpipe did not write" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "mine" not in p.parts) == before
