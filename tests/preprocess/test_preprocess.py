"""DICOM pixels -> model images: decoding, rescale, windowing, inversion, colour, selection."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference import preprocess as pp


def _ct(rows: int = 32, cols: int = 32, z: float = 0.0, value: int = 0, iop=(1, 0, 0, 0, 1, 0)) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.ImageOrientationPatient = list(iop)
    normal = np.cross(iop[:3], iop[3:])
    ds.ImagePositionPatient = list(np.asarray(normal) * z)
    ds.InstanceNumber = 1
    arr = np.full((rows, cols), value, dtype=np.uint16)
    ds.PixelData = arr.tobytes()
    return ds


def test_rescale_and_ct_window_presets() -> None:
    ds = _ct(value=1024 + 40)  # 40 HU, the soft-tissue window centre
    frames = pp.decode_frames(ds)
    assert frames.shape == (1, 32, 32)
    assert float(frames[0, 0, 0]) == 40.0
    img = pp.dataset_to_images(ds)[0]  # no DICOM window -> CT soft-tissue preset
    assert img.window == pp.Window(40.0, 400.0)
    assert img.pixels.shape == (32, 32, 3) and img.pixels.dtype == np.uint8
    assert abs(int(img.pixels[0, 0, 0]) - 128) <= 1
    lung = pp.dataset_to_images(ds, window="lung")[0]
    # 40 HU is above the lung window centre (-600) by 640 of 1500 width -> about 0.927 of range
    assert abs(int(lung.pixels[0, 0, 0]) - round((640 + 0.5) / 1499 * 255 + 127.5)) <= 2


def test_dicom_window_is_used_and_monochrome1_is_inverted() -> None:
    ds = _ct(value=1024 + 100)
    ds.WindowCenter, ds.WindowWidth = 100, 200
    mono2 = pp.dataset_to_images(ds)[0].pixels[0, 0, 0]
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = pp.dataset_to_images(ds)[0].pixels[0, 0, 0]
    assert int(mono1) == 255 - int(mono2)
    assert pp.dataset_to_images(ds, window=[100, 200])[0].window == pp.Window(100.0, 200.0)
    with pytest.raises(pp.PreprocessError, match=r"\[center, width\]"):
        pp.dataset_to_images(ds, window=[1, 2, 3])
    with pytest.raises(pp.PreprocessError, match="unknown window preset"):
        pp.dataset_to_images(ds, window="nonsense")


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",
        "JPEG-LL.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_rle.dcm",
        "US1_J2KR.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_ybr_full_uncompressed.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
    ],
)
def test_compressed_and_colour_sources_decode(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    imgs = pp.dataset_to_images(ds, frames="middle")
    assert imgs, name
    img = imgs[0]
    assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3 and img.pixels.dtype == np.uint8
    assert img.pixels.shape[:2] == (img.source_rows, img.source_columns)  # no resize before the engine
    assert img.pixels.std() > 1.0, "decoded image should not be flat"


def test_ybr_is_converted_to_rgb() -> None:
    ybr = pydicom.dcmread(get_testdata_file("SC_ybr_full_uncompressed.dcm"))
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    a = pp.dataset_to_images(ybr)[0].pixels.astype(int)
    b = pp.dataset_to_images(rgb)[0].pixels.astype(int)
    diff = np.abs(a - b)
    # the same picture: YBR_FULL -> RGB rounding only (a few pixels at colour edges differ more)
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_multiframe_frame_selection() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    assert len(pp.dataset_to_images(ds)) == 10
    assert [i.frame_index for i in pp.dataset_to_images(ds, frames="every:4")] == [0, 4, 8]


def test_series_sorted_along_oblique_normal_and_key_slices() -> None:
    iop = (0.866, 0.5, 0.0, -0.5, 0.866, 0.0)
    sl = [_ct(z=z, value=1024 + int(z), iop=iop) for z in (30, -10, 10, 0, 20, -20)]
    imgs = pp.series_to_images(sl, window=(0, 100))
    assert [round(i.position) for i in imgs] == [-20, -10, 0, 10, 20, 30]
    assert pp.select_indices(100, "key:5") == [10, 30, 50, 69, 89]
    assert pp.select_indices(3, 10) == [0, 1, 2]
    with pytest.raises(pp.PreprocessError, match="invalid slice selection"):
        pp.select_indices(10, "every:0")


def test_large_images_are_downscaled_preserving_aspect() -> None:
    ds = _ct(rows=600, cols=1500)
    img = pp.dataset_to_images(ds, max_side=1000)[0]
    assert img.pixels.shape[:2] == (400, 1000)
    assert img.notes and "downscaled" in img.notes[0]


def test_undecodable_pixels_give_a_clear_error() -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    broken = copy.deepcopy(ds)
    broken.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    with pytest.raises(pp.PreprocessError, match="cannot decode pixel data"):
        pp.dataset_to_images(broken)
    nopix = _ct()
    del nopix.PixelData
    with pytest.raises(pp.PreprocessError, match="no pixel data"):
        pp.decode_frames(nopix)


def test_mask_resampled_back_onto_source_grid() -> None:
    out = np.zeros((64, 64, 3), dtype=np.uint8)
    out[16:32, 32:48] = 255  # a square in the model's 64x64 output
    mask = pp.mask_from_output(out, 128, 256)
    assert mask.shape == (128, 256)
    ys, xs = np.nonzero(mask)
    assert 30 <= ys.min() <= 34 and 62 <= ys.max() <= 66
    assert 126 <= xs.min() <= 130 and 190 <= xs.max() <= 194
    f = pp.resample_to_source(np.ones((8, 8), np.float32), 16, 16)
    assert f.shape == (16, 16) and np.allclose(f, 1.0)


# --------------------------------------------------------------------------- VOI and Modality LUTs


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_the_source_voi_function_is_applied(function: str) -> None:
    stored = np.linspace(824, 1424, 32 * 32).astype(np.uint16).reshape(32, 32)  # -200..400 HU
    ds = _ct(value=1024)
    ds.PixelData = stored.tobytes()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 100, 200, function
    img = pp.dataset_to_images(ds)[0]
    x = stored.astype(np.float64) - 1024  # the rescale of _ct
    c, w = 100.0, 200.0
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
        expected = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
    elif function == "LINEAR_EXACT":  # C.11.2.1.3.2
        expected = np.clip((x - c) / w * 255 + 127.5, 0, 255)
    else:  # C.11.2.1.3.1
        expected = 255 / (1 + np.exp(-4 * (x - c) / w))
    assert np.abs(img.pixels[..., 0].astype(float) - expected).max() <= 1.0
    if function != "LINEAR":
        assert any(function in n for n in img.notes)
    # A window asked for by the rule replaces the source's VOI, linear.
    asked = pp.dataset_to_images(ds, window=[100, 200])[0]
    assert asked.window == pp.Window(100.0, 200.0) and not asked.notes


def test_voi_lut_sequence_is_applied() -> None:
    ds = pydicom.dcmread(get_testdata_file("vlut_04.dcm"))
    item = ds.VOILUTSequence[0]
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    raw = ds.pixel_array.astype(np.int64)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = lut[np.clip(raw - first, 0, n - 1)] * 255 / (2**bits - 1)
    img = pp.dataset_to_images(ds)[0]
    assert np.abs(img.pixels[..., 0].astype(float) - expected).max() <= 1.0
    assert "VOI LUT Sequence" in " ".join(img.notes)


def test_modality_lut_sequence_is_applied() -> None:
    ds = pydicom.dcmread(get_testdata_file("mlut_18.dcm"))
    item = ds.ModalityLUTSequence[0]
    n, first, _ = (int(v) for v in item.LUTDescriptor)
    raw = ds.pixel_array.astype(np.int64)
    expected = np.asarray(item.LUTData, dtype=np.float64)[np.clip(raw - first, 0, n - 1)]
    assert np.array_equal(pp.decode_frames(ds)[0], expected.astype(np.float32))
