"""Secondary Capture for generated 2-D images (text-to-image and other synthesized pictures).

The image is placed in the source study as its own series. It carries no patient geometry (a
generated picture has none), ConversionType SYN, SyntheticData YES, BurnedInAnnotation NO,
RecognizableVisualFeatures NO, and no Rescale/Window attributes (an RGB SC that inherits the
source's window renders black in cornerstone-based viewers). BodyPartExamined is copied from
the source (highdicom drops it); General Series Laterality (type 2C) is then copied or left
empty, because dciodvfy asks for it once a body part is present.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from .common import (
    SourceError,
    apply_provenance,
    check_same_study,
    contributing_equipment,
    copy_body_part_and_laterality,
    copy_identity,
    finish,
    series_description,
)
from .results import Provenance, SynthesizedImage
from .source_prep import UTF8, for_highdicom
from .uids import new_uid

_NO_GEOMETRY_OR_VOI = (
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTSequence",
    "ModalityLUTSequence",
)


def write_secondary_capture(
    image: SynthesizedImage,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    series_number: int = 9004,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
) -> Dataset:
    """One SC instance in the study of ``sources`` (the first source gives patient/study identity)."""
    check_same_study(sources)
    sources, replaced = for_highdicom(sources)
    ref = sources[0]
    pixels = np.asarray(image.pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"synthesized image must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        photometric = "MONOCHROME2"
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        photometric = "RGB"
    else:
        raise ValueError(f"synthesized image must be (rows, cols) or (rows, cols, 3), got shape {pixels.shape}")
    if min(pixels.shape[:2]) < 1:
        raise ValueError("synthesized image is empty")
    if "StudyInstanceUID" not in ref:
        raise SourceError("source lacks StudyInstanceUID")
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8,
        # highdicom insists on a coordinate system; a generated picture has no known orientation,
        # so PatientOrientation is emptied below (type 2C: present, empty).
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        study_instance_uid=str(ref.StudyInstanceUID),
        series_instance_uid=series_instance_uid or new_uid(provenance.uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(provenance.uid_root),
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        patient_id=ref.get("PatientID"),
        patient_name=ref.get("PatientName"),
        patient_birth_date=ref.get("PatientBirthDate"),
        patient_sex=ref.get("PatientSex") or None,
        accession_number=ref.get("AccessionNumber"),
        study_id=ref.get("StudyID"),
        study_date=ref.get("StudyDate"),
        study_time=ref.get("StudyTime"),
        referring_physician_name=ref.get("ReferringPhysicianName"),
        contributing_equipment=[contributing_equipment(provenance, "synthesizing", "AI image synthesis")],
        specific_character_set=UTF8,
    )
    copy_identity(sc, ref)
    apply_provenance(sc, provenance)
    for kw in _NO_GEOMETRY_OR_VOI:
        if kw in sc:
            delattr(sc, kw)
    sc.PatientOrientation = None
    sc.Modality = "OT"
    sc.ConversionType = "SYN"
    sc.BurnedInAnnotation = "NO"
    sc.RecognizableVisualFeatures = "NO"
    sc.SyntheticData = "YES"
    sc.SeriesDescription = series_description(image.description, provenance)
    sc.ImageComments = (f"AI generated from prompt: {image.prompt}" if image.prompt else image.description)[:10240]
    sc.DerivationDescription = f"Synthesized by {provenance.model_name} {provenance.model_version}"[:1024]
    copy_body_part_and_laterality(sc, ref)
    sc.SourceImageSequence = _source_refs(sources)
    return finish(sc, provenance.uid_root, replaced)


def _source_refs(sources: Sequence[Dataset]):
    from pydicom.sequence import Sequence as DicomSequence

    items = []
    for s in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = s.SOPClassUID
        item.ReferencedSOPInstanceUID = s.SOPInstanceUID
        items.append(item)
    return DicomSequence(items)
