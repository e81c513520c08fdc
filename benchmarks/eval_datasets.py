"""Tiny synthetic datasets in each benchmark's released layout (tests and benchmarks/eval.py).

``make_dataset(name, root, n)`` writes ``n`` items (n images; REFUGE scores two targets per image,
BraTS two directions per subject) with a bright disc on a dark background as the "lesion", so a
mask reference is never trivially empty except where a layout has empty masks (BUSI normal).
"""

from __future__ import annotations

import csv
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _disc(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, boolean mask) with a disc whose place depends on ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
    img = (rng.random((size, size)) * 40).astype(np.uint8)
    img[mask] = 200
    return np.repeat(img[:, :, None], 3, axis=2), mask


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


QUESTIONS = [
    ("Is there a lesion?", "yes", "CLOSED"),
    ("Is the heart enlarged?", "no", "CLOSED"),
    ("What organ is shown?", "left lung", "OPEN"),
    ("Which side is the lesion on?", "right", "CLOSED"),
]


def make_vqa_rad(root: Path, n: int = 4, size: int = 64) -> Path:
    entries = []
    for i in range(n):
        name = f"synpic{i:05d}.jpg"
        _save(root / "VQA_RAD Image Folder" / name, _disc(size, i)[0])
        q, a, t = QUESTIONS[i % len(QUESTIONS)]
        entries.append({"qid": i, "image_name": name, "question": q, "answer": a, "answer_type": t,
                        "phrase_type": "test_freeform" if i < n else "freeform"})  # fmt: skip
    entries.append({"qid": 999, "image_name": "synpic00000.jpg", "question": "Train?", "answer": "yes",
                    "answer_type": "CLOSED", "phrase_type": "freeform"})  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    return root


def make_slake(root: Path, n: int = 4, size: int = 64) -> Path:
    entries = []
    for i in range(n):
        name = f"xmlab{i}/source.jpg"
        _save(root / "imgs" / name, _disc(size, i)[0])
        q, a, t = QUESTIONS[i % len(QUESTIONS)]
        entries.append({"qid": i, "img_name": name, "question": q, "answer": a, "answer_type": t, "q_lang": "en"})
        entries.append({"qid": 1000 + i, "img_name": name, "question": "肺?", "answer": "是", "answer_type": t,
                        "q_lang": "zh"})  # fmt: skip
    (root / "test.json").write_text(json.dumps(entries, ensure_ascii=False))
    return root


def make_pathvqa(root: Path, n: int = 4, size: int = 64) -> Path:
    entries = []
    for i in range(n):
        _save(root / "images" / "test" / f"test_{i:04d}.jpg", _disc(size, i)[0])
        q, a, _ = QUESTIONS[i % len(QUESTIONS)]
        entries.append({"image": f"test_{i:04d}", "question": q, "answer": a})
    (root / "qas" / "test").mkdir(parents=True, exist_ok=True)
    (root / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(entries))
    return root


def make_omnimedvqa(root: Path, n: int = 4, size: int = 64) -> Path:
    entries = []
    for i in range(n):
        rel = f"Images/Synthetic/img_{i}.png"
        _save(root / rel, _disc(size, i)[0])
        opts = ["CT", "MRI", "X-ray", "Ultrasound"]
        entries.append({"question_id": f"q{i}", "question": "What modality is this?", "gt_answer": opts[i % 4],
                        "image_path": rel, "modality_type": "CT" if i % 2 else "MR",
                        **{f"option_{k}": v for k, v in zip("ABCD", opts, strict=True)}})  # fmt: skip
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (qa / "Synthetic.json").write_text(json.dumps(entries))
    return root


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 FINDINGS:
  The lungs are clear. There is no pleural effusion. Heart size is normal.

 IMPRESSION:
  No acute cardiopulmonary process.
