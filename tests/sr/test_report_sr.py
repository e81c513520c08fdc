"""Enhanced SR report: TID 2000 structure, flags, device observer, evidence, Q/A items."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest

from sr_writers import ReportResult, SourceError, to_bytes, write_report_sr
from sr_writers.report_sr import device_uid

from .sources import REPORT, REPORT_TEXT, build_sources


def _read(ds):
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _items(ds, name):
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeMeaning == name:
            found.append(item)
        found.extend(_items(item, name))
    return found


def test_report_structure_and_flags(provenance):
    sources = build_sources("random")
    sr = _read(write_report_sr(REPORT, sources, provenance))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert sr.Modality == "SR"
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    findings = _items(sr, "Findings")[0]
    texts = [i.TextValue for i in findings.ContentSequence]
    assert texts[0] == REPORT_TEXT
    assert texts[1] == "Question: Is there a nodule?\nAnswer: Yes, 8 mm, right upper lobe."
    assert texts[2] == "Question: Größe?\nAnswer: 8 mm"
    assert all(i.RelationshipType == "CONTAINS" and i.ValueType == "TEXT" for i in findings.ContentSequence)
    impression = _items(sr, "Impressions")[0].ContentSequence[0]
    assert impression.ConceptNameCodeSequence[0].CodeMeaning == "Impression"
    assert "not verified" in _items(sr, "Comment")[0].TextValue


def test_ai_device_is_the_observer(provenance):
    sources = build_sources("ascending")
    sr = _read(write_report_sr(REPORT, sources, provenance))
    assert _items(sr, "Observer Type")[0].ConceptCodeSequence[0].CodeValue == "121007"
    assert _items(sr, "Device Observer UID")[0].UID == device_uid(provenance)
    assert _items(sr, "Device Observer Manufacturer")[0].TextValue == "UniMedVL project"
    assert _items(sr, "Device Observer Model Name")[0].TextValue == "UniMedVL"
    assert _items(sr, "Device Observer Serial Number")[0].TextValue == provenance.checkpoint_hash[:16]
    # highdicom's reader sees the same observer
    parsed = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    assert parsed.SOPInstanceUID == sr.SOPInstanceUID
    # one model + checkpoint -> one device UID across reports
    again = _read(write_report_sr(REPORT, sources, provenance))
    assert _items(again, "Device Observer UID")[0].UID == _items(sr, "Device Observer UID")[0].UID


def test_every_source_is_referenced_as_evidence(provenance):
    sources = build_sources("gaps")
    sr = _read(write_report_sr(REPORT, sources, provenance))
    refs = {
        r.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert refs == {s.SOPInstanceUID for s in sources}
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == sources[0].StudyInstanceUID


def test_vqa_only_and_impression_only_reports(provenance):
    sources = build_sources("ct_small_real")
    vqa = _read(write_report_sr(ReportResult(qa=[("Fracture?", "No")]), sources, provenance))
    assert [i.TextValue for i in _items(vqa, "Finding")] == ["Question: Fracture?\nAnswer: No"]
    assert not _items(vqa, "Impressions")
    imp = _read(write_report_sr(ReportResult(impression="Unauffällig."), sources, provenance))
    assert not _items(imp, "Findings") and _items(imp, "Impression")[0].TextValue == "Unauffällig."


def test_long_report_text_is_kept_whole(provenance):
    text = "Befund. " * 3000  # 24 000 characters: TextValue is UT
    sr = _read(write_report_sr(ReportResult(findings=text), build_sources("ascending"), provenance))
    assert _items(sr, "Finding")[0].TextValue == text.strip()


def test_bad_input_is_refused(provenance):
    with pytest.raises(ValueError, match="empty"):
        ReportResult()
    with pytest.raises(ValueError, match="question"):
        ReportResult(qa=[("", "x")])
    with pytest.raises(SourceError, match="no source"):
        write_report_sr(REPORT, [], provenance)
    a, b = build_sources("ascending"), build_sources("descending")
    with pytest.raises(SourceError, match="one study"):
        write_report_sr(REPORT, [a[0], b[0]], provenance)
