"""Metrics against hand-computed values, and where our convention differs from the library default."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.evaluation import metrics


def test_rouge_l_hand_computed_and_multi_reference() -> None:
    # LCS("heart normal lungs clear", "the heart is normal") = "heart normal": P = 2/4, R = 2/4 -> F = 0.5
    assert metrics.rouge_l("heart normal lungs clear", ["the heart is normal"]) == pytest.approx(0.5)
    # second reference "lungs are clear": LCS "lungs clear" = 2 -> P 2/4, R 2/3 -> F = 4/7; best over refs
    both = metrics.rouge_l("heart normal lungs clear", ["the heart is normal", "lungs are clear"])
    assert both == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="empty reference"):
        metrics.rouge_l("x", ["  ", ""])


def test_bleu_corpus_level_hand_computed() -> None:
    # one 4-word hypothesis identical to its reference: every precision 1, no brevity penalty
    assert metrics.corpus_bleu_n(["The lungs are clear."], [["the lungs are clear"]]) == pytest.approx(
        {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
    )
    # "lungs clear" vs "the lungs are clear": p1 = 1, BP = exp(1 - 4/2) = e^-1
    out = metrics.corpus_bleu_n(["lungs clear"], [["the lungs are clear"]])
    assert out["bleu1"] == pytest.approx(math.exp(-1))
    assert out["bleu4"] < 1e-100  # no smoothing: no 4-gram match gives ~0 (nltk: sys.float_info.min)
    # multi-reference: the closer reference length sets the brevity penalty
    assert metrics.corpus_bleu_n(["lungs clear"], [["the lungs are clear", "lungs clear"]])["bleu1"] == 1.0


def test_dice_hand_computed_and_empty_masks() -> None:
    from medpy.metric.binary import dc

    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:2, :1] = True  # 2 pixels, both inside a
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    empty = np.zeros((4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0  # paper: a correct "nothing here"
    with np.errstate(invalid="ignore"):
        assert math.isnan(dc(empty, empty))  # the library default we deliberately override
    assert metrics.dice(a, empty) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(a, np.zeros((3, 3), bool))


def test_hd95_uses_spacing_and_is_undefined_for_empty_masks() -> None:
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b = np.zeros((20, 20), bool)
    b[5:12, 5:10] = True  # extends two rows further
    assert metrics.hd95(b, a) == pytest.approx(2.0)  # pixels
    assert metrics.hd95(b, a, spacing_mm=(0.5, 2.0)) == pytest.approx(1.0)  # rows are 0.5 mm apart
    assert metrics.hd95(a, np.zeros_like(a)) is None


def test_ssim_psnr() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    img = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = img.astype(int).copy()
    noisy[0, 0] += 10 if noisy[0, 0] < 200 else -10
    # MSE = 100 / 4096 -> PSNR = 10 log10(255^2 / MSE)
    assert metrics.psnr(noisy.astype(np.uint8), img) == pytest.approx(10 * math.log10(255**2 / (100 / 4096)))
    with np.errstate(divide="ignore"):
        assert math.isinf(peak_signal_noise_ratio(img, img, data_range=255))  # library default
    assert metrics.psnr(img, img) == metrics.PSNR_CAP_DB
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    assert metrics.ssim(rgb, img) == pytest.approx(1.0)  # RGB averaged to gray
