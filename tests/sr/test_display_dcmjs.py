"""Display check: parse every object with dcmjs and decode SEG against its source series with the
Cornerstone3D adapter OHIF 3 loads SEG with (@cornerstonejs/adapters, run in node)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from sr_writers import write, write_seg
from tests.conftest import REPO, require_tool

from .sources import REPORT_TEXT, SOURCE_CASES, build_sources, distinct_masks, frame_keys, write_all_objects

JS_DIR = REPO / "tests" / "js"


def _run_node(manifest: dict, tmp_path) -> dict:
    require_tool("node")
    if not (JS_DIR / "node_modules" / "@cornerstonejs" / "adapters").is_dir():
        pytest.fail("tests/js/node_modules is missing: run scripts/setup.sh (npm install in tests/js)")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    proc = subprocess.run(
        ["node", str(JS_DIR / "parse_seg.mjs"), str(path)], capture_output=True, text=True, timeout=120, cwd=JS_DIR
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _as_dcmjs_nested(text: str) -> str:
    """What dcmjs 0.52 shows for UTF-8 text inside a sequence item: it decodes nested items as
    ISO 8859-1 whatever SpecificCharacterSet says (open dcmjs issues #503 and #508). Our bytes are
    correct UTF-8 (pydicom and DCMTK read them back) and top-level text decodes correctly."""
    return text.encode("utf-8").decode("latin-1")


def _same_text_nested(got: str, want: str) -> bool:
    return got in (want, _as_dcmjs_nested(want))


def _js_key(key) -> str:
    return f"{key[0]}#{key[1]}" if isinstance(key, tuple) else key


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, request):
    from sr_writers import Provenance

    provenance = Provenance(model_version="1.0.0", checkpoint_hash="ab" * 32)
    tmp = tmp_path_factory.mktemp("dcmjs")
    groups, expected = [], {}
    for case in SOURCE_CASES:
        sources = build_sources(case)
        case_dir = tmp / case
        case_dir.mkdir()
        # files in the order the sources arrived (random order stays random)
        src_paths = [str(write(s, case_dir / f"src{i:03d}.dcm")) for i, s in enumerate(sources)]
        result = distinct_masks(sources)
        objects = []
        for seg_type in ("BINARY", "LABELMAP"):
            path = write(
                write_seg(result, sources, provenance, segmentation_type=seg_type), case_dir / f"{seg_type}.dcm"
            )
            objects.append(str(path))
            expected[str(path)] = (seg_type, sources, result)
        if case == "random":
            objects.append(
                str(
                    write(_swap_first_two_references(write_seg(result, sources, provenance)), case_dir / "tampered.dcm")
                )
            )
            expected["tampered"] = (str(case_dir / "tampered.dcm"), sources, result)
        groups.append({"sources": src_paths, "objects": objects})
    all_dir = tmp / "all"
    all_dir.mkdir()
    others = write_all_objects(build_sources("random"), provenance, all_dir)
    groups.append({"sources": [], "objects": [str(p) for n, p in others.items() if not n.startswith("seg")]})
    return _run_node({"groups": groups}, tmp), expected, {n: str(p) for n, p in others.items()}


def _swap_first_two_references(seg):
    """Negative control: two frames point at each other's source image."""
    first, second = (
        f.DerivationImageSequence[0].SourceImageSequence[0] for f in seg.PerFrameFunctionalGroupsSequence[:2]
    )
    first.ReferencedSOPInstanceUID, second.ReferencedSOPInstanceUID = (
        second.ReferencedSOPInstanceUID,
        first.ReferencedSOPInstanceUID,
    )
    return seg


def _expected_frames(sources, result) -> dict:
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    want = {}
    for key in frame_keys(sources):
        mask = result.mask_for(key, rows, cols)
        per_segment = {str(s + 1): np.flatnonzero(mask[s]).tolist() for s in range(len(mask)) if mask[s].any()}
        if per_segment:
            want[_js_key(key)] = per_segment
    return want


def test_decoder_check_can_fail(decoded):
    """The adapter follows ReferencedSOPInstanceUID: swapped references move the masks, and the
    comparison above would notice."""
    report, expected, _ = decoded
    path, sources, result = expected["tampered"]
    assert report[path]["seg"]["frames"] != _expected_frames(sources, result)


def test_seg_frames_land_on_their_source_images(decoded):
    report, expected, _ = decoded
    for path, (seg_type, sources, result) in expected.items():
        if path == "tampered":
            continue
        entry = report[path]
        assert "error" not in entry, f"{path}: {entry.get('error')}"
        assert entry["segmentationType"] == seg_type
        assert entry["referencedSeries"] == sources[0].SeriesInstanceUID
        assert entry["seg"]["frames"] == _expected_frames(sources, result), (
            f"{path}: frames decoded by the OHIF adapter differ"
        )
        labels = {k: v for k, v in entry["seg"]["labels"].items() if k != "0"}
        assert set(labels) == {"1", "2"} and labels["2"] == "Organ"
        assert _same_text_nested(labels["1"], "Läsion ü"), labels["1"]
        assert entry["zeroPreamble"] and entry["specificCharacterSet"] == "ISO_IR 192"


def test_other_objects_parse_in_dcmjs(decoded):
    report, _, paths = decoded
    sr = report[paths["report_sr"]]
    assert (sr["completionFlag"], sr["verificationFlag"]) == ("PARTIAL", "UNVERIFIED")
    assert any(_same_text_nested(c.get("text") or "", REPORT_TEXT) for c in sr["content"])
    assert sr["patientName"] == "Müller^Jürgen"
    tid1500 = report[paths["measurements_sr"]]
    volumes = [c for c in tid1500["content"] if c["name"] == "Volume"]
    assert len(volumes) == 2 and all(v["value"] > 0 for v in volumes)
    assert any(c["name"] == "Tracking Unique Identifier" for c in tid1500["content"])
    for name in ("sc_rgb", "sc_mono"):
        sc = report[paths[name]]
        assert not sc["hasWindow"] and not sc["hasRescale"], name
        assert sc["syntheticData"] == "YES"
    assert report[paths["sc_rgb"]]["photometric"] == "RGB"
    derived = report[paths["derived"]]
    assert derived["hasWindow"] and derived["hasRescale"] and derived["syntheticData"] == "YES"
    for entry in report.values():
        assert entry["zeroPreamble"] and entry["manufacturer"] == "UniMedVL project"
        assert entry["seriesDescription"].startswith("AI ")
