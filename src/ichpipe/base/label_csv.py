"""The competition's long ``ID,Label`` files (train labels, the synthetic answer key, predictions, submissions)
and their wide form: one row per image, one column per label."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ichpipe.base.errors import InputError, first_line, quote
from ichpipe.base.labels import LABELS, SUBTYPES


def read_long_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ``ID,Label`` file (train labels, predictions, submissions) into long form.

    Returns columns ``ID`` (row id), ``image_id``, ``label`` and ``Label`` (float). Exact duplicate
    rows, which the real ``stage_2_train.csv`` contains, are dropped; the same row id with two
    different values is an error.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"ID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({first_line(exc)})") from None
    if list(df.columns) != ["ID", "Label"]:
        raise InputError(f"{path}: header must be 'ID,Label', found {quote(','.join(map(str, df.columns)))}")
    if df.empty:
        raise InputError(f"{path}: has no rows, only its header")
    df = df.drop_duplicates()
    dup = df["ID"].duplicated(keep=False)
    if dup.any():
        ids = ", ".join(df.loc[dup, "ID"].unique()[:5])
        raise InputError(f"{path}: {dup.sum()} rows give one ID two different labels, e.g. {ids}")
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any() or not parts[1].isin(LABELS).all():
        bad = df.loc[parts[1].isna() | ~parts[1].isin(LABELS),
                     "ID"].head(5).tolist() if parts.shape[1] == 2 else df["ID"].head(5).tolist()
        raise InputError(f"{path}: IDs must be 'ID_<image>_<label>' with a competition label, e.g. {bad}")
    df["image_id"] = parts[0]
    df["label"] = parts[1]
    values = pd.to_numeric(df["Label"], errors="coerce")
    text = values.isna() & df["Label"].notna()
    if text.any():
        row = df[text].iloc[0]
        raise InputError(f"{path}: {int(text.sum())} labels are not numbers, e.g. {row['ID']} = {quote(row['Label'])}")
    df["Label"] = values
    return df.reset_index(drop=True)


def long_to_wide(df: pd.DataFrame, path: str | os.PathLike = "<labels>") -> pd.DataFrame:
    """Pivot long ``ID,Label`` rows to one row per image and one column per label (Kaggle order)."""
    wide = df.pivot(index="image_id", columns="label", values="Label")
    missing = [c for c in LABELS if c not in wide.columns]
    if missing or wide.isna().any().any():
        incomplete = wide.index[wide.reindex(columns=list(LABELS)).isna().any(axis=1)][:5].tolist()
        raise InputError(f"{path}: every image needs all six labels; incomplete images e.g. {incomplete}")
    wide = wide[list(LABELS)]
    wide.columns.name = None
    return wide


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Wide labels (image_id index, six columns) of an ``ID,Label`` truth file; a value other than 0 or 1, or a
    subtype of 1 with ``any`` 0, is an error naming an example (it would otherwise be trained on, or scored
    against)."""
    labels = long_to_wide(read_long_csv(path), path)
    found = non_binary_labels(labels)
    if found:
        n, image, column, value = found
        raise InputError(f"{path}: {n} images have a label that is not 0 or 1, e.g. {image}_{column}={value:g}")
    above = labels[list(SUBTYPES)].gt(labels["any"], axis=0)  # 'any' is 1 wherever a subtype is
    if above.any().any():
        image = above.index[above.any(axis=1)][0]
        sub = above.columns[above.loc[image].to_numpy()][0]
        raise InputError(f"{path}: {int(above.any(axis=1).sum())} images have a subtype labelled 1 but any = 0, e.g. "
                         f"{image}_{sub}=1 with {image}_any=0; 'any' must be 1 wherever a subtype is")
    return labels


def non_binary_labels(wide: pd.DataFrame) -> tuple[int, str, str, float] | None:
    """(images with a label that is not 0 or 1 (NaN included), first such image, its column, its value) of
    a wide label frame indexed by image id; None when every label is 0 or 1."""
    values = wide[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(bad.any(axis=1).sum()), str(wide.index[row]), LABELS[col], float(values[row, col])


def wide_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """One row per image and label column → the ``ID,Label`` long form, six rows per image."""
    values = wide[list(LABELS)].to_numpy()
    ids = np.char.add(np.repeat(wide.index.to_numpy().astype(str), len(LABELS)),
                      np.tile(np.array([f"_{c}" for c in LABELS]), len(wide)))
    return pd.DataFrame({"ID": ids, "Label": values.reshape(-1)})
