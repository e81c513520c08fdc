"""A worker without the node's disk: sources over WADO-RS, outputs uploaded to the node.

With `[worker] node_url` set, `dicom_node.jobs.context.WorkerContext` runs jobs through
`RemoteIO` instead of `dicom_node.jobs.runner.LocalIO`:
- claim, lease renewals, fail and crash records still go to the database directly (the worker
  has `[database] url`), exactly as a local worker's;
- `load`: the job's instances are listed from the index (relpath-free: series + sha256), each
  series is retrieved with `GET {node_url}/dicomweb/studies/{study}/series/{series}`
  (PS3.18 10.4, multipart/related; type="application/dicom"; transfer-syntax=*), parsed as it
  streams in (python-multipart), kept in memory, and every instance's sha256 is checked
  against the index. Instances of a later study revision that the series now holds are left out
  (the index says which belong to the job). Nothing is written to the worker's disk.
- `record`: the outputs are encoded here and sent with the claim token to
  `POST {node_url}/api/jobs/{id}/outputs` (dicom_node.jobs.uploads), where the node runs the
  same output transaction a local worker runs. A lost answer is retried: the node recognises
  the claim that already recorded the outputs and records nothing twice.

Authentication: `Authorization: Bearer <node_token>`, an API token of a worker-role user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydicom import Dataset
from python_multipart.multipart import MultipartParser
from sqlalchemy.engine import Engine

from dicom_node.export.outbox import EnqueueError
from dicom_node.jobs.models import Job
from dicom_node.jobs.runner import Claim, JobInputError, Output, encode_outputs, read_dataset, source_rows
from dicom_node.jobs.source_cache import SourceCache

log = logging.getLogger("dicom_node.jobs.remote")

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
UPLOAD_ATTEMPTS = 4


class NodeUnavailable(RuntimeError):
    """The node's API could not be reached or answered with an unexpected error (retried as a crash)."""


