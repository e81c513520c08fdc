"""With log_phi off, library warnings and exception messages that can quote patient data lose
their text in every log line (the guard is the log record factory, so it holds under any
handler setup); with log_phi on they are kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = r"""
import io, logging, sys, warnings
import pydicom
from pydicom.data import get_testdata_file
from dicom_node.logs import guard_phi, setup_logging

setup_logging()
guard_phi(sys.argv[1] == "on")
logging.basicConfig()  # a second handler set up later (as Celery does) is covered too
ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
ds.PatientBirthDate = "1901-12-31"  # invalid DA: pydicom warns quoting it on read
ds.PatientName = "Quaxbrindle^Zorvath"
buf = io.BytesIO()
ds.save_as(buf)
buf.seek(0)
warnings.simplefilter("always")
pydicom.dcmread(buf).PatientBirthDate
logging.getLogger("highdicom.sr").warning("value %s refused", "Quaxbrindle^Zorvath")
try:
    raise ValueError("patient Quaxbrindle^Zorvath has no PatientID")
except ValueError:
    logging.getLogger("dicom_node.jobs.runner").exception("job 1 crashed (ValueError)")
"""


@pytest.mark.parametrize("log_phi", ["off", "on"])
def test_library_warnings_and_exception_texts_are_withheld(log_phi: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, log_phi],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert "job 1 crashed (ValueError)" in out and "Traceback" in out  # the stack stays
    leaked = [v for v in ("1901-12-31", "Quaxbrindle", "Zorvath") if v in out]
    if log_phi == "off":
        assert leaked == [], out
        assert "text withheld" in out and "message withheld" in out
    else:
        assert leaked == ["1901-12-31", "Quaxbrindle", "Zorvath"], out
