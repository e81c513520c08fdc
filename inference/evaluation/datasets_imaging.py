"""Readers for the segmentation (mask generation) and BraTS synthesis benchmarks, in released layouts.

Segmentation runs the edit flow with "Segment the <target>." (the instruction the gateway's segment
task uses) and thresholds the drawn mask picture at 128. The UniMedVL evaluation prompts are not
released; the targets below name what each dataset annotates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .items import Dataset, DatasetError, Item, Source

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _seg_item(
    root: Path, item_id: str, image: Path, mask: Path | list[Path], how: str, target: str, group: str | None = None
) -> Item:
    masks = [Source(str(m.relative_to(root)), how) for m in (mask if isinstance(mask, list) else [mask])]
    return Item(
        id=item_id,
        task="segment",
        inputs=[Source(str(image.relative_to(root)))],
        prompt=f"Segment the {target}.",
        reference=masks[0] if len(masks) == 1 else masks,
        group=group,
        target=target,
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)


def _pairs(inp: Path, gt: Path, mask_name: Callable[[Path], str]) -> list[tuple[Path, Path]]:
    """(image, its mask) for every image of ``inp``; a missing mask is an error naming both files."""
    out = []
    for img in _images(inp):
        mask = gt / mask_name(img)
        if not mask.is_file():
            raise DatasetError(f"{img}: its mask {mask} is missing")
        out.append((img, mask))
    return out


def _nonempty(items: list[Item], folder: Path, layout: str) -> list[Item]:
    if not items:
        raise DatasetError(f"{folder}: no image found; expected {layout}")
    return items


BUSI_LAYOUT = "Dataset_BUSI_with_GT: benign/, malignant/, normal/ with 'NAME (n).png' and 'NAME (n)_mask.png'"


def read_busi(root: Path) -> Dataset:
    """BUSI (Al-Dhabyani et al. 2020): ``benign/``, ``malignant/``, ``normal/``; each ``X (n).png`` has
    ``X (n)_mask.png`` (extra lesions in ``_mask_1.png`` ...; their union is the reference). Normal images
    have empty masks (Dice 1.0 when the model draws nothing). No official split: every image is scored."""
    items = []
    for cls in ("benign", "malignant", "normal"):
        folder = root / cls
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing: expected {BUSI_LAYOUT}")
        for img in _images(folder):
            if "_mask" in img.stem:
                continue
            main = folder / f"{img.stem}_mask{img.suffix}"
            if not main.is_file():
                raise DatasetError(f"{img}: no mask {main.name} beside it")
            masks = [main, *sorted(folder.glob(f"{glob_escape(img.stem)}_mask_*{img.suffix}"))]
            items.append(_seg_item(root, f"{cls}/{img.stem}", img, masks, "mask:nonzero", "breast tumor", cls))
    return Dataset("busi", root, _nonempty(items, root, BUSI_LAYOUT))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


GLAS_LAYOUT = "the GlaS (Warwick QU) release: testA_N.bmp / testB_N.bmp with testA_N_anno.bmp"


def read_glas(root: Path) -> Dataset:
    """GlaS (Sirinukunwattana et al. 2017): ``testA_N.bmp`` and ``testB_N.bmp`` with ``*_anno.bmp``
    instance labels (any non-zero label is gland). The folder may be the release's top folder."""
    folder = root
    if not list(root.glob("testA_*.bmp")):
        sub = [d for d in root.iterdir() if d.is_dir() and list(d.glob("testA_*.bmp"))]
        if len(sub) != 1:
            raise DatasetError(f"{root}: no testA_*.bmp here or in one sub-folder; expected {GLAS_LAYOUT}")
        folder = sub[0]
    items = []
    for img in sorted(folder.glob("test[AB]_*.bmp")):
        if img.stem.endswith("_anno"):
            continue
        anno = folder / f"{img.stem}_anno.bmp"
        if not anno.is_file():
            raise DatasetError(f"{img}: no annotation {anno.name} beside it")
        items.append(_seg_item(root, img.stem, img, anno, "mask:nonzero", "glands", img.stem.split("_")[0]))
    return Dataset("glas", root, _nonempty(items, folder, GLAS_LAYOUT))


ISIC_LAYOUT = "ISIC2018_Task1-2_<Test|Validation|Training>_Input/ and ISIC2018_Task1_<same>_GroundTruth/"


