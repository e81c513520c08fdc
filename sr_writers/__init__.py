"""DICOM result objects (SR, SEG, SC, derived series) from typed model results.

Public API (each returns pydicom Datasets ready for ``to_bytes``/``write``):

- ``write_report_sr(result, sources, provenance)``        Enhanced SR, TID 2000 report + Q/A pairs
- ``write_seg(result, sources, provenance, segmentation_type="BINARY")``   SEG (BINARY or LABELMAP)
- ``write_measurements_sr(result, seg, sources, provenance)``  Comprehensive 3D SR, TID 1500
- ``write_secondary_capture(image, sources, provenance)``  SC for generated 2-D images
- ``write_derived_series(result, sources, provenance)``    same-SOP-class derived series
- ``labelmap_to_binary(seg, sources, provenance)``        re-render a refused LABELMAP as BINARY
- ``binary_fallback(sources, provenance)``                 the same as bytes -> bytes | None for the exporter
- ``native_binary(seg)``                                   an RLE BINARY SEG (odd grids) as Explicit VR LE

Every writer decodes the sources' text with their own Specific Character Set and writes UTF-8
(``source_prep``); refusals are SourceError subclasses (``errors``), all ValueErrors.

This package depends on pydicom, highdicom and numpy only.
"""

from .common import to_bytes, write
from .derived_series import write_derived_series
from .errors import NoFrameOfReferenceError, NoPatientGeometryError, SourceError, UnsupportedSourceError
from .measurements_sr import write_measurements_sr
from .report_sr import write_report_sr
from .results import (
    ABNORMAL_CATEGORY,
    LESION_TYPE,
    ORGAN_TYPE,
    TISSUE_CATEGORY,
    Code,
    DerivedImages,
    Provenance,
    ReportResult,
    Segment,
    SegmentationResult,
    SynthesizedImage,
)
from .secondary_capture import write_secondary_capture
from .seg import (
    LABELMAP_SOP_CLASS,
    SEG_SOP_CLASS,
    binary_fallback,
    labelmap_to_binary,
    native_binary,
    read_masks,
    write_seg,
)
from .uids import DEFAULT_UID_ROOT, new_uid

__all__ = [
    "ABNORMAL_CATEGORY",
    "DEFAULT_UID_ROOT",
    "LABELMAP_SOP_CLASS",
    "LESION_TYPE",
    "NoFrameOfReferenceError",
    "NoPatientGeometryError",
    "ORGAN_TYPE",
    "SEG_SOP_CLASS",
    "TISSUE_CATEGORY",
    "Code",
    "DerivedImages",
    "Provenance",
    "ReportResult",
    "Segment",
    "SegmentationResult",
    "SourceError",
    "SynthesizedImage",
    "UnsupportedSourceError",
    "binary_fallback",
    "labelmap_to_binary",
    "native_binary",
    "new_uid",
    "read_masks",
    "to_bytes",
    "write",
    "write_derived_series",
    "write_measurements_sr",
    "write_report_sr",
    "write_secondary_capture",
    "write_seg",
]
