"""Metrics, from well-kept libraries, with the paper conventions where they differ.

- ROUGE-L: ``rouge-score`` ``RougeScorer(["rougeL"])`` F-measure; several references: the best F
  over them (``score_multi``).
- BLEU-1..4: ``nltk.translate.bleu_score.corpus_bleu``, corpus level over the whole test set,
  lower-cased word tokens, no smoothing (pycocoevalcap / R2Gen).
- Dice: ``medpy.metric.binary.dc``; both masks empty -> 1.0 (medpy: NaN); averaged per image
  (mDice), not pooled over the set.
- HD95: ``medpy.metric.binary.hd95`` with the voxel spacing in mm; undefined (None) when either
  mask is empty (medpy raises); averaged over the defined items, the others counted.
- SSIM: ``skimage.metrics.structural_similarity``, grayscale uint8, ``data_range=255``, default
  7x7 window; x100 in summaries like the paper.
- PSNR: ``skimage.metrics.peak_signal_noise_ratio``, ``data_range=255``; identical images capped
  at 100 dB (the library gives inf, which no mean survives).

Sources: rouge-score's ROUGE-1.5.5 port; the report-generation protocol of R2Gen
(``modules/metrics.py``, pycocoevalcap Bleu(4) + Rouge); Dice / mDice as in HealthGPT's and
UniMedVL's segmentation tables (per-image mean, percent).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np

PSNR_CAP_DB = 100.0
_WORD = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1]; the best over ``references``. ValueError if all are empty."""
    from rouge_score import rouge_scorer

    refs = [r for r in references if str(r).strip()]
    if not refs:
        raise ValueError("empty reference report")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return float(scorer.score_multi(refs, str(prediction))["rougeL"].fmeasure)


def bleu_tokens(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def corpus_bleu_n(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 over a corpus (cumulative, uniform weights, no smoothing), each in [0, 1]."""
    from nltk.translate.bleu_score import corpus_bleu

    if len(predictions) != len(references) or not predictions:
        raise ValueError("BLEU needs one reference list per prediction and at least one prediction")
    hyps = [bleu_tokens(p) for p in predictions]
    refs = [[bleu_tokens(r) for r in rs] for rs in references]
    out = {}
    with warnings.catch_warnings():  # nltk warns (and returns 0) when an n-gram order has no match
        warnings.simplefilter("ignore")
        for n in range(1, 5):
            out[f"bleu{n}"] = float(corpus_bleu(refs, hyps, weights=tuple([1.0 / n] * n)))
    return out


def _binary(mask: np.ndarray, what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"{what} must be 2-D or 3-D, got shape {m.shape}")
    return m.astype(bool)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice in [0, 1]; 1.0 when both masks are empty (a correct "nothing here")."""
    from medpy.metric.binary import dc

    p, r = _binary(prediction, "prediction mask"), _binary(reference, "reference mask")
    if p.shape != r.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, reference {r.shape}")
    if not p.any() and not r.any():
        return 1.0
    return float(dc(p, r))


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float] | None = None) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (pixels without ``spacing_mm``, ordered like
    the array axes); None when either mask is empty."""
    from medpy.metric.binary import hd95 as _hd95

    p, r = _binary(prediction, "prediction mask"), _binary(reference, "reference mask")
    if p.shape != r.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, reference {r.shape}")
    if not p.any() or not r.any():
        return None
    return float(_hd95(p, r, voxelspacing=tuple(spacing_mm) if spacing_mm is not None else None))


def _gray8(image: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        a = a.astype(np.float64).mean(axis=2)
    if a.ndim != 2:
        raise ValueError(f"{what} must be H x W or H x W x C, got shape {np.asarray(image).shape}")
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def ssim(prediction: np.ndarray, reference: np.ndarray) -> float:
    """SSIM in [-1, 1] of two 8-bit images (RGB averaged to gray), ``data_range=255``."""
    from skimage.metrics import structural_similarity

    p, r = _gray8(prediction, "prediction image"), _gray8(reference, "reference image")
    if p.shape != r.shape:
        raise ValueError(f"image shapes differ: prediction {p.shape}, reference {r.shape}")
    return float(structural_similarity(p, r, data_range=255))


def psnr(prediction: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images, capped at :data:`PSNR_CAP_DB` for identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    p, r = _gray8(prediction, "prediction image"), _gray8(reference, "reference image")
    if p.shape != r.shape:
        raise ValueError(f"image shapes differ: prediction {p.shape}, reference {r.shape}")
    with np.errstate(divide="ignore"):
        v = float(peak_signal_noise_ratio(r, p, data_range=255))
    return PSNR_CAP_DB if math.isinf(v) else min(v, PSNR_CAP_DB)


def mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
