"""The five pipelines end to end with the tiny model on CPU: valid DICOM in the source study,
on the source grid and geometry, referencing the source instances, deterministic per seed."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from dicom_node.synthetic import make_ct_series
from inference.pipelines import PipelineError, run_task
from inference.preprocess import apply_window, mask_from_output, resample_to_source, series_to_images
from sr_writers import read_masks, to_bytes
from tests.sr.sources import build_sources

from .conftest import FAST, validate


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def texts(item) -> list[str]:
    out = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            out.append(str(child.TextValue))
        out.extend(texts(child))
    return out


def evidence_uids(sr) -> set[str]:
    return {
        str(inst.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }


def assert_same_study(ds, source) -> None:
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
        assert str(ds.get(kw, "")) == str(source.get(kw, "")), kw
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert str(ds.SeriesDescription).startswith("AI")


# --------------------------------------------------------------------------- report / vqa


def test_report_on_a_radiograph(engine, cr_image, tmp_path, validators) -> None:
    params = {"kind": "report", "prompt": "Write a chest radiograph report.", "slices": "all", **FAST}
    out = run_task("report", [cr_image], params, engine)
    assert [o.kind for o in out.objects] == ["sr"]
    sr = reread(out.objects[0].dataset)
    assert validate(sr, tmp_path / "sr.dcm", sr=True) == []
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    assert_same_study(sr, cr_image)
    assert evidence_uids(sr) == {cr_image.SOPInstanceUID}
    result = out.results[0]
    body = texts(sr)
    assert result["findings"] in body and result["impression"] in body
    assert sr.ManufacturerModelName.startswith(engine.info["model_name"])
    # same seed, same images: the same report
    again = run_task("report", [cr_image], params, engine)
    assert again.results[0]["findings"] == result["findings"]


def test_report_references_the_selected_ct_slices(engine, ct_series, tmp_path, validators) -> None:
    params = {"kind": "report", "prompt": "Describe the findings.", "slices": "key:2", "window": "lung", **FAST}
    out = run_task("report", list(reversed(ct_series)), params, engine)
    sr = reread(out.objects[0].dataset)
    assert validate(sr, tmp_path / "sr.dcm", sr=True) == []
    used = {i.sop_instance_uid for i in series_to_images(ct_series, window="lung", slices="key:2")}
    assert len(used) == 2 and evidence_uids(sr) == used


def test_vqa_answers_every_question_in_one_sr(engine, cr_image, tmp_path, validators) -> None:
    questions = ["Is there a pleural effusion?", "Is the heart enlarged?"]
    calls: list[tuple[int, int]] = []
    params = {"kind": "vqa", "questions": questions, "slices": "all", **FAST}
    out = run_task("vqa", [cr_image], params, engine, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]
    sr = reread(out.objects[0].dataset)
    assert validate(sr, tmp_path / "vqa.dcm", sr=True) == []
    qa = out.results[0]["qa"]
    assert [p["question"] for p in qa] == questions and all(p["answer"] for p in qa)
    body = "\n".join(texts(sr))
    for p in qa:
        assert f"Question: {p['question']}\nAnswer: {p['answer']}" in body
    assert_same_study(sr, cr_image)


# --------------------------------------------------------------------------- segment


def test_segmentation_is_on_the_source_grid_of_the_analysed_slices(engine, ct_series, tmp_path, validators) -> None:
    target = {"label": "lesion", "threshold": 128}
    params = {"kind": "segment", "targets": [target], "slices": "every:2", "window": "lung", **FAST}
    out = run_task("segment", ct_series, params, engine)
    assert [o.kind for o in out.objects] == ["seg", "tid1500"]
    seg, tid = (reread(o.dataset) for o in out.objects)
    assert validate(seg, tmp_path / "seg.dcm") == []
    assert validate(tid, tmp_path / "tid.dcm", sr=True) == []
    images = series_to_images(ct_series, window="lung", slices="every:2")
    analysed = [d for d in ct_series if d.SOPInstanceUID in {i.sop_instance_uid for i in images}]
    assert len(analysed) == 3
    assert_same_study(seg, ct_series[0])
    assert seg.FrameOfReferenceUID == ct_series[0].FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (64, 64) and int(seg.NumberOfFrames) == 3
    # every SEG frame sits at the position of the source slice it references
    by_uid = {d.SOPInstanceUID: d for d in ct_series}
    for item in seg.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in by_uid[src].ImagePositionPatient])
    # the masks read back per source slice are what the model drew for that very slice
    back = read_masks(seg, analysed)
    for img in images:
        drawn = engine.edit_image(img.pixels, "Segment the lesion.", steps=FAST["steps"], seed=FAST["seed"])
        want = mask_from_output(np.asarray(drawn), 64, 64, 128)
        assert want.any() and not want.all()  # a partial mask, so a misplaced one would show
        got = back.mask_for(img.sop_instance_uid, 64, 64)[0]
        assert np.array_equal(got, want), "mask landed on the wrong slice or grid"
    # a sample of slices (every:2): per-slice areas, but no volume that would undercount
    assert numbers(tid, "Volume") == [] and len(numbers(tid, "Area")) == 3
    assert any("no volumes" in n for n in out.notes)
    assert out.results[0]["segments"][0]["pixels"] == sum(
        int(back.mask_for(i.sop_instance_uid, 64, 64).sum()) for i in images
    )


def numbers(item, meaning: str) -> list[float]:
    """Values of the NUM content items named ``meaning`` anywhere in an SR tree."""
    out = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM" and child.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            out.append(float(child.MeasuredValueSequence[0].NumericValue))
        out.extend(numbers(child, meaning))
    return out


def test_whole_series_segmentation_measures_the_volume(engine, tmp_path, validators) -> None:
    series = [pydicom.dcmread(p) for p in make_ct_series(tmp_path / "ct3", 3, 32, 32, slice_thickness=2.0)]
    params = {"kind": "segment", "targets": [{"label": "lesion"}], "slices": "all", **FAST}
    out = run_task("segment", series, params, engine)
    seg, tid = (reread(o.dataset) for o in out.objects)
    assert validate(tid, tmp_path / "tid.dcm", sr=True) == []
    masks = read_masks(seg, series)
    pixels = sum(int(masks.mask_for(str(d.SOPInstanceUID), 32, 32).sum()) for d in series)
    assert pixels == out.results[0]["segments"][0]["pixels"] > 0
    # volume = voxels x pixel area (0.7 mm x 0.7 mm) x slice thickness (2 mm)
    assert numbers(tid, "Volume") == [pytest.approx(pixels * 0.7 * 0.7 * 2.0)]
    assert sum(numbers(tid, "Area")) == pytest.approx(pixels * 0.7 * 0.7)
    assert not [n for n in out.notes if "volume" in n.lower()]


def test_labelmap_with_two_targets(engine, ct_series, tmp_path, validators) -> None:
    targets = [
        {"label": "lesion", "threshold": 100},
        {"label": "body", "type": {"scheme": "SCT", "value": "113343008", "meaning": "Organ"}, "threshold": 60},
    ]
    params = {"kind": "segment", "targets": targets, "slices": "middle", "labelmap": True, **FAST}
    out = run_task("segment", ct_series, params, engine)
    assert [o.kind for o in out.objects] == ["seg"]
    seg = reread(out.objects[0].dataset)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert validate(seg, tmp_path / "labelmap.dcm") == []
    uid = series_to_images(ct_series, slices="middle")[0].sop_instance_uid
    masks = read_masks(seg, [d for d in ct_series if d.SOPInstanceUID == uid]).mask_for(uid, 64, 64)
    assert masks.shape == (2, 64, 64) and masks.sum(axis=0).max() <= 1
    assert [
        s.property_type.meaning for s in read_masks(seg, [d for d in ct_series if d.SOPInstanceUID == uid]).segments
    ] == [
        "Lesion",
        "Organ",
    ]


# --------------------------------------------------------------------------- translate / super_resolve


def test_translation_keeps_source_geometry_and_units(engine, ct_series, tmp_path, validators) -> None:
    params = {"kind": "translate", "prompt": "Translate this CT slice into a T2-weighted MR image.", "slices": "key:2"}
    out = run_task("translate", ct_series, {**params, **FAST}, engine)
    assert [o.kind for o in out.objects] == ["derived", "derived"]
    by_uid = {d.SOPInstanceUID: d for d in ct_series}
    images = {i.sop_instance_uid: i for i in series_to_images(ct_series, slices="key:2")}
    series_uids = set()
    for n, obj in enumerate(out.objects):
        ds = reread(obj.dataset)
        assert validate(ds, tmp_path / f"d{n}.dcm") == []
        src = by_uid[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert_same_study(ds, src)
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == src.SOPClassUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        for kw in (
            "Rows",
            "Columns",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
        ):
            assert ds[kw].value == src[kw].value, kw
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.SyntheticData == "YES"
        # shown in the window the model saw (the source's own first window, 40/400) ...
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 400.0)
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        assert hu.min() >= 40 - 200 - 1 and hu.max() <= 40 + 200 + 1
        # ... where it shows the model's output picture, resampled to the source grid
        img = images[src.SOPInstanceUID]
        drawn = np.asarray(engine.edit_image(img.pixels, params["prompt"], steps=FAST["steps"], seed=FAST["seed"]))
        gray = resample_to_source(drawn.mean(axis=2).astype(np.float32), 64, 64)
        shown = apply_window(hu.astype(np.float32), img.window).astype(int)
        assert np.abs(shown - gray).max() <= 2
    assert len(series_uids) == 1
    assert "values outside that window" in str(out.objects[0].dataset.DerivationDescription)


def test_super_resolution_of_a_monochrome1_radiograph(engine, cr_image, tmp_path, validators) -> None:
    cr_image.PhotometricInterpretation = "MONOCHROME1"  # bright = low values; the model saw it inverted
    params = {"kind": "super_resolve", "prompt": "Increase the resolution of this radiograph.", "slices": "all"}
    out = run_task("super_resolve", [cr_image], {**params, **FAST}, engine)
    (obj,) = out.objects
    ds = reread(obj.dataset)
    assert validate(ds, tmp_path / "sr_cr.dcm") == []
    assert (ds.Rows, ds.Columns) == (cr_image.Rows, cr_image.Columns)
    assert ds.SOPClassUID == cr_image.SOPClassUID and ds.DerivationCodeSequence[0].CodeValue == "113085"
    assert ds.ImagerPixelSpacing == cr_image.ImagerPixelSpacing and ds.PhotometricInterpretation == "MONOCHROME1"
    assert_same_study(ds, cr_image)
    # displayed as MONOCHROME1 in its window, the derived image is the model's picture
    (img,) = series_to_images([cr_image], slices="all")
    drawn = np.asarray(engine.edit_image(img.pixels, params["prompt"], steps=FAST["steps"], seed=FAST["seed"]))
    gray = resample_to_source(drawn.mean(axis=2).astype(np.float32), 128, 128)
    values = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    shown = 255 - apply_window(values, img.window).astype(int)
    assert np.abs(shown - gray).max() <= 2


def test_multiframe_segmentation_maps_frames(engine, tmp_path, validators) -> None:
    (enhanced,) = build_sources("legacy_enhanced_ct")  # 6 frames, oblique, stored out of spatial order
    params = {"kind": "segment", "targets": [{"label": "lesion", "threshold": 90}], "slices": "every:3", **FAST}
    out = run_task("segment", [enhanced], params, engine)
    seg, tid = (reread(o.dataset) for o in out.objects)
    assert validate(seg, tmp_path / "seg.dcm") == [] and validate(tid, tmp_path / "tid.dcm", sr=True) == []
    assert int(seg.NumberOfFrames) == 6  # a multi-frame source is one object: unselected frames stay, empty
    back = read_masks(seg, [enhanced])
    uid, rows, cols = str(enhanced.SOPInstanceUID), int(enhanced.Rows), int(enhanced.Columns)
    images = series_to_images([enhanced], slices="every:3")
    assert [i.frame_index for i in images] == [0, 3]
    for img in images:
        drawn = engine.edit_image(img.pixels, "Segment the lesion.", steps=FAST["steps"], seed=FAST["seed"])
        want = mask_from_output(np.asarray(drawn), rows, cols, 90)
        assert want.any() and not want.all()  # a partial mask, so a misplaced one would show
        assert np.array_equal(back.mask_for((uid, img.frame_index + 1), rows, cols)[0], want)
    for n in (2, 3, 5, 6):
        assert not back.mask_for((uid, n), rows, cols).any()


# --------------------------------------------------------------------------- synthesize


def test_synthesized_image_joins_the_study_and_is_deterministic(engine, ct_series, tmp_path, validators) -> None:
    params = {"kind": "synthesize", "prompt": "An axial chest CT slice.", "size": [64, 64], **FAST}
    out = run_task("synthesize", ct_series, params, engine)
    (obj,) = out.objects
    sc = reread(obj.dataset)
    assert obj.kind == "sc" and validate(sc, tmp_path / "sc.dcm") == []
    assert (sc.ConversionType, sc.SyntheticData) == ("SYN", "YES")
    assert_same_study(sc, ct_series[0])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ct_series[0].SOPInstanceUID
    assert (sc.Rows, sc.Columns) == (64, 64)
    again = reread(run_task("synthesize", ct_series, params, engine).objects[0].dataset)
    assert np.array_equal(sc.pixel_array, again.pixel_array)


# --------------------------------------------------------------------------- several series, errors


def test_each_matched_series_gets_its_own_result(engine, ct_series, tmp_path, validators) -> None:
    second = [
        pydicom.dcmread(p) for p in make_ct_series(tmp_path / "s2", 2, 64, 64, study_uid=ct_series[0].StudyInstanceUID)
    ]
    for d in second:  # same patient, same study, a second series
        d.PatientID = ct_series[0].PatientID
    params = {"kind": "report", "prompt": "Describe.", "slices": "middle", **FAST}
    out = run_task("report", [*second, *ct_series], params, engine)
    assert [o.source_series_uid for o in out.objects] == [second[0].SeriesInstanceUID, ct_series[0].SeriesInstanceUID]
    for obj, series in zip(out.objects, (second, ct_series), strict=True):
        assert evidence_uids(obj.dataset) <= {d.SOPInstanceUID for d in series}
    assert out.summary.startswith("report on 2 series: 2 SRs")


def test_undecodable_pixels_fail_with_a_readable_reason(ct_series) -> None:
    # no engine: decoding fails before any model call
    broken = copy.deepcopy(ct_series)
    broken[2].file_meta.TransferSyntaxUID = JPEG2000Lossless
    broken[2].PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    where = r"\(instance 3 of 6 in slice order, InstanceNumber \d+\)"
    with pytest.raises(PipelineError, match=rf"preprocessing: cannot prepare the images {where}: cannot decode") as err:
        run_task("segment", broken, {"kind": "segment", "targets": [{"label": "x"}], "slices": "all", **FAST}, None)
    assert "1.2.840.10008.1.2.4.90" in err.value.reason and "\n" not in err.value.reason


def test_engine_refusals_become_pipeline_errors(engine, ct_series, tmp_path) -> None:
    bad = {"kind": "synthesize", "prompt": "p", "size": [32, 32], "cfg_interval": [0.9, 0.1], **FAST}
    refused = r"image synthesis: the model refused the input: cfg_interval must satisfy 0 <= lo <= hi <= 1"
    with pytest.raises(PipelineError, match=refused):
        run_task("synthesize", ct_series, bad, engine)
    seg = {"kind": "segment", "targets": [{"label": "lesion"}], "slices": "middle", **FAST, "steps": 1}
    with pytest.raises(PipelineError, match=r"segmenting 'lesion': the model refused the input: steps must be >= 2"):
        run_task("segment", ct_series, seg, engine)
