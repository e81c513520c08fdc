"""Enhanced SR, TID 2000 style report (Findings, Impression, question/answer pairs) from the AI model.

Layout of the content tree:

    CONTAINER (LN 18748-4 Diagnostic Imaging Report, TID 2000)
      HAS CONCEPT MOD  CODE Language of Content Item and Descendants
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model/Serial
      CONTAINS TEXT    Comment: "AI-generated draft, not verified ..."
      CONTAINS CONTAINER (LN 59776-5 Findings)
          CONTAINS TEXT Finding: <findings>
          CONTAINS TEXT Finding: "Question: ...\nAnswer: ..."   (one per Q/A pair)
      CONTAINS CONTAINER (LN 19005-8 Impressions)
          CONTAINS TEXT Impression: <impression>

There is no standard code for question/answer, so each pair is a Finding TEXT item: conformant
to TID 2000 and readable in every SR viewer.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept, ContainerContentItem, ContentSequence, RelationshipTypeValues, TextContentItem
from pydicom import Dataset

from .common import (
    SourceError,
    apply_provenance,
    check_same_study,
    contributing_equipment,
    copy_identity,
    finish,
    series_description,
)
from .results import Provenance, ReportResult
from .source_prep import for_highdicom
from .uids import new_uid, stable_uid

REPORT_TITLE = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = CodedConcept("59776-5", "LN", "Findings")
IMPRESSIONS_SECTION = CodedConcept("19005-8", "LN", "Impressions")
FINDING = CodedConcept("121071", "DCM", "Finding")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
COMMENT = CodedConcept("121106", "DCM", "Comment")
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "zh": "Chinese", "es": "Spanish", "it": "Italian"}


def device_uid(provenance: Provenance) -> str:
    """Stable Device Observer UID per model + checkpoint (so reports of one model group together)."""
    if provenance.device_uid:
        return provenance.device_uid
    name = f"{provenance.manufacturer}/{provenance.model_name}/{provenance.model_version}/{provenance.checkpoint_hash}"
    return stable_uid(name, provenance.uid_root)


def device_observer(provenance: Provenance) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(provenance),
            name=provenance.model_name[:64],
            manufacturer_name=provenance.manufacturer[:64],
            model_name=provenance.model_label,
            serial_number=provenance.serial_number,
        ),
    )


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _section(name: CodedConcept, items: list[TextContentItem]) -> ContainerContentItem:
    section = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    section.ContentSequence = ContentSequence(items, is_root=False, is_sr=True)
    return section


def build_content(result: ReportResult, provenance: Provenance, language: str = "en") -> ContainerContentItem:
    """The TID 2000 content tree (root container with its children)."""
    root = ContainerContentItem(name=REPORT_TITLE, template_id="2000")
    items: list[Dataset] = []
    lang_name = LANGUAGES.get(language.split("-")[0], language)
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(language=CodedConcept(language, "RFC5646", lang_name)))
    items.extend(device_observer(provenance))
    demo = " Produced with demo weights: not for clinical use." if provenance.is_demo else ""
    items.append(
        _text(
            COMMENT,
            f"AI-generated draft by {provenance.model_name} {provenance.model_version}; "
            f"not verified by a physician.{demo}",
        )
    )
    findings = [_text(FINDING, result.findings.strip())] if result.findings.strip() else []
    for question, answer in result.qa:
        findings.append(_text(FINDING, f"Question: {str(question).strip()}\nAnswer: {str(answer).strip()}"))
    if findings:
        items.append(_section(FINDINGS_SECTION, findings))
    if result.impression.strip():
        items.append(_section(IMPRESSIONS_SECTION, [_text(IMPRESSION, result.impression.strip())]))
    root.ContentSequence = ContentSequence(items, is_root=False, is_sr=True)
    return root


def write_report_sr(
    result: ReportResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    series_number: int = 9001,
    instance_number: int = 1,
    language: str = "en",
    series_instance_uid: str | None = None,
) -> Dataset:
    """Enhanced SR holding the AI report; PARTIAL, UNVERIFIED, PRELIMINARY; sources as evidence.

    Written in UTF-8 whatever the sources declare, with their identity (empty Type 2 attributes
    where they have none): see ``source_prep``. Raises SourceError for sources that cannot be
    referenced or do not share one study."""
    check_same_study(sources)
    if any("SOPInstanceUID" not in s or "SOPClassUID" not in s for s in sources):
        raise SourceError("every source dataset needs SOPClassUID and SOPInstanceUID to be referenced")
    sources, replaced = for_highdicom(sources)
    sr = hd.sr.EnhancedSR(
        evidence=sources,
        content=build_content(result, provenance, language),
        series_instance_uid=series_instance_uid or new_uid(provenance.uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(provenance.uid_root),
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=provenance.institution_name,
        contributing_equipment=[contributing_equipment(provenance, "processing", "AI report generation")],
    )
    copy_identity(sr, sources[0])
    apply_provenance(sr, provenance)
    sr.SeriesDescription = series_description(result.title, provenance)
    return finish(sr, provenance.uid_root, replaced)


__all__ = ["write_report_sr", "build_content", "device_observer", "device_uid"]
