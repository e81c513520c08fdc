"""Source series for the writer tests: synthetic CT in every ordering, a multi-frame enhanced
image, and pydicom's real-world test files. Every source goes through Part 10 bytes first, as it
would arrive from our storage."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file

from dicom_node.synthetic import ct_series
from sr_writers import SegmentationResult, new_uid, to_bytes
from sr_writers.results import ORGAN_TYPE, TISSUE_CATEGORY, Segment


def reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom test file {name} is not available offline (pydicom-data installed?)"
    return pydicom.dcmread(path)


def _legacy_enhanced() -> list[Dataset]:
    # Oblique, descending, with a gap, converted into one Legacy Converted Enhanced CT multi-frame image.
    series = ct_series(6, order="random", oblique_deg=15, gaps=(2,), seed=7)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=new_uid(), series_number=2, sop_instance_uid=new_uid(), instance_number=1
    )
    return [reread(mf)]


SOURCE_CASES = {
    "ascending": lambda: ct_series(6, order="ascending", seed=1),
    "descending": lambda: ct_series(6, order="descending", seed=2),
    "random": lambda: ct_series(6, order="random", seed=3),
    "oblique": lambda: ct_series(6, order="random", oblique_deg=25, seed=4),
    "gaps": lambda: ct_series(5, order="random", gaps=(1, 4), seed=5),
    "legacy_enhanced_ct": _legacy_enhanced,
    "enhanced_ct_real": lambda: [_testdata("eCT_Supplemental.dcm")],
    "ct_small_real": lambda: [_testdata("CT_small.dcm")],
    "mr_small_real": lambda: [_testdata("MR_small.dcm")],
}


def build_sources(case: str) -> list[Dataset]:
    return [reread(ds) if not hasattr(ds, "filename") else ds for ds in SOURCE_CASES[case]()]


def frame_keys(sources: list[Dataset]) -> list:
    """Source frame keys in the order the sources came (multi-frame: frame-number order)."""
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        uid = str(sources[0].SOPInstanceUID)
        return [(uid, n) for n in range(1, int(sources[0].NumberOfFrames) + 1)]
    return [str(s.SOPInstanceUID) for s in sources]


def distinct_masks(sources: list[Dataset], two_segments: bool = True) -> SegmentationResult:
    """A different rectangle on every other source frame (first included), so a mask that lands on
    the wrong slice or is flipped cannot match by accident; segment 2 (if any) never overlaps segment 1."""
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    segments = [Segment("Läsion ü")]
    if two_segments:
        segments.append(Segment("Organ", category=TISSUE_CATEGORY, property_type=ORGAN_TYPE))
    masks = {}
    for i, key in enumerate(frame_keys(sources)):
        if i % 2:
            continue
        m = np.zeros((len(segments), rows, cols), dtype=bool)
        r0, c0 = 1 + (3 * i) % max(rows // 2 - 4, 1), 2 + (5 * i) % max(cols // 2 - 5, 1)
        m[0, r0 : r0 + 3 + i % 3, c0 : c0 + 4] = True
        if two_segments:
            m[1, rows // 2 + 1 : rows // 2 + 4 + i % 2, cols // 2 : cols // 2 + 3] = True
        masks[key] = m
    return SegmentationResult(segments=segments, masks=masks)


def write_all_objects(sources: list[Dataset], provenance, out_dir) -> dict[str, Path]:
    """Every object type the writers make, for one source series, written under ``out_dir``."""
    from sr_writers import (
        DerivedImages,
        SynthesizedImage,
        write,
        write_derived_series,
        write_measurements_sr,
        write_report_sr,
        write_secondary_capture,
        write_seg,
    )

    out_dir = Path(out_dir)
    result = distinct_masks(sources)
    seg = write_seg(result, sources, provenance)
    objects = {
        "report_sr": write_report_sr(REPORT, sources, provenance),
        "seg_binary": seg,
        "seg_labelmap": write_seg(result, sources, provenance, segmentation_type="LABELMAP"),
        "measurements_sr": write_measurements_sr(result, seg, sources, provenance),
        "sc_rgb": write_secondary_capture(SynthesizedImage(rgb_image(), prompt=PROMPT), sources, provenance),
        "sc_mono": write_secondary_capture(SynthesizedImage(rgb_image()[..., 0]), sources, provenance),
    }
    single_frame = [
        s for s in sources if int(s.get("NumberOfFrames", 1) or 1) == 1 and "PerFrameFunctionalGroupsSequence" not in s
    ]
    if single_frame:
        pixels = {str(s.SOPInstanceUID): modality_values(s) * -1.0 + 100 for s in single_frame}
        derived = write_derived_series(DerivedImages(pixels, "modality translation CT->MR"), single_frame, provenance)
        objects["derived"] = derived[0]
    paths = {}
    for name, ds in objects.items():
        paths[name] = write(ds, out_dir / f"{name}.dcm")
    return paths


REPORT_TEXT = "Rundherd im rechten Oberlappen, 8 mm. 右肺上叶结节。"
PROMPT = "axial CT, chest, Läsion"


def _report():
    from sr_writers import ReportResult

    return ReportResult(
        findings=REPORT_TEXT,
        impression="Kontrolle in 3 Monaten empfohlen — AI draft.",
        qa=[("Is there a nodule?", "Yes, 8 mm, right upper lobe."), ("Größe?", "8 mm")],
    )


REPORT = _report()


def rgb_image(rows: int = 48, cols: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)


def modality_values(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def real_world_case(name: str) -> list[Dataset]:
    """The instances of one folder of ../shared/cases/real-world/ (made-up patients), file order."""
    from tests.conftest import REPO

    folder = REPO.parent / "shared" / "cases" / "real-world" / name
    files = sorted(folder.glob("*.dcm"))
    assert files, f"real-world case {name} not found under {folder}"
    return [pydicom.dcmread(f) for f in files]
