"""Source datasets as the writers need them: text decoded, UTF-8 declared, Type 2 attributes present.

Hospitals send every Specific Character Set of PS3.3 C.12.1.1.2 and some that are misspelled
(``ISO IR 192``), multi-valued with an empty first value (ISO 2022 code extensions), or only
known to Python (GB18030, GBK). pydicom decodes all of them (PS3.5 6.1; it corrects the common
misspellings with a warning); we then hand highdicom and our own writers a copy whose text is
``str`` and whose declaration is ``ISO_IR 192``, so every output is written in UTF-8 whatever the
source declared, and names and descriptions (PN with all three component groups) carry over as
they were.

Sources also miss Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1,
C.7.2.1): the copy has them present and empty, which is what a Type 2 attribute with an unknown
value is, so every writer copies them as such instead of failing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import UID

UTF8 = "ISO_IR 192"
_CHARSET_TAG = 0x00080005

# Patient (C.7.1.1) and General Study (C.7.2.1) Type 2 attributes: present, maybe empty, in every
# composite object we write.
TYPE2_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

# Retired storage SOP classes that old modalities still send, and the class that replaced each
# (PS3.4 Annex B; PS3.6 Table A-1). New objects never use a retired class.
RETIRED_SUCCESSORS = {
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image (retired 1993)
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image (retired)
    "1.2.840.10008.5.1.4.1.1.5": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image (retired)
    "1.2.840.10008.5.1.4.1.1.77.1": "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Image - Trial
    "1.2.840.10008.5.1.4.1.1.77.2": "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Multi-frame Image - Trial
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def current_sop_class(sop_class_uid: str) -> str:
    """The SOP class a new object derived from ``sop_class_uid`` is written in: its successor if retired."""
    return RETIRED_SUCCESSORS.get(str(sop_class_uid), str(sop_class_uid))


def _shallow_copy(src: Dataset) -> Dataset:
    """New Dataset with copies of the (already decoded) elements; pixel bytes are shared, not copied.

    Element objects are copied because pydicom assigns into an existing element: a shared one
    would let our edits leak into the caller's dataset. Sequences are deep-copied (they are small)."""
    out = Dataset()
    for elem in src:
        out.add(copy.deepcopy(elem) if elem.VR == "SQ" else copy.copy(elem))
    meta = getattr(src, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
    return out


def writable_source(src: Dataset) -> Dataset:
    """A copy of ``src`` with every text value decoded, ``ISO_IR 192`` declared and the Type 2
    identity attributes present (empty when the source lacks them).

    ``src`` itself is only decoded in place (pydicom ``Dataset.decode``: its values become ``str``,
    its declaration is kept, so it still writes the same bytes). Undecodable bytes become U+FFFD
    with a pydicom warning (pydicom's default reading validation), never an exception.
    """
    src.decode()
    out = _shallow_copy(src)
    out[_CHARSET_TAG] = DataElement(_CHARSET_TAG, "CS", UTF8)
    for kw in TYPE2_IDENTITY:
        if kw not in out:
            setattr(out, kw, None)
    return out


def writable_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    """``writable_source`` for each source, order kept."""
    return [writable_source(s) for s in sources]


def _highdicom_knows(sop_class_uid: str) -> bool:
    try:  # highdicom copies Patient/Study modules by the source's IOD and raises KeyError otherwise
        from highdicom._standard_utils import get_sop_class_iod_map
    except ImportError:  # pragma: no cover - a highdicom without the private map: go by pydicom's registry
        uid = UID(sop_class_uid)
        return uid.name != str(uid) and not uid.is_retired
    return str(sop_class_uid) in get_sop_class_iod_map()


def for_highdicom(sources: Sequence[Dataset]) -> tuple[list[Dataset], dict[str, str]]:
    """Writable copies whose SOP class highdicom knows, and {SOPInstanceUID: original SOP class}
    for those whose class had to be stood in for (retired: its successor; private: Secondary
    Capture, which has the same Patient and Study modules). ``restore_referenced_classes`` puts the
    original classes back into the references of the written object."""
    out, replaced = [], {}
    for src in writable_sources(sources):
        cls = str(src.get("SOPClassUID", ""))
        if cls and not _highdicom_knows(cls):
            stand_in = current_sop_class(cls)
            stand_in = stand_in if _highdicom_knows(stand_in) else SECONDARY_CAPTURE
            replaced[str(src.SOPInstanceUID)] = cls
            src.SOPClassUID = stand_in
        out.append(src)
    return out, replaced


def restore_referenced_classes(ds: Dataset, replaced: dict[str, str]) -> None:
    """Reference items (ReferencedSOPInstanceUID + ReferencedSOPClassUID) of stood-in sources get
    their true SOP class back, at any depth."""
    if not replaced:
        return
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            if uid in replaced and "ReferencedSOPClassUID" in item:
                item.ReferencedSOPClassUID = replaced[uid]
            restore_referenced_classes(item, replaced)
