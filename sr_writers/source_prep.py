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

import pydicom.charset
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import UID
from pydicom.valuerep import PersonName

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


def _complete_pydicom_charsets() -> None:
    """Fill two gaps of pydicom 3.0's character set tables, once at import (no entry replaced).

    ISO_IR 203 (Latin alphabet No. 9, PS3.3 Table C.12-2/C.12-3; escape ESC 02/13 06/02) is a
    defined term pydicom lacks: it would decode such sources as Latin-1 (wrong for Œ, œ, Š, Ž, €).

    ISO 2022 IR 58 (GB 2312, PS3.5 Annex K): pydicom hands the bytes with their escape sequence to
    Python's gb2312 codec, which does not know ISO 2022 escapes, so names decode as "$)A王" and
    encode without the escape. Handled like ISO 2022 IR 149 (split at the escapes, decode each
    fragment), decoding and encoding give the bytes of the standard's example.
    """
    charset = pydicom.charset
    charset.python_encoding.setdefault("ISO_IR 203", "iso8859_15")
    charset.python_encoding.setdefault("ISO 2022 IR 203", "iso8859_15")
    charset.CODES_TO_ENCODINGS.setdefault(charset.ESC + b"-b", "iso8859_15")
    charset.ENCODINGS_TO_CODES.setdefault("iso8859_15", charset.ESC + b"-b")
    charset.handled_encodings = tuple(e for e in charset.handled_encodings if e != "iso_ir_58")


_complete_pydicom_charsets()


def current_sop_class(sop_class_uid: str) -> str:
    """The SOP class a new object derived from ``sop_class_uid`` is written in: its successor if retired."""
    return RETIRED_SUCCESSORS.get(str(sop_class_uid), str(sop_class_uid))


def _person_name(value):
    # str() decodes with the encodings the value was read with (all three component groups);
    # the new PersonName has no encoded form yet, so it is encoded in UTF-8 on write.
    return PersonName(str(value)) if value not in (None, "") else value


def _decoded_copy(src: Dataset) -> Dataset:
    """New Dataset whose text values are ``str``, decoded with ``src``'s own declaration.

    Iterating a pydicom Dataset converts each raw element with the dataset's (or, in a sequence
    item, the parent's) character set. PN values are rebuilt from their decoded text: pydicom's
    in-place ``Dataset.decode`` would re-encode an in-memory name with Latin-1 and decode it with
    the declared set (mojibake), so it is not used. Non-text elements are shallow copies (pixel
    bytes shared, not copied); a copy, because pydicom assigns into an existing element and a
    shared one would let our edits leak into the caller's dataset."""
    out = Dataset()
    for elem in src:
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", [_decoded_copy(item) for item in elem.value]))
        elif elem.VR == "PN":
            value = [_person_name(v) for v in elem.value] if elem.VM > 1 else _person_name(elem.value)
            out.add(DataElement(elem.tag, "PN", value))
        else:
            out.add(copy.copy(elem))
    return out


def writable_source(src: Dataset) -> Dataset:
    """A copy of ``src`` with every text value decoded, ``ISO_IR 192`` declared and the Type 2
    identity attributes present (empty when the source lacks them). ``src`` is not changed.

    Undecodable bytes become U+FFFD with a pydicom warning (pydicom's default reading
    validation), never an exception.
    """
    out = _decoded_copy(src)
    meta = getattr(src, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
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
