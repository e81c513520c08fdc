"""BINARY SEG on grids whose Rows x Columns is not a multiple of 8, decoded by the Cornerstone3D
adapter OHIF 3 uses (tests/js), compared frame by frame with the masks we wrote.

Native 1-bit frames of such grids are not byte aligned; the adapter guesses the layout from the
Pixel Data length and, below 8 frames on a 15x17 grid, guesses wrong. write_seg therefore writes
them RLE encoded, one fragment per frame (tests below); the negative control shows the adapter
misplacing the same masks when they are written natively."""

from __future__ import annotations

import copy

import pytest

from dicom_node.synthetic import ct_series
from sr_writers import native_binary, write, write_seg

from .sources import distinct_masks, real_world_case
from .test_display_dcmjs import _expected_frames, _run_node

# (rows, columns, slices): odd grids at 1, 3 and 9 slices (2 segments: 2, 6, 18 SEG frames) and a
# byte-aligned control that stays uncompressed
GRIDS = [(15, 17, 1), (15, 17, 3), (15, 17, 9), (181, 217, 2), (7, 9, 4), (16, 16, 3)]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    from sr_writers import Provenance

    provenance = Provenance(model_version="1.0.0", checkpoint_hash="cd" * 32)
    tmp = tmp_path_factory.mktemp("grids")
    cases = {f"{r}x{c}x{n}": ct_series(n, rows=r, columns=c, order="random", seed=r + n) for r, c, n in GRIDS}
    cases["ct_grid_15x17"] = real_world_case("ct_grid_15x17")
    groups, expected = [], {}
    for name, sources in cases.items():
        folder = tmp / name
        folder.mkdir()
        src_paths = [str(write(s, folder / f"src{i:02d}.dcm")) for i, s in enumerate(sources)]
        result = distinct_masks(sources)
        seg = write_seg(result, sources, provenance)
        objects = [str(write(seg, folder / "seg.dcm"))]
        expected[objects[0]] = (name, sources, result, str(seg.file_meta.TransferSyntaxUID))
        if name == "15x17x3":  # negative control: the same SEG with native (contiguous) bits
            native = write(native_binary(copy.deepcopy(seg)), folder / "native.dcm")
            objects.append(str(native))
            expected["native"] = (str(native), sources, result, None)
        groups.append({"sources": src_paths, "objects": objects})
    return _run_node({"groups": groups}, tmp), expected


def test_odd_grid_segs_decode_onto_their_frames(decoded):
    report, expected = decoded
    for path, (name, sources, result, syntax) in expected.items():
        if path == "native":
            continue
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        entry = report[path]
        assert "error" not in entry, f"{name}: {entry.get('error')}"
        want_rle = (rows * cols) % 8 != 0
        assert syntax == ("1.2.840.10008.1.2.5" if want_rle else "1.2.840.10008.1.2.1"), name
        assert entry["transferSyntax"] == syntax
        assert entry["seg"]["frames"] == _expected_frames(sources, result), f"{name}: frames differ in the adapter"


def test_native_odd_grid_is_misplaced_by_the_adapter(decoded):
    """Why the RLE form exists: this check fails for the native layout the standard also allows."""
    report, expected = decoded
    path, sources, result, _ = expected["native"]
    assert report[path]["seg"]["frames"] != _expected_frames(sources, result)
