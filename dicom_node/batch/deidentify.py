"""De-identification for research batches: PS3.15 Annex E Basic Application Level
Confidentiality Profile, done by dicognito, with the profile options a study names.

Why dicognito (compared with pydicom's `deid` and pydicom alone): it walks every element
(nested sequences, file meta) and replaces by VR -- every UI, PN, DA/DT and the identifying
IDs -- and its pseudonyms come from a seed, so every worker on every host that is given the
batch's secret maps the same patient, study, series and instance to the same pseudonym with
no shared state (`deid` needs a recipe file per site and its own UID mapping store; pydicom
has no profile at all). What the Basic Profile removes that dicognito keeps (descriptions,
comments, private tags, ...) is removed here (PS3.15 Table E.1-1, action X/Z/D).

Options (PS3.15 E.3), all off by default:
- ``retain_longitudinal``: dates kept, shifted by one per-batch offset (Table E.1-1
  "Retain Longitudinal Temporal Information with Modified Dates"); off: dates emptied;
- ``retain_patient_characteristics``: sex, age, size, weight, ethnic group, smoking status kept;
- ``clean_descriptors``: study/series/protocol descriptions kept, patient names/IDs scrubbed out;
- ``retain_uids``: original UIDs kept (only for studies that must link back to the PACS).

Images flagged with burned-in annotation (BurnedInAnnotation YES, or US/SC/XC/ES/OP without
an explicit NO) are refused (`burned_in_reason`) unless the batch opts in.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import FileMetaDataset

PROFILE_NAME = "PS3.15 E Basic Profile (dicognito)"  # LO: 64 characters at most
# PS3.16 CID 7050 codes written in DeidentificationMethodCodeSequence.
_CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
_CODE_LONGITUDINAL = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_CODE_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
_CODE_DESCRIPTORS = ("113105", "Clean Descriptors Option")
_CODE_UIDS = ("113110", "Retain UIDs Option")

BURNED_IN_MODALITIES = ("US", "SC", "XC", "ES", "OP", "OT")

# Removed by the Basic Profile (X/Z/D actions) and left in place by dicognito.
_ALWAYS_REMOVE = (
    "AdmittingDiagnosesDescription",
    "AdditionalPatientHistory",
    "Allergies",
    "DerivationDescription",
    "IdentifyingComments",
    "ImageComments",
    "InterpretationText",
    "MedicalAlerts",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientState",
    "PregnancyStatus",
    "RequestAttributesSequence",
    "StudyComments",
    "VisitComments",
    "TextComments",
    "TextString",
    "OperatorsName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "ContentCreatorName",
    "DeviceSerialNumber",
    "InstitutionalDepartmentName",
    "ProtocolName",
    "PerformedProcedureStepDescription",
    "RequestedProcedureDescription",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
)
# Removed unless clean_descriptors (then kept, scrubbed of the patient's names and IDs).
_DESCRIPTORS = ("StudyDescription", "SeriesDescription", "AcquisitionDeviceProcessingDescription")
_CHARACTERISTICS = ("PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus", "PatientSex")
# Type 2 attributes the profile empties (action Z) rather than removes: IODs require them present.
_EMPTY = ("PatientSex", "PatientBirthDate", "ReferringPhysicianName")
# Not identifying, needed to run the model and to write valid outputs: never touched.
_KEEP_UIDS = ("SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID")


@dataclass(frozen=True)
class DeidOptions:
    """The profile options of one batch (the `[batch.deidentify]` table / CLI flags)."""

    enabled: bool = False
    retain_longitudinal: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    allow_burned_in: bool = False

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DeidOptions:
        return cls(**{k: bool(v) for k, v in (data or {}).items() if k in cls.__dataclass_fields__})


def burned_in_reason(ds: Dataset) -> str | None:
    """Why this image may carry burned-in identifying text (None: it does not, as far as we know)."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "image flagged BurnedInAnnotation YES"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if flag != "NO" and modality in BURNED_IN_MODALITIES:
        return f"{modality} images may carry burned-in annotation and are not flagged BurnedInAnnotation NO"
    return None


