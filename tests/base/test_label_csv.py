"""The competition's ID,Label files: labels that contradict themselves, values that are not numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ichpipe.base.errors import InputError
from ichpipe.base.label_csv import read_labels, read_long_csv


def _labels_csv(path: Path, rows: dict[str, object]) -> Path:
    labels = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    lines = ["ID,Label"] + [f"ID_{i}_{c}," + str(rows.get(f"ID_{i}_{c}", 0)) for i in ("a1", "b2") for c in labels]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_labels_that_contradict_themselves_or_are_not_numbers_are_refused_naming_the_value(tmp_path):
    assert read_labels(_labels_csv(tmp_path / "ok.csv", {"ID_a1_subdural": 1, "ID_a1_any": 1})).loc["ID_a1"].sum() == 2
    with pytest.raises(InputError, match=r"1 images have a subtype labelled 1 but any = 0, e.g. ID_b2_subdural=1 with "
                                         r"ID_b2_any=0"):
        read_labels(_labels_csv(tmp_path / "any.csv", {"ID_b2_subdural": 1}))  # was: accepted
    with pytest.raises(InputError, match=r"1 labels are not numbers, e.g. ID_a1_epidural = 'true'$"):
        read_long_csv(_labels_csv(tmp_path / "true.csv", {"ID_a1_epidural": "true"}))  # was: "incomplete images"
    assert pd.isna(read_long_csv(_labels_csv(tmp_path / "blank.csv", {"ID_a1_epidural": ""})).Label).sum() == 1
