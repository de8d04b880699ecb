"""A series' findings as a DICOM Structured Report that viewers and PACS read (``predict --dicom-sr``).

IHE's AI Results profile (AIR) puts image-derived AI findings in a Comprehensive 3D SR whose root is TID 1500
(Measurement Report), made here with highdicom. One SR per series, in the series' study (patient and study
attributes copied from its slices, new series and instance UIDs):

- procedure reported: (25045-6, LN, "CT unspecified body region"), the CT code of CID 100 (which has no head CT);
  the finding site of every group says intracranial;
- an Image Library of the series' slices;
- per class (of an assessable series) a measurement group (TID 1501): the finding type (SNOMED CT where a code could
  be confirmed, see :data:`FINDINGS`), finding site intracranial structure, the algorithm (its name, version = the
  git commit the bundle was made from, parameters = the bundle's sha256 and the class's two operating points), and
  two kinds of value with distinct concept names: the series' calibrated **Probability** (DCM 122157; Platt scaling
  of its highest slice, a subtype's capped at `any`'s) and, per flagged slice, the network's uncalibrated **Score**
  (SCT 246262008), that slice referenced (and listed among the group's source images);
- the report's Qualitative Evaluations (TID 1500 rows 12-14): per class the finding (ichpipe.clinical.findings):
  Present, Absent, Indeterminate (SNOMED CT) or, for a series that is not a head CT, Not Evaluated, each with a
  TEXT of the same concept that says why (the value, the operating point used and its OOF sensitivity and
  specificity, or the reason it is not assessable); and a Comment that this is research use only.

UIDs: a source UID that is not a valid DICOM UID (the competition's ``ID_<hex>``) is written as
:func:`ichpipe.imaging.dicom.as_valid_uid` maps it (``2.25.`` + a name-based UUID of it), in the SR's study, its
evidence and every reference.

``read_findings`` reads one back (used by the tests and by anyone who wants the values without a viewer).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import highdicom as hd
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ichpipe.base.labels import LABELS
from ichpipe.clinical.findings import ABSENT, INDETERMINATE, NOT_ASSESSABLE, PRESENT, series_findings
from ichpipe.imaging.dicom import as_valid_uid, with_valid_uids
from ichpipe.networks.bundle_format import Bundle

RESEARCH_ONLY = "Research use only, not for diagnosis."
PRIVATE_SCHEME = "99ICHPIPE"
# SNOMED CT: 1386000 Intracranial hemorrhage (pydicom's code dictionary, from DICOM PS3.16); 21454007 Subarachnoid
# hemorrhage and 274100004 Cerebral hemorrhage (both in HL7 FHIR implementation guides' SNOMED CT value sets and
# the OHDSI vocabulary, which agree). For epidural, intraventricular and subdural hemorrhage the sources at hand
# disagree on the SNOMED CT code, so this project's private scheme keeps them rather than assert a wrong one.
FINDINGS = {
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("SDH", PRIVATE_SCHEME, "Subdural hemorrhage"),
}
assert set(FINDINGS) == set(LABELS)
STATES = {PRESENT: codes.SCT.Present, ABSENT: codes.SCT.Absent, INDETERMINATE: codes.SCT.Indeterminate,
          NOT_ASSESSABLE: codes.SCT.NotEvaluated}
SERIES_PROBABILITY = codes.DCM.Probability  # calibrated, of the series
SLICE_SCORE = hd.sr.CodedConcept("246262008", "SCT", "Score")  # the network's output for one slice, uncalibrated
QUALITATIVE = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SITE = hd.sr.FindingSite(codes.SCT.IntracranialStructure)


def structured_report(sources: list[Dataset], slices: pd.DataFrame, series_row: dict, bundle: Bundle,
                      series_number: int) -> hd.sr.Comprehensive3DSR:
    """The SR of one series: ``sources`` its slices' headers, ``slices`` its rows of ``slices.csv`` (probability and
    flag per class; none for a series that is not assessable), ``series_row`` its row of ``series.csv``."""
    info = bundle.info
    digest = bundle.digest
    sources = [_for_sr(ds) for ds in sources]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[digest]), name="ichpipe", manufacturer_name="ichpipe",
            model_name=info.experiment[:64]))
    sop_class = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}
    findings = series_findings(series_row, info.thresholds)
    assessable = not any(f.state == NOT_ASSESSABLE for f in findings.values())
    groups = []
    if assessable:
        version = str(info.git.get("commit") or "unknown") + (" (uncommitted changes)" if info.git.get("dirty") else "")
        groups = [_group(name, slices, series_row, info.thresholds[name], hd.sr.AlgorithmIdentification(
            name=f"ichpipe {info.experiment}", version=version,
            parameters=[f"bundle sha256 {digest}", *_points(info.thresholds[name])]), sop_class) for name in LABELS]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, referenced_images=sources,
        imaging_measurements=groups or [hd.sr.MeasurementsAndQualitativeEvaluations(  # removed below
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="none"))])
    if not groups:  # highdicom asks for the Imaging Measurements container; TID 1500 is satisfied by row 12 alone
        report[0].ContentSequence = [item for item in report[0].ContentSequence
                                     if item.ConceptNameCodeSequence[0].CodeValue != "126010"]
    report[0].ContentSequence.append(_qualitative(findings))
    with warnings.catch_warnings():  # highdicom's remarks on the source study's own names are not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources, content=report, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ichpipe", is_complete=True)
    sr.SeriesDescription = "ichpipe ICH findings - research use only, not for diagnosis"  # LO: <= 64 characters
    scheme = Dataset()  # the private coding scheme, described as DICOM asks of one outside its standard list
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = PRIVATE_SCHEME, "ichpipe hemorrhage subtypes"
    scheme.CodingSchemeResponsibleOrganization = "ichpipe"
    sr.CodingSchemeIdentificationSequence = [scheme]
    _deidentification(sr, sources[0])
    return sr


def _points(op) -> list[str]:
    """The class's operating points as algorithm parameters."""
    out = [f"flagging point {op.threshold:.4f}"]
    if op.rule_in is not None:
        out.append(f"rule-in point {op.rule_in:.4f}")
    return out


