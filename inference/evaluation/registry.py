"""The benchmarks ``unimedvl eval`` knows: reader, headline metric and the published UniMedVL figure.

Published figures: the UniMedVL README "Quantitative Performance" tables (uni-medical/UniMedVL at
64a9915) and the paper (arXiv 2510.15710) as collected in the issue: VQA accuracy in %, ROUGE-L in
[0, 1], Dice and SSIM in %.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import datasets_imaging as img
from . import datasets_text as txt
from .items import Dataset, DatasetError


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    reader: Callable[[Path], Dataset]
    layout: str
    headline: str  # key in the summary's metrics
    published: float | None
    unit: str  # "%", "" (0..1), "dB"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("vqa-rad", "vqa", txt.read_vqa_rad, txt.VQA_RAD_LAYOUT, "closed_accuracy", 61.9, "%"),
        Benchmark("slake", "vqa", txt.read_slake, txt.SLAKE_LAYOUT, "closed_accuracy", 75.4, "%"),
        Benchmark("pathvqa", "vqa", txt.read_pathvqa, txt.PATHVQA_LAYOUT, "closed_accuracy", 53.5, "%"),
        Benchmark("omnimedvqa", "mcq", txt.read_omnimedvqa, txt.OMNI_LAYOUT, "accuracy", 85.8, "%"),
        Benchmark("mimic-cxr", "report", txt.read_mimic_cxr, txt.MIMIC_LAYOUT, "rougeL", 0.2727, ""),
        Benchmark("busi", "segment", img.read_busi, img.BUSI_LAYOUT, "mdice", 14.87, "%"),
        Benchmark("glas", "segment", img.read_glas, img.GLAS_LAYOUT, "mdice", 52.86, "%"),
        Benchmark("isic2018", "segment", img.read_isic2018, img.ISIC_LAYOUT, "mdice", 48.62, "%"),
        Benchmark("refuge", "segment", img.read_refuge, img.REFUGE_LAYOUT, "mdice", 55.86, "%"),
        Benchmark("kvasir-seg", "segment", img.read_kvasir_seg, img.KVASIR_LAYOUT, "mdice", 35.55, "%"),
        Benchmark("brats", "synthesis", img.read_brats, img.BRATS_LAYOUT, "ssim", 81.89, "%"),
    )
}


def read_benchmark(name: str, folder: str | Path) -> Dataset:
    """The items of benchmark ``name`` read from ``folder``. Raises DatasetError (unknown name, missing
    folder, wrong layout, missing images, empty references), the message naming the file."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected {BENCHMARKS[name].layout}")
    ds = BENCHMARKS[name].reader(root)
    if not ds.items:
        raise DatasetError(f"{root}: no item to evaluate; expected {BENCHMARKS[name].layout}")
    return ds
