"""The README's commands for sending compressed studies as they are: every file arrives in its
own transfer syntax (DCMTK's `storescu +sd` proposes only uncompressed syntaxes and stops at the
first compressed file it cannot convert)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlmodel import Session, select

from dicom_node.models import Instance
from tests.conftest import require_tool

# Uncompressed, JPEG baseline, JPEG 2000, JPEG-LS lossless, RLE: one of each.
FILES = ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm"]
README_COMMAND = ".venv/bin/python -m pynetdicom storescu -aec UNIMEDVL -r -cx 127.0.0.1 11112 DIR"
README_DCMTK = "storescu -aec UNIMEDVL +sd +r -R -xw 127.0.0.1 11112 DIR"


def _readme() -> str:
    return " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())


def test_readme_command_sends_a_mixed_compressed_folder_as_it_is(
    make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    assert README_COMMAND in _readme()
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(FILES):
        shutil.copy(get_testdata_file(name), folder / ("sub" if i % 2 else "") / name)
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    args = README_COMMAND.replace(".venv/bin/python", sys.executable).replace("11112", str(node.port))
    out = subprocess.run(args.replace("DIR", str(folder)).split(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    with Session(node.engine) as s:
        rows = {r.sop_instance_uid: r.transfer_syntax_uid for r in s.exec(select(Instance))}
    for name in FILES:
        src = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        assert rows.get(src.SOPInstanceUID) == src.file_meta.TransferSyntaxUID, name


@pytest.mark.dcmtk
def test_readme_dcmtk_command_sends_jpeg2000_as_it_is(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    assert README_DCMTK in _readme()
    storescu = require_tool("storescu")
    folder = tmp_path / "j2k"
    folder.mkdir()
    shutil.copy(get_testdata_file("JPEG2000.dcm"), folder)
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    args = README_DCMTK.replace("storescu", storescu).replace("11112", str(node.port)).replace("DIR", str(folder))
    out = subprocess.run(args.split(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    with Session(node.engine) as s:
        (row,) = s.exec(select(Instance)).all()
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"