def _qualitative(findings: dict) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: per class the finding (CODE) and why (TEXT), and the intended use."""
    container = hd.sr.ContainerContentItem(QUALITATIVE, relationship_type="CONTAINS")
    items = []
    for name in LABELS:
        f = findings[name]
        items.append(hd.sr.CodeContentItem(FINDINGS[name], STATES[f.state], relationship_type="CONTAINS"))
        items.append(hd.sr.TextContentItem(FINDINGS[name], f"{f.state}: {f.why}"[:1024 * 8],
                                           relationship_type="CONTAINS"))
    items.append(hd.sr.TextContentItem(codes.DCM.Comment, RESEARCH_ONLY, relationship_type="CONTAINS"))
    container.ContentSequence = items
    return container


# Patient and study attributes of type 2 (present, possibly empty) that the SR copies from its source: files
# without them (the competition's de-identified ones lack PatientName, StudyDate, ...) get them empty.
TYPE2 = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
         "StudyID", "AccessionNumber")


def _for_sr(ds: Dataset) -> Dataset:
    """A copy of a source header as the SR cites it: type 2 attributes it lacks present and empty, UIDs valid."""
    ds = copy.deepcopy(ds)  # a header: cheap; the caller's dataset keeps what it had
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return with_valid_uids(ds)


def _deidentification(sr: Dataset, source: Dataset) -> None:
    """A de-identified source (Patient Identity Removed YES, copied into the SR) needs its method in the SR too
    (type 1C); many public sets, CQ500 among them, do not record it."""
    if sr.get("PatientIdentityRemoved") != "YES" or "DeidentificationMethod" in sr:
        return
    if "DeidentificationMethodCodeSequence" in source:
        sr.DeidentificationMethodCodeSequence = source.DeidentificationMethodCodeSequence
    sr.DeidentificationMethod = (source.get("DeidentificationMethod")
                                 or "de-identified at the source; method not recorded")


def _group(name: str, slices: pd.DataFrame, series_row: dict, op, algorithm: hd.sr.AlgorithmIdentification,
           sop_class: dict[str, str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One class's measurement group: the series' calibrated probability, the flagged slices' scores."""
    flagged = slices[slices[f"flag_{name}"] == 1]
    uids = [as_valid_uid(u) for u in flagged.SOPInstanceUID]
    unit = codes.UCUM.NoUnits
    measurements = [hd.sr.Measurement(name=SERIES_PROBABILITY, value=float(series_row[f"series_{name}"]), unit=unit)]
    for uid, p in zip(uids, flagged[name], strict=True):
        measurements.append(hd.sr.Measurement(name=SLICE_SCORE, value=float(p), unit=unit, referenced_images=[
            hd.sr.SourceImageForMeasurement(sop_class[uid], uid)]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"ichpipe {name}"),
        finding_type=FINDINGS[name], finding_sites=[SITE], algorithm_id=algorithm, measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class[uid], uid) for uid in uids] or None)


def read_findings(path: str | Path) -> dict[str, dict]:
    """Per class (``LABELS``) of an SR written by :func:`structured_report`: ``finding`` (present, absent,
    indeterminate or not assessable), ``why``, ``probability`` (the series' calibrated one; None when not
    assessable), ``slices`` ({SOP Instance UID as the SR holds it: score} of the flagged slices)."""
    sr = hd.sr.srread(path)
    by_code = {(c.value, c.scheme_designator): name for name, c in FINDINGS.items()}
    by_state = {(c.value, c.scheme_designator): state for state, c in STATES.items()}
    out = {name: {"finding": None, "why": None, "probability": None, "slices": {}} for name in LABELS}
    for group in sr.content.get_image_measurement_groups():
        name = by_code[(group.finding_type.value, group.finding_type.scheme_designator)]
        for m in group.get_measurements():
            images = m.referenced_images
            if images:
                out[name]["slices"][images[0].referenced_sop_instance_uid] = float(m.value)
            else:
                out[name]["probability"] = float(m.value)
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE.value]
    for item in container.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        name = by_code.get((concept.CodeValue, concept.CodingSchemeDesignator))
        if name is None:
            continue
        if item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0]
            out[name]["finding"] = by_state[(value.CodeValue, value.CodingSchemeDesignator)]
        else:
            out[name]["why"] = str(item.TextValue)
    return out
