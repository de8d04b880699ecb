"""The competition's labels and metric weights, defined once for the whole package."""

from __future__ import annotations

import numpy as np

# Kaggle's order: five subtypes, then `any` (at least one subtype present).
SUBTYPES: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
LABELS: tuple[str, ...] = (*SUBTYPES, "any")
N_LABELS = len(LABELS)
ANY_INDEX = LABELS.index("any")

# Metric weights: `any` counts twice, each subtype once.
LABEL_WEIGHTS: dict[str, float] = {name: (2.0 if name == "any" else 1.0) for name in LABELS}
WEIGHTS = np.array([LABEL_WEIGHTS[name] for name in LABELS], dtype=np.float64)


def row_id(image_id: str, label: str) -> str:
    """Submission row id for one (image, label) pair: ``ID_<hex>_<label>``."""
    return f"{image_id}_{label}"


def split_row_id(rid: str) -> tuple[str, str]:
    """Inverse of :func:`row_id`; raises ValueError for an id that is not ``<image>_<label>``."""
    image_id, sep, label = rid.rpartition("_")
    if not sep or not image_id or label not in LABEL_WEIGHTS:
        raise ValueError(f"not an '<image id>_<label>' row id: {rid!r}")
    return image_id, label

# Clinical abbreviations, for figure annotations.
ABBREVIATIONS: dict[str, str] = {
    "epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
    "subarachnoid": "SAH", "subdural": "SDH", "any": "any",
}


# CQ500's reads.csv finding columns (R1:ICH ... R3:SAH) and the competition's classes they are (ICH is `any`)
CQ500_FINDINGS = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural",
                  "EDH": "epidural", "SAH": "subarachnoid"}
