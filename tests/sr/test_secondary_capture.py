"""Secondary Capture for generated images."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from sr_writers import SynthesizedImage, to_bytes, write_secondary_capture

from .sources import build_sources, rgb_image
from .validators import unexpected_dciodvfy


def _read(ds):
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def test_rgb_synthesized_image(provenance):
    sources = build_sources("random")
    img = rgb_image()
    sc = _read(write_secondary_capture(SynthesizedImage(img, prompt="axial CT, Läsion"), sources, provenance))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.ConversionType == "SYN"
    assert sc.SyntheticData == "YES"
    assert sc.BurnedInAnnotation == "NO" and sc.RecognizableVisualFeatures == "NO"
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTSequence"):
        assert kw not in sc, kw
    assert np.array_equal(sc.pixel_array, img)
    assert "Läsion" in sc.ImageComments
    assert sc.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sc.BodyPartExamined == "CHEST"  # highdicom drops it; we copy it across
    assert "Laterality" not in sc  # CHEST is unpaired: Laterality must be absent
    assert {r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence} == {s.SOPInstanceUID for s in sources}
    purpose = [e.PurposeOfReferenceCodeSequence[0].CodeValue for e in sc.ContributingEquipmentSequence]
    assert "109100" in purpose  # Synthesizing Equipment


def test_monochrome_image(provenance):
    img = rgb_image()[..., 1]
    sc = _read(write_secondary_capture(SynthesizedImage(img), build_sources("ct_small_real"), provenance))
    assert sc.PhotometricInterpretation == "MONOCHROME2"
    assert np.array_equal(sc.pixel_array, img)


@pytest.mark.parametrize(
    "body_part, laterality, expect",
    [("KNEE", "", None), ("KNEE", "R", "R"), ("CHEST", "", "absent"), ("", "", None), ("BREAST", "L", "L")],
)
def test_laterality_follows_body_part(body_part, laterality, expect, provenance, tmp_path):
    sources = build_sources("ascending")[:1]
    if body_part:
        sources[0].BodyPartExamined = body_part
    else:
        del sources[0].BodyPartExamined
    if laterality:
        sources[0].Laterality = laterality
    sc = write_secondary_capture(SynthesizedImage(rgb_image()), sources, provenance)
    if expect == "absent":
        assert "Laterality" not in sc
    else:
        assert "Laterality" in sc and (sc.Laterality or None) == expect
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(sc))
    assert unexpected_dciodvfy(path) == []


def test_bad_images_are_refused(provenance):
    sources = build_sources("ascending")
    with pytest.raises(ValueError, match="uint8"):
        write_secondary_capture(SynthesizedImage(np.zeros((8, 8), np.float32)), sources, provenance)
    with pytest.raises(ValueError, match="shape"):
        write_secondary_capture(SynthesizedImage(np.zeros((8, 8, 4), np.uint8)), sources, provenance)