"""


def make_mimic_cxr(root: Path, n: int = 3, size: int = 64) -> Path:
    rows = []
    for i in range(n):
        subject, study = f"1{i:07d}", f"5{i:07d}"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for k in range(2):
            dicom_id = f"d{i}-{k}"
            _save(folder / f"s{study}" / f"{dicom_id}.jpg", _disc(size, 10 * i + k)[0])
            rows.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subject, "split": "test"})
        (folder / f"s{study}.txt").write_text(REPORT)
    rows.append({"dicom_id": "x", "study_id": "59999999", "subject_id": "19999999", "split": "train"})
    with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dicom_id", "study_id", "subject_id", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


def make_busi(root: Path, n: int = 3, size: int = 64) -> Path:
    for i in range(n):
        cls = ("benign", "malignant", "normal")[i % 3]
        img, mask = _disc(size, i)
        if cls == "normal":
            mask = np.zeros_like(mask)
        _save(root / cls / f"{cls} ({i}).png", img)
        _save(root / cls / f"{cls} ({i})_mask.png", _mask8(mask))
        if i == 0:  # a second lesion in a second mask file, as some BUSI images have
            second = np.zeros_like(mask)
            second[:4, :4] = True
            _save(root / cls / f"{cls} ({i})_mask_1.png", _mask8(second))
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    return root


def make_glas(root: Path, n: int = 3, size: int = 64) -> Path:
    folder = root / "Warwick QU Dataset (Released 2016_07_08)"
    for i in range(n):
        img, mask = _disc(size, i)
        name = f"test{'AB'[i % 2]}_{i + 1}"
        _save(folder / f"{name}.bmp", img)
        _save(folder / f"{name}_anno.bmp", mask.astype(np.uint8) * (i + 1))  # instance labels 1..k
    _save(folder / "train_1.bmp", _disc(size, 99)[0])
    return root


def _image_mask_pairs(root: Path, n: int, size: int, image: Callable[[int], str], mask: Callable[[int], str]) -> Path:
    for i in range(n):
        img, m = _disc(size, i)
        _save(root / image(i), img)
        _save(root / mask(i), _mask8(m))
    return root


def make_isic2018(root: Path, n: int = 3, size: int = 64) -> Path:
    return _image_mask_pairs(root, n, size, lambda i: f"ISIC2018_Task1-2_Test_Input/ISIC_{i:07d}.jpg",
                             lambda i: f"ISIC2018_Task1_Test_GroundTruth/ISIC_{i:07d}_segmentation.png")  # fmt: skip


def make_refuge(root: Path, n: int = 2, size: int = 64) -> Path:
    for i in range(n):
        img, disc = _disc(size, i)
        label = np.full(disc.shape, 255, np.uint8)
        label[disc] = 128
        yy, xx = np.nonzero(disc)
        cy, cx = int(yy.mean()), int(xx.mean())
        label[cy - 2 : cy + 3, cx - 2 : cx + 3] = 0  # the cup inside the disc
        _save(root / "Test400" / f"T{i + 1:04d}.jpg", img)
        _save(root / "REFUGE-Test-GT" / "Disc_Cup_Masks" / f"T{i + 1:04d}.bmp", label)
    return root


def make_kvasir_seg(root: Path, n: int = 3, size: int = 64) -> Path:
    return _image_mask_pairs(root, n, size, lambda i: f"images/cju{i}.jpg", lambda i: f"masks/cju{i}.jpg")


def make_brats(root: Path, n: int = 2, size: int = 32, depth: int = 5) -> Path:
    import SimpleITK as sitk

    for i in range(n):
        d = root / f"BraTS2021_{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        t2 = rng.random((depth, size, size)).astype(np.float32) * 1000
        for name, vol in (("t2", t2), ("flair", 1000 - t2)):
            sitk.WriteImage(sitk.GetImageFromArray(vol), str(d / f"{d.name}_{name}.nii.gz"))
    return root


MAKERS: dict[str, Callable[..., Path]] = {
    "vqa-rad": make_vqa_rad,
    "slake": make_slake,
    "pathvqa": make_pathvqa,
    "omnimedvqa": make_omnimedvqa,
    "mimic-cxr": make_mimic_cxr,
    "busi": make_busi,
    "glas": make_glas,
    "isic2018": make_isic2018,
    "refuge": make_refuge,
    "kvasir-seg": make_kvasir_seg,
    "brats": make_brats,
}


def make_dataset(name: str, root: Path, n: int | None = None, size: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    kw = {"n": n} if n is not None else {}
    if name != "brats":
        kw["size"] = size
    return MAKERS[name](root, **kw)
