"""Re-rendering hook for objects a destination refuses by SOP class.

Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7) is new (Sup 243): many PACS
refuse it. When one does, the exporter calls a `Fallback` with the stored LABELMAP bytes;
it returns the same segmentation as a BINARY SEG (Part 10 bytes) or None when it cannot,
and the BINARY object is queued for the same destination with `fallback_of` set.
Re-rendering needs the source images, so the pipeline supplies the callable
(e.g. a closure over sr_writers.seg.labelmap_to_binary and the job's source datasets).
"""

from __future__ import annotations

from collections.abc import Callable

LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
BINARY_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

Fallback = Callable[[bytes], bytes | None]


def has_fallback(sop_class_uid: str) -> bool:
    return sop_class_uid == LABELMAP_SEG_SOP_CLASS
