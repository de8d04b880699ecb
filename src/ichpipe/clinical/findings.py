"""What a series' result says per class, in words a reader can act on: present, absent, indeterminate or not
assessable, and why (the operating point used and what it measured out of fold). ``series.csv``'s ``finding_<class>``
columns and the DICOM Structured Report both come from here.

- **present**: the series' highest slice probability reaches the class's rule-in point (its OOF series specificity
  at least ``report.rule_in_specificity``), and, for a subtype, `any` is present too;
- **absent**: it is below the flagging point (chosen for the class's OOF slice recall; its OOF series sensitivity
  is stated);
- **indeterminate**: in between (flagged at a point too unspecific to call a finding), a subtype above its rule-in
  point while `any` is not present, or a point the bundle could not measure (no positive OOF series; a bundle
  made before rule-in points existed);
- **not assessable**: the series is not a head CT the models can read (ichpipe.imaging.head), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from ichpipe.base.labels import LABELS
from ichpipe.networks.bundle_format import OperatingThreshold

PRESENT, ABSENT, INDETERMINATE, NOT_ASSESSABLE = "present", "absent", "indeterminate", "not assessable"


@dataclass(frozen=True)
class Finding:
    state: str  # PRESENT | ABSENT | INDETERMINATE | NOT_ASSESSABLE
    why: str  # one sentence: the value, the operating point and its OOF figures, or the reason it is not assessable


def _figure(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def finding(top: float, op: OperatingThreshold) -> Finding:
    """One class of one series from its highest slice probability ``top`` and the class's operating points."""
    flag = (f"the flagging point {op.threshold:.4f} (OOF series sensitivity {_figure(op.series_sensitivity)}, "
            f"specificity {_figure(op.series_specificity)})")
    if op.rule_in is not None and top >= op.rule_in:
        return Finding(PRESENT, f"highest slice probability {top:.4f} at or above the rule-in point {op.rule_in:.4f} "
                                f"(OOF series specificity {_figure(op.rule_in_specificity)}, sensitivity "
                                f"{_figure(op.rule_in_sensitivity)})")
    if op.recall is None:
        return Finding(INDETERMINATE, f"highest slice probability {top:.4f}; the bundle saw no positive OOF slice of "
                                      f"this class, so no operating point was measured")
    if top < op.threshold:
        return Finding(ABSENT, f"highest slice probability {top:.4f} below {flag}")
    if op.rule_in is None:
        return Finding(INDETERMINATE, f"highest slice probability {top:.4f} at or above {flag}; the bundle has no "
                                      f"rule-in point (made before they were measured): make it again to report "
                                      f"findings present")
    return Finding(INDETERMINATE, f"highest slice probability {top:.4f} at or above {flag}, too unspecific to call "
                                  f"a finding, and below the rule-in point {op.rule_in:.4f} (OOF series specificity "
                                  f"{_figure(op.rule_in_specificity)})")


def series_findings(row: dict, thresholds: dict[str, OperatingThreshold]) -> dict[str, Finding]:
    """Per class (LABELS) of a row of ``series.csv`` (its ``max_<class>``; ``not_assessable`` when it has a reason)."""
    reason = row.get("not_assessable") or ""
    if isinstance(reason, str) and reason:
        return {name: Finding(NOT_ASSESSABLE, reason) for name in LABELS}
    out = {name: finding(float(row[f"max_{name}"]), thresholds[name]) for name in LABELS}
    if out["any"].state != PRESENT:
        for name in LABELS:
            if name != "any" and out[name].state == PRESENT:
                out[name] = Finding(INDETERMINATE, f"{out[name].why}, but intracranial hemorrhage (any) is "
                                                   f"{out['any'].state}")
    return out
