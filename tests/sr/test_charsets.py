"""Every Specific Character Set of PS3.3 C.12.1.1.2 (and the misspellings archives hold) through
every writer: the output declares ISO_IR 192, and PatientName (all three component groups) and
the descriptions read back exactly as the source's, encoded in UTF-8.

Each source is encoded by pydicom in its declared set and read back from bytes, as it would
arrive; the real-world cases cr_charset_* are regression tests of the same kind."""

from __future__ import annotations

import io
import warnings

import pydicom
import pytest
from pydicom import Dataset, dcmwrite

from dicom_node.synthetic import ct_series
from sr_writers import (
    DerivedImages,
    ReportResult,
    SynthesizedImage,
    to_bytes,
    write_derived_series,
    write_measurements_sr,
    write_report_sr,
    write_secondary_capture,
    write_seg,
)

from .sources import REPORT, distinct_masks, modality_values, rgb_image

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"
CHINESE = "Wang^XiaoDong=王^小东=wang^xiaodong"
# (declared Specific Character Set, a name that set can hold, a description in it)
CHARSETS = [
    # single-byte, no code extensions (C.12.1.1.2 Table C.12-2)
    ("", "Smith^John", "CT Thorax"),
    ("ISO_IR 100", "Müller^Jörg", "Thorax nativ (Übersicht)"),
    ("ISO_IR 101", "Dvořák^Antonín", "Hrudník"),
    ("ISO_IR 109", "Ħal^Ġużeppi", "Ċentru"),
    ("ISO_IR 110", "Ķēniņš^Ādams", "Krūškurvis"),
    ("ISO_IR 144", "Иванов^Иван", "Грудная клетка"),
    ("ISO_IR 127", "قباني^نزار", "صدر"),
    ("ISO_IR 126", "Διονυσίου^Νίκος", "Θώρακας"),
    ("ISO_IR 138", "שרון^דבורה", "חזה"),
    ("ISO_IR 148", "Çelik^Ayşe", "Göğüs"),
    ("ISO_IR 203", "Œuvray^Zoë", "Thorax œdème"),
    ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ｷｮｳﾌﾞ"),
    ("ISO_IR 166", "สมชาย^ใจดี", "ทรวงอก"),
    # single-byte with code extensions (Table C.12-3)
    ("ISO 2022 IR 6", "Smith^John", "CT Thorax"),
    ("ISO 2022 IR 100", "Müller^Jörg", "Thorax nativ"),
    ("ISO 2022 IR 101", "Dvořák^Antonín", "Hrudník"),
    ("ISO 2022 IR 109", "Ħal^Ġużeppi", "Ċentru"),
    ("ISO 2022 IR 110", "Ķēniņš^Ādams", "Krūškurvis"),
    ("ISO 2022 IR 144", "Иванов^Иван", "Грудная клетка"),
    ("ISO 2022 IR 127", "قباني^نزار", "صدر"),
    ("ISO 2022 IR 126", "Διονυσίου^Νίκος", "Θώρακας"),
    ("ISO 2022 IR 138", "שרון^דבורה", "חזה"),
    ("ISO 2022 IR 148", "Çelik^Ayşe", "Göğüs"),
    ("ISO 2022 IR 203", "Œuvray^Zoë", "Thorax œdème"),
    ("ISO 2022 IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ｷｮｳﾌﾞ"),
    ("ISO 2022 IR 166", "สมชาย^ใจดี", "ทรวงอก"),
    # multi-byte with code extensions (Table C.12-4), first value empty as in PS3.5 Annex H/I
    (["", "ISO 2022 IR 87"], JAPANESE, "胸部"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "胸部"),
    (["", "ISO 2022 IR 87", "ISO 2022 IR 159"], JAPANESE, "胸部"),
    (["", "ISO 2022 IR 149"], KOREAN, "흉부"),
    (["", "ISO 2022 IR 58"], CHINESE, "胸部"),
    # multi-byte without code extensions (Table C.12-5)
    ("ISO_IR 192", "Wang^XiaoDong=王^小東=wang^xiaodong", "胸部 Thorax"),
    ("GB18030", CHINESE, "胸部"),
    ("GBK", CHINESE, "胸部"),
    # misspellings seen in archives (pydicom corrects them with a warning)
    ("ISO IR 192", "Müller^Jörg", "Thorax"),
    ("ISO-IR 100", "Müller^Jörg", "Thorax"),
    ("ISO_IR 100 ", "Müller^Jörg", "Thorax"),
    ("ISO IR 100", "Müller^Jörg", "Thorax"),
    ("ISO-IR 144", "Иванов^Иван", "Грудная клетка"),
    ("ISO_IR192", "Müller^Jörg", "Thorax"),
]


def _declared(source_charset) -> str:
    return "\\".join(source_charset) if isinstance(source_charset, list) else source_charset


def encoded_sources(charset, name: str, description: str) -> list[Dataset]:
    """A one-slice CT whose text pydicom encodes in ``charset``, read back from Part 10 bytes."""
    out = []
    for ds in ct_series(1, rows=8, columns=8, seed=11):
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        ds.StudyDescription = description
        ds.SeriesDescription = description
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the misspelled declarations
            dcmwrite(buf, ds, enforce_file_format=True)
            src = pydicom.dcmread(io.BytesIO(buf.getvalue()))
            assert str(src.PatientName) == name  # pydicom itself round-trips this set
        out.append(src)
    return out


def all_outputs(sources, provenance) -> dict[str, Dataset]:
    result = distinct_masks(sources, two_segments=False)
    seg = write_seg(result, sources, provenance)
    pixels = {str(s.SOPInstanceUID): modality_values(s) for s in sources}
    return {
        "report": write_report_sr(REPORT, sources, provenance),
        "vqa": write_report_sr(ReportResult(qa=[("Nodule?", "Yes")], title="VQA"), sources, provenance),
        "seg": seg,
        "tid1500": write_measurements_sr(result, seg, sources, provenance),
        "sc": write_secondary_capture(SynthesizedImage(rgb_image(8, 8)), sources, provenance),
        "derived": write_derived_series(DerivedImages(pixels, "translation"), sources, provenance)[0],
    }


@pytest.mark.parametrize("charset, name, description", CHARSETS, ids=[_declared(c[0]) or "default" for c in CHARSETS])
def test_every_character_set_through_every_writer(charset, name, description, provenance):
    sources = encoded_sources(charset, name, description)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = all_outputs(sources, provenance)
    for kind, ds in outputs.items():
        data = to_bytes(ds)
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.SpecificCharacterSet == "ISO_IR 192", kind
        assert str(back.PatientName) == str(sources[0].PatientName) == name, kind
        assert str(back.ReferringPhysicianName) == name, kind
        assert back.StudyDescription == description, kind
        assert name.encode("utf-8") in data, f"{kind}: PatientName is not stored as UTF-8"
    # the sources keep their values (the writers work on decoded copies)
    assert (
        str(sources[0].PatientName) == name and sources[0].SpecificCharacterSet != "ISO_IR 192" or "192" in str(charset)
    )
