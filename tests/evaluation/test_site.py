"""Site validation on a folder of DICOM: reference SEG (Dice, HD95 in mm), SR and CSV reports, VQA CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.synthetic import make_ct_series
from inference.evaluation import DatasetError, comparable, rescore_file
from inference.evaluation.site import run_site, sr_text
from sr_writers import Provenance, ReportResult, Segment, SegmentationResult, write_report_sr, write_seg
from sr_writers.common import write

from .conftest import FAST


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    paths = make_ct_series(root / "ct", 2, rows=32, cols=32, pixel_spacing=0.5, slice_thickness=2.0)
    ct = [dcmread(p) for p in paths]
    masks = {}
    for i, ds in enumerate(ct):
        m = np.zeros((32, 32), bool)
        if i == 0:
            m[10:20, 10:20] = True
        masks[str(ds.SOPInstanceUID)] = m
    seg = write_seg(SegmentationResult([Segment(label="liver")], masks), ct, Provenance(model_name="Radiologist"))
    (root / "labels").mkdir()
    write(seg, root / "labels" / "seg.dcm")
    sr = write_report_sr(ReportResult(findings="The lungs are clear.", impression="Normal study."), ct, Provenance())
    sr.SeriesDescription = "Radiology report"  # a person's report, not one of ours ("AI ...")
    write(sr, root / "labels" / "report.dcm")
    study = str(ct[0].StudyInstanceUID)
    _csv(root / "reports.csv", ["study", "report"], [[study, "No acute findings."]])
    _csv(
        root / "vqa.csv",
        ["study", "question", "answer"],
        [[study, "Is there a lesion?", "yes"], [study, "Where?", "right lung"]],
    )
    return root


@pytest.mark.slow
def test_site_validation_end_to_end(site: Path, tmp_path: Path, tiny_engine) -> None:
    out = tmp_path / "out"
    summary = run_site(site, out, tiny_engine, settings=FAST)
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["segment", "report", "report", "vqa", "vqa"]
    assert all(r["error"] is None for r in records), records
    seg = records[0]
    assert seg["target"] == "liver" and seg["spacing_mm"] == [2.0, 0.5, 0.5]
    ref = np.load(out / seg["reference"]["mask"])["mask"]
    assert ref.shape == (2, 32, 32) and ref.sum() == 100
    assert sum(bool(ref[i, 10:20, 10:20].all()) for i in range(2)) == 1
    assert {r["reference"][0] for r in records if r["task"] == "report"} >= {"No acute findings."}
    m = summary["metrics"]
    assert set(m) == {"segment", "report", "vqa"}
    assert m["segment"]["hd95_unit"] == "mm" and m["vqa"]["closed_items"] == 1 and m["vqa"]["open_items"] == 1
    assert comparable(rescore_file(out / "predictions.jsonl")) == comparable(summary)


def test_sr_text_and_exclusion_of_our_own_outputs(site: Path) -> None:
    text = sr_text(dcmread(site / "labels" / "report.dcm"))
    assert text.endswith("The lungs are clear. Normal study.")
    assert "UniMedVL project" not in text  # the device observer context is not report content
    from inference.evaluation.site import SiteFolder

    ours = dcmread(site / "labels" / "report.dcm")
    ours.SeriesDescription = "AI draft report"
    write(ours, site / "labels" / "ours.dcm")
    folder = SiteFolder(site)
    assert [p.name for p in folder.srs] == ["report.dcm"] and len(folder.segs) == 1 and len(folder.series) == 1


def test_bad_site_labels_name_the_file(site: Path, tmp_path: Path, tiny_engine) -> None:
    _csv(site / "vqa.csv", ["study", "question"], [["1.2.3", "Is there a lesion?"]])
    with pytest.raises(DatasetError, match=r"vqa.csv: expected a header with the columns study, question, answer"):
        run_site(site, tmp_path / "o1", tiny_engine, settings=FAST)
    (site / "vqa.csv").unlink()
    _csv(site / "reports.csv", ["study", "report"], [["1.2.3", "  "]])
    with pytest.raises(DatasetError, match=r"reports.csv: line 2 has an empty 'report'"):
        run_site(site, tmp_path / "o2", tiny_engine, settings=FAST)
    with pytest.raises(DatasetError, match="no reference SEG, SR report, reports.csv or vqa.csv"):
        run_site(site / "ct", tmp_path / "o3", tiny_engine, settings=FAST)