def read_isic2018(root: Path) -> Dataset:
    """ISIC 2018 Task 1: ``ISIC2018_Task1-2_Test_Input/ISIC_N.jpg`` with
    ``ISIC2018_Task1_Test_GroundTruth/ISIC_N_segmentation.png``; the Validation, then Training pair when
    no test ground truth is present (noted in the summary)."""
    for split in ("Test", "Validation", "Training"):
        inp, gt = root / f"ISIC2018_Task1-2_{split}_Input", root / f"ISIC2018_Task1_{split}_GroundTruth"
        if inp.is_dir() and gt.is_dir():
            break
    else:
        raise DatasetError(f"{root}: no input/ground-truth folder pair; expected {ISIC_LAYOUT}")
    items = [
        _seg_item(root, img.stem, img, mask, "mask:ge128", "skin lesion")
        for img, mask in _pairs(inp, gt, lambda p: f"{p.stem}_segmentation.png")
    ]
    notes = [] if split == "Test" else [f"no test ground truth: the {split} split is scored"]
    return Dataset("isic2018", root, _nonempty(items, inp, ISIC_LAYOUT), notes=notes)


REFUGE_LAYOUT = "REFUGE test: Test400/*.jpg and REFUGE-Test-GT/Disc_Cup_Masks/*.bmp (0 cup, 128 rim, 255 background)"


def read_refuge(root: Path) -> Dataset:
    """REFUGE (Orlando et al. 2020) test set: ``Test400/T0001.jpg`` and
    ``REFUGE-Test-GT/Disc_Cup_Masks/T0001.bmp`` (0 = optic cup, 128 = rim, 255 = background). Two items
    per image: optic disc (cup + rim) and optic cup; the headline is the mean of the two Dice (mDice)."""
    inp, gt = root / "Test400", root / "REFUGE-Test-GT" / "Disc_Cup_Masks"
    if not inp.is_dir() or not gt.is_dir():
        raise DatasetError(f"{root}: expected {REFUGE_LAYOUT}")
    items = []
    for img, mask in _pairs(inp, gt, lambda p: f"{p.stem}.bmp"):
        items.append(_seg_item(root, f"{img.stem}/disc", img, mask, "mask:lt255", "optic disc"))
        items.append(_seg_item(root, f"{img.stem}/cup", img, mask, "mask:eq0", "optic cup"))
    return Dataset("refuge", root, _nonempty(items, inp, REFUGE_LAYOUT))


KVASIR_LAYOUT = "the Kvasir-SEG release: images/NAME.jpg and masks/NAME.jpg"


def read_kvasir_seg(root: Path) -> Dataset:
    """Kvasir-SEG (Jha et al. 2020): ``images/NAME.jpg`` and ``masks/NAME.jpg`` (JPEG masks: >= 128 is polyp)."""
    inp, gt = root / "images", root / "masks"
    if not inp.is_dir() or not gt.is_dir():
        raise DatasetError(f"{root}: expected {KVASIR_LAYOUT}")
    items = [
        _seg_item(root, img.stem, img, mask, "mask:ge128", "polyp") for img, mask in _pairs(inp, gt, lambda p: p.name)
    ]
    return Dataset("kvasir-seg", root, _nonempty(items, inp, KVASIR_LAYOUT))


BRATS_LAYOUT = "BraTS 2021: BraTS2021_NNNNN/BraTS2021_NNNNN_t2.nii.gz and _flair.nii.gz"
BRATS_PROMPTS = {
    "t2->flair": "Translate this T2-weighted brain MRI into a FLAIR image.",
    "flair->t2": "Translate this FLAIR brain MRI into a T2-weighted image.",
}


def read_brats(root: Path) -> Dataset:
    """BraTS 2021 T2 <-> FLAIR synthesis: per subject folder ``BraTS2021_N/`` the ``_t2.nii.gz`` and
    ``_flair.nii.gz`` volumes; the middle axial slice, both directions (the paper averages them)."""
    import SimpleITK as sitk

    subjects = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("BraTS"))
    if not subjects:
        raise DatasetError(f"{root}: no BraTS* subject folder; expected {BRATS_LAYOUT}")
    items = []
    for d in subjects:
        vols = {m: d / f"{d.name}_{m}.nii.gz" for m in ("t2", "flair")}
        for p in vols.values():
            if not p.is_file():
                raise DatasetError(f"{p} is missing: expected {BRATS_LAYOUT}")
        try:
            sizes = {m: sitk.ImageFileReader() for m in vols}
            depth = set()
            for m, reader in sizes.items():
                reader.SetFileName(str(vols[m]))
                reader.ReadImageInformation()
                depth.add((reader.GetSize()[2], reader.GetSize()[:2]))
        except RuntimeError as exc:
            raise DatasetError(f"{d}: unreadable NIfTI ({exc})") from exc
        if len(depth) != 1:
            raise DatasetError(f"{d}: the T2 and FLAIR volumes have different sizes")
        z = next(iter(depth))[0] // 2
        for direction, prompt in BRATS_PROMPTS.items():
            src, dst = direction.split("->")
            items.append(
                Item(
                    id=f"{d.name}/{direction}",
                    task="synthesis",
                    inputs=[Source(str(vols[src].relative_to(root)), f"nifti:z={z}")],
                    prompt=prompt,
                    reference=Source(str(vols[dst].relative_to(root)), f"nifti:z={z}"),
                    group=direction,
                )
            )
    return Dataset("brats", root, items)