class Deidentifier:
    """Applies the profile to datasets in place, with pseudonyms fixed by the batch's `secret`.

    The same secret gives the same pseudonyms in every process (dicognito's seeded randomizer),
    which is what keeps a patient's studies linked across items and workers.
    """

    def __init__(self, secret: str, options: DeidOptions) -> None:
        from dicognito.anonymizer import Anonymizer

        self.options = options
        self._anonymizer = Anonymizer(seed=secret)
        self.secret = secret

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (pixel data untouched) and return it."""
        o = self.options
        identity = [str(ds.get(k, "") or "") for k in ("PatientName", "PatientID", "OtherPatientIDs")]
        kept: dict[str, Any] = {}
        if o.retain_patient_characteristics:
            kept.update({k: copy.deepcopy(ds[k]) for k in _CHARACTERISTICS if k in ds})
        if o.clean_descriptors:
            kept.update({k: copy.deepcopy(ds[k]) for k in _DESCRIPTORS if k in ds})
        kept.update({k: copy.deepcopy(ds[k]) for k in _KEEP_UIDS if k in ds})
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        kept_meta = {k: copy.deepcopy(ds.file_meta[k]) for k in _KEEP_UIDS if k in ds.file_meta}
        originals = _uid_elements(ds) if o.retain_uids else []
        if not o.retain_longitudinal:
            _empty_dates(ds)
        self._anonymizer.anonymize(ds)
        ds.remove_private_tags()
        for kw in (*_ALWAYS_REMOVE, *_DESCRIPTORS, *_CHARACTERISTICS[:-1]):
            if kw in ds:
                del ds[kw]
        for kw in _EMPTY:
            if kw in ds:
                ds[kw].value = ""
            elif kw == "PatientSex":
                ds.PatientSex = ""
        for kw, elem in kept.items():
            ds[kw] = elem
        for kw, elem in kept_meta.items():
            ds.file_meta[kw] = elem
        if o.clean_descriptors:
            _scrub(ds, [v for v in identity if v])
        for path, value in originals:
            _set_at(ds, path, value)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = PROFILE_NAME
        ds.DeidentificationMethodCodeSequence = [_code(c) for c in self.codes()]
        return ds

    def codes(self) -> list[tuple[str, str]]:
        o = self.options
        codes = [_CODE_BASIC]
        codes += [_CODE_LONGITUDINAL] if o.retain_longitudinal else []
        codes += [_CODE_CHARACTERISTICS] if o.retain_patient_characteristics else []
        codes += [_CODE_DESCRIPTORS] if o.clean_descriptors else []
        codes += [_CODE_UIDS] if o.retain_uids else []
        return codes

    def pseudonyms(self, patient_id: str | None, study_uid: str) -> dict[str, str]:
        """The pseudonymous PatientID and StudyInstanceUID this batch gives (for the mapping key)."""
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.PatientID = patient_id or ""
        ds.StudyInstanceUID = study_uid
        probe = Deidentifier(self.secret, DeidOptions(enabled=True, retain_uids=self.options.retain_uids))
        probe.apply(ds)
        return {"patient_id": str(ds.PatientID), "study_instance_uid": str(ds.StudyInstanceUID)}


def _code(c: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = c[0], "DCM", c[1]
    return item


def _empty_dates(ds: Dataset) -> None:
    """Basic Profile without the longitudinal option: dates and times zero-length (action Z/D)."""

    def visit(d: Dataset, elem: Any) -> None:
        if elem.VR in ("DA", "DT", "TM") and elem.value not in (None, ""):
            elem.value = ""

    ds.walk(visit)


def _scrub(ds: Dataset, words: list[str]) -> None:
    """Clean descriptors: cut the patient's name parts and IDs out of kept free text."""
    parts = {p.strip().lower() for w in words for p in w.replace("^", " ").split() if len(p.strip()) >= 2}
    for kw in _DESCRIPTORS:
        if kw in ds and ds[kw].value:
            text = str(ds[kw].value)
            for p in parts:
                idx = text.lower().find(p)
                while idx >= 0:
                    text = text[:idx] + text[idx + len(p) :]
                    idx = text.lower().find(p)
            ds[kw].value = " ".join(text.split())


def _uid_elements(ds: Dataset) -> list[tuple[tuple[Any, ...], Any]]:
    out: list[tuple[tuple[Any, ...], Any]] = []

    def walk(d: Dataset, prefix: tuple[Any, ...]) -> None:
        for elem in d:
            if elem.VR == "UI" and keyword_for_tag(elem.tag) not in _KEEP_UIDS:
                out.append(((*prefix, elem.tag), copy.deepcopy(elem.value)))
            elif elem.VR == "SQ":
                for i, item in enumerate(elem.value):
                    walk(item, (*prefix, elem.tag, i))

    walk(ds, ())
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        out.append((("meta",), ds.file_meta.MediaStorageSOPInstanceUID))
    return out


def _set_at(ds: Dataset, path: tuple[Any, ...], value: Any) -> None:
    if path == ("meta",):
        ds.file_meta.MediaStorageSOPInstanceUID = value
        return
    d = ds
    for i in range(0, len(path) - 1, 2):
        if path[i] not in d:
            return
        d = d[path[i]].value[path[i + 1]]
    if path[-1] in d:
        d[path[-1]].value = value


def folder_token(*values: str, secret: str = "") -> str:
    """A generated folder name for the output layout (a digest, never the received value itself)."""
    return hashlib.sha256("\x1f".join((secret, *values)).encode()).hexdigest()[:16]
