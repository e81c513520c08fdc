"""synthesize: text -> image -> Secondary Capture (ConversionType SYN, SyntheticData YES) in the source study.

Text-to-image does not look at the source pixels, so one image is made per task (not per
series); the SC joins the study of the matched instances and references the first instance of
the first matched series (in slice order) as the image that triggered it.
"""

from __future__ import annotations

import numpy as np

from sr_writers import Provenance, SynthesizedImage, write_secondary_capture

from .base import Engine, PipelineOutput, Progress, SeriesInput, TaskParams, as_rgb8, report_progress
from .errors import readable_errors

SC_SERIES_NUMBER = 9004


def run_synthesize(
    series: list[SeriesInput],
    params: TaskParams,
    engine: Engine,
    provenance: Provenance,
    out: PipelineOutput,
    progress: Progress | None = None,
) -> None:
    report_progress(progress, 0, 1)
    kwargs: dict = {"steps": params.steps, "seed": params.seed, **params.image_options()}
    if params.size is not None:
        kwargs["size"] = params.size
    with readable_errors("image synthesis"):
        generated = engine.generate_image(params.prompt, **kwargs)
    pixels = as_rgb8(generated, "generated image")
    if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]):
        pixels = pixels[..., 0]  # gray content is stored as MONOCHROME2, a third of the size
    reference = series[0].datasets[0]
    with readable_errors("writing the secondary capture"):
        sc = write_secondary_capture(
            SynthesizedImage(
                pixels=np.ascontiguousarray(pixels), description="AI synthesized image", prompt=params.prompt
            ),
            [reference],
            provenance,
            series_number=SC_SERIES_NUMBER,
        )
    out.add(sc, "sc", None)
    out.results.append({"rows": int(pixels.shape[0]), "columns": int(pixels.shape[1]), "prompt": params.prompt})
    report_progress(progress, 1, 1)
