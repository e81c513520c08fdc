"""Every task leaves its source datasets as it found them.

A worker hands the datasets one job parsed to its next job of the same study
(dicom_node.jobs.source_cache), so a pipeline or writer that modified a source would change
the next job's input. Each task kind runs on sources whose encoded bytes are compared before
and after.
"""

from __future__ import annotations

import io

import pytest
from pydicom import Dataset, dcmwrite

from inference.pipelines import run_task

from .conftest import FAST

PARAMS = {
    "report": {"prompt": "Describe.", "slices": "key:2"},
    "vqa": {"questions": ["Is there a nodule?"], "slices": "middle"},
    "segment": {"targets": [{"label": "lesion", "threshold": 90}], "slices": "every:2"},
    "segment-labelmap": {"targets": [{"label": "a"}, {"label": "b"}], "slices": "middle", "labelmap": True},
    "translate": {"prompt": "Translate to MR.", "slices": "middle"},
    "super_resolve": {"prompt": "Sharpen.", "slices": "middle"},
    "synthesize": {"prompt": "An axial chest CT slice.", "size": [32, 32]},
}


def _encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(PARAMS))
def test_a_task_does_not_modify_its_sources(engine, ct_series, case: str) -> None:
    kind = case.split("-")[0]
    before = [_encoded(ds) for ds in ct_series]
    out = run_task(kind, ct_series, {"kind": kind, **PARAMS[case], **FAST}, engine)
    assert out.objects
    after = [_encoded(ds) for ds in ct_series]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert not changed, f"{case} modified source instance(s) {changed}"
