"""translate / super_resolve: per selected slice, the edit flow -> a derived series on the source grid.

The engine sees each slice through a VOI window (8-bit gray in RGB). Its output gray values are
mapped back through the inverse of that same window into the source's modality units (HU for
CT), so the derived series shows like the source when displayed in that window, which it is
given as its default. Values outside the window cannot be recovered: the derived series spans
exactly the window's range, and its derivation description says so.

The output is resampled onto the source rows x columns (also for super_resolve: the derived
series keeps the source grid and geometry, so it overlays and links slice by slice; the gain is
in the content, not in the matrix size). Sources larger than the engine's input limit are
downscaled by preprocessing first; the notes say when.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset

from inference.preprocess import ModelImage, Window, resample_to_source
from sr_writers import Code, DerivedImages, Provenance, write_derived_series

from .base import (
    Engine,
    PipelineOutput,
    Progress,
    SeriesInput,
    TaskParams,
    as_rgb8,
    prepare_images,
    report_progress,
)
from .errors import PipelineError, readable_errors

DERIVED_SERIES_NUMBER = {"translate": 9005, "super_resolve": 9007}
# CID 7203 is extensible; DCM 110001 "Image Processing" is the closest standard code for a
# learned image-to-image translation, 113085 "Spatial resampling" fits super-resolution.
DERIVATION_CODES = {
    "translate": Code("110001", "DCM", "Image Processing"),
    "super_resolve": Code("113085", "DCM", "Spatial resampling"),
}
SERIES_TEXT = {"translate": "AI translated images", "super_resolve": "AI super-resolved images"}
ACTION = {"translate": "image translation", "super_resolve": "super-resolution"}


def unwindow(gray: np.ndarray, window: Window) -> np.ndarray:
    """Inverse of the linear VOI window (PS3.3 C.11.2.1.2) used by preprocessing: 0..255 -> modality units."""
    w = max(window.width - 1.0, 1e-6)
    return (np.asarray(gray, dtype=np.float64) / 255.0 - 0.5) * w + (window.center - 0.5)


def output_to_modality(output: np.ndarray, image: ModelImage, source: Dataset) -> np.ndarray:
    """An engine output picture -> float modality values on the source grid."""
    if image.window is None:
        raise PipelineError("image translation needs a monochrome source (colour images have no window to invert)")
    gray = as_rgb8(output, "image").astype(np.float32).mean(axis=2)
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        gray = 255.0 - gray  # preprocessing inverted MONOCHROME1 for the model; undo before unwindowing
    gray = resample_to_source(gray, image.source_rows, image.source_columns)
    return unwindow(np.clip(gray, 0.0, 255.0), image.window)


def _window_text(w: Window) -> str:
    return f"C {w.center:g} W {w.width:g}"


def run_image_to_image(
    series: SeriesInput,
    params: TaskParams,
    engine: Engine,
    provenance: Provenance,
    out: PipelineOutput,
    progress: Progress | None = None,
) -> None:
    kind = params.kind
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in series.datasets):
        raise PipelineError(f"{kind} writes derived series for single-frame sources only; this series is multi-frame")
    photometric = {str(d.get("PhotometricInterpretation", "")) for d in series.datasets}
    if not photometric <= {"MONOCHROME1", "MONOCHROME2"}:
        raise PipelineError(f"{kind} needs monochrome images; this series is {', '.join(sorted(photometric))}")
    images = prepare_images(series, params, out)
    by_uid = {str(d.SOPInstanceUID): d for d in series.datasets}
    pixels: dict[str, np.ndarray] = {}
    windows: dict[str, Window] = {}
    for i, img in enumerate(images):
        report_progress(progress, i, len(images))
        with readable_errors(ACTION[kind]):
            result = engine.edit_image(
                img.pixels, params.prompt, steps=params.steps, seed=params.seed, **params.image_options()
            )
        with readable_errors(ACTION[kind]):
            pixels[img.sop_instance_uid] = output_to_modality(result, img, by_uid[img.sop_instance_uid])
        windows[img.sop_instance_uid] = img.window  # type: ignore[assignment]
    distinct = sorted({_window_text(w) for w in windows.values()})
    description = (
        f"AI {ACTION[kind]} ({params.prompt}); 8-bit output mapped back through the input window "
        f"{', '.join(distinct)}: values outside that window are not represented"
    )
    with readable_errors(f"writing the {ACTION[kind]} series"):
        derived = write_derived_series(
            DerivedImages(
                pixels=pixels,
                derivation_description=description,
                derivation_code=DERIVATION_CODES[kind],
                series_description=SERIES_TEXT[kind],
            ),
            [d for d in series.datasets if str(d.SOPInstanceUID) in pixels],
            provenance,
            series_number=DERIVED_SERIES_NUMBER[kind],
        )
    for ds, src_uid in zip(derived, _sources_of(derived), strict=True):
        # Default display in the window the model saw, so the derived slice looks like its source.
        w = windows[src_uid]
        ds.WindowCenter, ds.WindowWidth = round(w.center, 4), round(w.width, 4)
        out.add(ds, "derived", series.series_instance_uid)
    if len(pixels) < len(series.datasets):
        out.note(f"{ACTION[kind]} ran on {len(pixels)} of {len(series.datasets)} slices (slices={params.slices!r})")
    out.results.append(
        {
            "series_instance_uid": series.series_instance_uid,
            "slices": len(pixels),
            "window": distinct,
        }
    )
    report_progress(progress, len(images), len(images))


def _sources_of(derived: list[Dataset]) -> list[str]:
    return [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in derived]
