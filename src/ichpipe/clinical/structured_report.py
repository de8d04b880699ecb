"""A series' findings as a DICOM Structured Report that viewers and PACS read (``predict --dicom-sr``).

IHE's AI Results profile (AIR) puts image-derived AI findings in a Comprehensive 3D SR whose root is TID 1500
(Measurement Report), made here with highdicom. One SR per series, in the series' study (patient and study
attributes copied from its slices, new series and instance UIDs), with one measurement group (TID 1501) per
class:

- finding type: intracranial hemorrhage (SNOMED CT 1386000) for ``any``; a code of this project's private
  scheme ``99ICHPIPE`` for each subtype (SNOMED CT has no code for all five that pydicom's dictionary carries);
- a qualitative evaluation: the finding present or absent (SNOMED CT) at the bundle's operating point (present
  when at least one slice is at or above its threshold);
- measurements: the series-level probability (DCM 122157 "Probability", no unit), and one per slice that
  carries the finding, with that slice referenced by SOP Instance UID; those slices are also the group's source
  images;
- the algorithm identified: its name (ichpipe and the experiment), version (the git commit the bundle was made
  from) and parameters (the bundle's sha256, the threshold, "research use only, not for diagnosis").

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
from ichpipe.networks.bundle_format import Bundle

RESEARCH_ONLY = "research use only, not for diagnosis"
PRIVATE_SCHEME = "99ICHPIPE"
FINDINGS = {
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("IPH", PRIVATE_SCHEME, "Intraparenchymal hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("SAH", PRIVATE_SCHEME, "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("SDH", PRIVATE_SCHEME, "Subdural hemorrhage"),
}
assert set(FINDINGS) == set(LABELS)


def structured_report(sources: list[Dataset], slices: pd.DataFrame, series_row: dict, bundle: Bundle,
                      series_number: int) -> hd.sr.Comprehensive3DSR:
    """The SR of one series: ``sources`` its slices' headers, ``slices`` its rows of ``slices.csv`` (probability and
    flag per class), ``series_row`` its row of ``series.csv``."""
    info = bundle.info
    digest = bundle.digest
    sources = [_with_type2(ds) for ds in sources]
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"ichpipe {info.experiment}", version=str(info.git.get("commit") or "unknown")
        + (" (uncommitted changes)" if info.git.get("dirty") else ""),
        parameters=[f"bundle sha256 {digest}", RESEARCH_ONLY])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[digest]), name="ichpipe", manufacturer_name="ichpipe",
            model_name=info.experiment[:64]))
    sop_class = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}
    groups = [_group(name, slices, series_row, info.thresholds[name].threshold, algorithm, sop_class)
              for name in LABELS]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.HeadCT, imaging_measurements=groups)
    with warnings.catch_warnings():  # highdicom's remarks on the source study's own names are not ours to fix
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources, content=report, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ichpipe", is_complete=True)
    sr.SeriesDescription = f"ichpipe ICH findings - {RESEARCH_ONLY}"[:64]  # LO: at most 64 characters
    scheme = Dataset()  # the private coding scheme, described as DICOM asks of one outside its standard list
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = PRIVATE_SCHEME, "ichpipe hemorrhage subtypes"
    scheme.CodingSchemeResponsibleOrganization = "ichpipe"
    sr.CodingSchemeIdentificationSequence = [scheme]
    _deidentification(sr, sources[0])
    return sr


# Patient and study attributes of type 2 (present, possibly empty) that the SR copies from its source: files
# without them (the competition's de-identified ones lack PatientName, StudyDate, ...) get them empty.
TYPE2 = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
         "StudyID", "AccessionNumber")


def _with_type2(ds: Dataset) -> Dataset:
    missing = [k for k in TYPE2 if k not in ds]
    if not missing:
        return ds
    ds = copy.deepcopy(ds)  # a header: cheap; the caller's dataset keeps what it had
    for keyword in missing:
        setattr(ds, keyword, None)
    return ds


def _deidentification(sr: Dataset, source: Dataset) -> None:
    """A de-identified source (Patient Identity Removed YES, copied into the SR) needs its method in the SR too
    (type 1C); many public sets, CQ500 among them, do not record it."""
    if sr.get("PatientIdentityRemoved") != "YES" or "DeidentificationMethod" in sr:
        return
    if "DeidentificationMethodCodeSequence" in source:
        sr.DeidentificationMethodCodeSequence = source.DeidentificationMethodCodeSequence
    sr.DeidentificationMethod = (source.get("DeidentificationMethod")
                                 or "de-identified at the source; method not recorded")


def _group(name: str, slices: pd.DataFrame, series_row: dict, threshold: float,
           algorithm: hd.sr.AlgorithmIdentification, sop_class: dict[str, str]
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One class's measurement group: present/absent, the series probability, the flagged slices' probabilities."""
    flagged = slices[slices[f"flag_{name}"] == 1]
    unit = codes.UCUM.NoUnits
    measurements = [hd.sr.Measurement(name=codes.DCM.Probability, value=float(series_row[f"series_{name}"]), unit=unit)]
    for uid, p in zip(flagged.SOPInstanceUID, flagged[name], strict=True):
        measurements.append(hd.sr.Measurement(name=codes.DCM.Probability, value=float(p), unit=unit, referenced_images=[
            hd.sr.SourceImageForMeasurement(sop_class[uid], uid)]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{name} (threshold {threshold:.4f})"),
        finding_type=FINDINGS[name], algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            FINDINGS[name], codes.SCT.Present if len(flagged) else codes.SCT.Absent)],
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class[uid], uid) for uid in flagged.SOPInstanceUID]
        or None)


def read_findings(path: str | Path) -> dict[str, dict]:
    """Per class (``LABELS``) of an SR written by :func:`structured_report`: ``present`` (bool), ``probability``
    (the series'), ``slices`` ({SOP Instance UID: probability} of the slices that carry it)."""
    with warnings.catch_warnings():  # the competition's (and the synthetic) files' UIDs are ID_<hex>: pydicom warns
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        sr = hd.sr.srread(path)
    by_code = {(c.value, c.scheme_designator): name for name, c in FINDINGS.items()}
    out = {}
    for group in sr.content.get_image_measurement_groups():
        name = by_code[(group.finding_type.value, group.finding_type.scheme_designator)]
        (evaluation,) = group.get_qualitative_evaluations()
        series_p, per_slice = None, {}
        for m in group.get_measurements(name=codes.DCM.Probability):
            images = m.referenced_images
            if images:
                per_slice[images[0].referenced_sop_instance_uid] = float(m.value)
            else:
                series_p = float(m.value)
        out[name] = {"present": evaluation.value == codes.SCT.Present, "probability": series_p, "slices": per_slice}
    return out