def multipart_boundary(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type (RFC 2046 5.1.1); ValueError if absent."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip():
            return value.strip().strip('"')
    raise ValueError("the multipart answer names no boundary")


class _Parts:
    """Collects the bodies of a multipart message as it is fed in chunks."""

    def __init__(self, boundary: str) -> None:
        self.parts: list[bytes] = []
        self._current: list[bytes] = []
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def _begin(self) -> None:
        self._current = []

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._current.append(data[start:end])

    def _end(self) -> None:
        self.parts.append(b"".join(self._current))
        self._current = []


@dataclass
class RemoteIO:
    """Sources and outputs of a worker's jobs through the node's HTTP API (no shared disk)."""

    node_url: str
    token: str
    timeout_seconds: float = 60.0
    tls_ca: str = ""
    bytes_in: int = field(default=0, init=False)  # moved so far, for logs and benchmarks
    bytes_out: int = field(default=0, init=False)
    cache: SourceCache | None = None  # the last job's sources, for the next job (dicom_node.jobs.source_cache)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.node_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=self.timeout_seconds,
            verify=self.tls_ca or True,
        )

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ sources

    def fetch_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        """Every stored instance of a series as the node stored it (PS3.18 10.4 WADO-RS)."""
        url = f"/dicomweb/studies/{study_uid}/series/{series_uid}"
        try:
            with self.client.stream("GET", url, headers={"Accept": ACCEPT}) as r:
                if r.status_code == 404:
                    raise JobInputError("the node no longer holds one of the job's series")
                if r.status_code != 200:
                    r.read()
                    raise NodeUnavailable(f"WADO-RS answered {r.status_code}: {_detail(r)}")
                parts = _Parts(multipart_boundary(r.headers.get("content-type", "")))
                for chunk in r.iter_bytes():
                    self.bytes_in += len(chunk)
                    parts.parser.write(chunk)
                parts.parser.finalize()
        except httpx.HTTPError as exc:
            raise NodeUnavailable(f"WADO-RS retrieval from the node failed ({type(exc).__name__})") from None
        return parts.parts

    def load(self, engine: Engine, job: Job) -> list[Dataset]:
        rows = source_rows(engine, job)
        started, before = time.perf_counter(), self.bytes_in
        # Instances the previous job of this worker parsed (same sha256) are not fetched again.
        cached = self.cache.take(r.sha256 for r in rows) if self.cache is not None else {}
        by_sha: dict[str, bytes] = {}
        for series_uid in dict.fromkeys(r.series_uid for r in rows if r.sha256 not in cached):
            wanted = {r.sha256 for r in rows if r.series_uid == series_uid and r.sha256 not in cached}
            for data in self.fetch_series(job.study_instance_uid, series_uid):
                digest = hashlib.sha256(data).hexdigest()
                if digest in wanted:
                    by_sha[digest] = data
        missing = [r for r in rows if r.sha256 not in by_sha and r.sha256 not in cached]
        if missing:
            raise JobInputError(
                f"{len(missing)} of the job's {len(rows)} source instance(s) did not come from the node "
                "with the sha256 the index recorded (changed or removed since the job was planned)"
            )
        reused = sum(1 for r in rows if r.sha256 in cached)
        log.info(
            "job %s: fetched %d instance(s), %d bytes over WADO-RS in %.3f s (%d from the previous job)",
            job.id,
            len(rows) - reused,
            self.bytes_in - before,
            time.perf_counter() - started,
            reused,
        )
        datasets = [cached[r.sha256] if r.sha256 in cached else read_dataset(by_sha[r.sha256]) for r in rows]
        if self.cache is not None:
            self.cache.hold({r.sha256: ds for r, ds in zip(rows, datasets, strict=True)}, sum(r.size for r in rows))
        return datasets

    # ------------------------------------------------------------------ outputs

    def record(
        self,
        engine: Engine,
        claim_: Claim,
        outputs: Sequence[Output],
        *,
        summary: str | None,
        model_info: dict[str, Any] | None,
    ) -> int | None:
        recorded = self._upload(claim_, outputs, summary=summary, model_info=model_info)
        if recorded is not None and self.cache is not None:
            self.cache.keep_held()
        return recorded

    def _upload(
        self,
        claim_: Claim,
        outputs: Sequence[Output],
        *,
        summary: str | None,
        model_info: dict[str, Any] | None,
    ) -> int | None:
        encoded = encode_outputs(outputs)
        result = {
            "summary": summary,
            "model_info": model_info,
            "outputs": [
                {"kind": e.kind, "source_series_uid": e.source_series_uid, "sha256": hashlib.sha256(e.data).hexdigest()}
                for e in encoded
            ],
        }
        files = [("object", (f"{i}.dcm", e.data, "application/dicom")) for i, e in enumerate(encoded)]
        data = {"claim_token": claim_.token, "result": json.dumps(result)}
        url = f"/api/jobs/{claim_.job.id}/outputs"
        started = time.perf_counter()
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                r = self.client.post(url, data=data, files=files)
            except httpx.HTTPError as exc:
                if attempt == UPLOAD_ATTEMPTS:
                    raise NodeUnavailable(f"uploading the outputs to the node failed ({type(exc).__name__})") from None
                log.warning(
                    "job %s: upload attempt %d failed (%s); retrying", claim_.job.id, attempt, type(exc).__name__
                )
                time.sleep(min(2.0**attempt, 10.0))
                continue
            if r.status_code == 200:
                sent = sum(len(e.data) for e in encoded)
                self.bytes_out += sent
                log.info(
                    "job %s: uploaded %d output(s), %d bytes in %.3f s",
                    claim_.job.id,
                    len(encoded),
                    sent,
                    time.perf_counter() - started,
                )
                return len(r.json().get("outputs", []))
            if r.status_code == 409:
                log.warning("job %s: the node refused the outputs: %s", claim_.job.id, _detail(r))
                return None
            if r.status_code == 422:
                raise EnqueueError(_detail(r))
            if r.status_code >= 500 and attempt < UPLOAD_ATTEMPTS:
                log.warning("job %s: upload attempt %d answered %d; retrying", claim_.job.id, attempt, r.status_code)
                time.sleep(min(2.0**attempt, 10.0))
                continue
            raise NodeUnavailable(f"the node answered the upload with {r.status_code}: {_detail(r)}")
        raise NodeUnavailable("uploading the outputs to the node failed")  # pragma: no cover - loop returns


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else r.text[:300]
