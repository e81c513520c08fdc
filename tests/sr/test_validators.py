"""Every object type passes dciodvfy -new and (SR) dsrdump, judged against the allow-list."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import require_tool

from .sources import build_sources, write_all_objects
from .validators import allowlist, dciodvfy, unexpected_dciodvfy, unexpected_dsrdump

CASES = ["oblique", "gaps", "legacy_enhanced_ct", "enhanced_ct_real", "ct_small_real", "mr_small_real"]
EXPECTED_IOD = {
    "report_sr": "EnhancedSR",
    "seg_binary": "Segmentation",
    "measurements_sr": "Comprehensive3DSR",
    "sc_rgb": "SCImage",
    "sc_mono": "SCImage",
}
# dicom3tools 20220618 predates Label Map Segmentation (Sup 243): it cannot find the IOD and
# rejects the background segment 0. These, and only these, are expected for LABELMAP.
LABELMAP_KNOWN = ("Information Object Not found", "SegmentNumber not monotonically increasing from one")


@pytest.fixture(scope="module")
def tools():
    require_tool("dciodvfy")
    require_tool("dsrdump")


@pytest.mark.parametrize("case", CASES)
def test_every_object_passes_validators(case, provenance, tmp_path, tools):
    paths = write_all_objects(build_sources(case), provenance, tmp_path)
    for name, path in paths.items():
        if name == "seg_labelmap":
            continue
        iod, _ = dciodvfy(path)
        want = EXPECTED_IOD.get(name) or ("MRImage" if case.startswith("mr") else "CTImage")
        assert iod == want, f"{case}/{name}: dciodvfy identified {iod!r}"
        assert unexpected_dciodvfy(path) == [], f"{case}/{name}"
        if name.endswith("_sr"):
            assert unexpected_dsrdump(path) == [], f"{case}/{name}"


def test_labelmap_only_fails_for_validator_age(provenance, tmp_path, tools):
    path = write_all_objects(build_sources("random"), provenance, tmp_path)["seg_labelmap"]
    _, findings = dciodvfy(path)
    errors = [msg for kind, msg in findings if kind == "Error"]
    assert errors, "dciodvfy learned Label Map Segmentation: drop this special case"
    assert all(any(k in msg for k in LABELMAP_KNOWN) for msg in errors), errors


def test_allowlist_entries_have_reasons_and_match_tools():
    for entry in allowlist():
        assert entry.tool in ("dciodvfy", "dsrdump")
        assert entry.kind in ("Error", "Warning", "W")
        assert len(entry.reason) > 20


def test_validator_helper_catches_a_broken_object(provenance, tmp_path, tools):
    """The check can fail: an SR without its CompletionFlag is reported."""
    import pydicom

    path = write_all_objects(build_sources("ascending"), provenance, tmp_path)["report_sr"]
    ds = pydicom.dcmread(path)
    del ds.CompletionFlag
    ds.save_as(path)
    assert any("CompletionFlag" in line for line in unexpected_dciodvfy(path))
    assert subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True).returncode != 0


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", ["random", "ct_small_real"])
def test_study_consistency_with_dcentvfy(case, provenance, tmp_path):
    """dcentvfy compares patient/study attributes across the study: sources plus every object."""
    require_tool("dcentvfy")
    from sr_writers import write

    sources = build_sources(case)
    files = [write(s, tmp_path / f"src{i}.dcm") for i, s in enumerate(sources)]
    objects = write_all_objects(sources, provenance, tmp_path)
    files += [p for name, p in objects.items() if name != "seg_labelmap"]  # 2022 tool: unknown SOP class
    proc = subprocess.run(["dcentvfy", *map(str, files)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines
    # The only warning left: dcentvfy 2022 files AccessionNumber under Series for CT but Study for SR.
    other = [
        line
        for line in lines
        if line.startswith("Warning") and "<AccessionNumber> IE <Study> versus <Series>" not in line
    ]
    assert other == [], other
