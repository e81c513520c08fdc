"""STOW-RS client (PS3.18 10.5): multipart/related; type="application/dicom", several instances per request.

An instance counts as delivered only if the response lists it in ReferencedSOPSequence;
FailedSOPSequence reasons are DICOM statuses and are classified like C-STORE statuses.
Some servers answer 200 with both sequences empty when storing failed (Orthanc 1.10 does
on a full disk), so "not listed" means "not confirmed" and is retried.
"""

from __future__ import annotations

import logging
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from dicom_node.export.destinations import Destination
from dicom_node.export.outcome import Kind, Outcome, SendItem, StoredObjectDamaged, classify_status

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQ = "00081199"
FAILED_SOP_SEQ = "00081198"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class StowResponse:
    referenced: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> WarningReason
    failed: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> FailureReason
    warning: int | None = None  # response-level WarningReason


def _json_value(attr: Any) -> list[Any]:
    return list(attr.get("Value", [])) if isinstance(attr, dict) else []


def parse_json(doc: Any) -> StowResponse:
    if isinstance(doc, list):  # some servers wrap the dataset in a list
        doc = doc[0] if doc else {}
    out = StowResponse()
    for item in _json_value(doc.get(REFERENCED_SOP_SEQ)):
        uid = next(iter(_json_value(item.get(REFERENCED_SOP_INSTANCE))), None)
        if uid:
            reason = next(iter(_json_value(item.get(WARNING_REASON))), None)
            out.referenced[str(uid)] = int(reason) if reason is not None else None
    for item in _json_value(doc.get(FAILED_SOP_SEQ)):
        uid = next(iter(_json_value(item.get(REFERENCED_SOP_INSTANCE))), None)
        if uid:
            reason = next(iter(_json_value(item.get(FAILURE_REASON))), None)
            out.failed[str(uid)] = int(reason) if reason is not None else None
    warning = next(iter(_json_value(doc.get(WARNING_REASON))), None)
    out.warning = int(warning) if warning is not None else None
    return out


def parse_xml(text: str) -> StowResponse:
    out = StowResponse()
    root = ET.fromstring(text)

    def attr(el: ET.Element, tag: str) -> ET.Element | None:
        for child in el:
            if child.tag.endswith("DicomAttribute") and child.get("tag", "").upper() == tag:
                return child
        return None

    def first_value(el: ET.Element | None) -> str | None:
        if el is None:
            return None
        for v in el:
            if v.tag.endswith("Value") and v.text:
                return v.text.strip()
        return None

    for seq_tag, target, reason_tag in (
        (REFERENCED_SOP_SEQ, out.referenced, WARNING_REASON),
        (FAILED_SOP_SEQ, out.failed, FAILURE_REASON),
    ):
        seq = attr(root, seq_tag)
        if seq is None:
            continue
        for item in seq:
            if not item.tag.endswith("Item"):
                continue
            uid = first_value(attr(item, REFERENCED_SOP_INSTANCE))
            if uid:
                reason = first_value(attr(item, reason_tag))
                target[uid] = int(reason) if reason else None
    w = first_value(attr(root, WARNING_REASON))
    out.warning = int(w) if w else None
    return out


def _parse(response: httpx.Response) -> StowResponse | None:
    """The store result in the body, whatever the status code (Orthanc answers 400 with a JSON body
    listing the instances it did store when another part of the request was bad)."""
    ctype = response.headers.get("content-type", "").lower()
    head = response.content[:64].lstrip()
    try:
        if "json" in ctype or head.startswith((b"{", b"[")):
            return parse_json(response.json())
        if "xml" in ctype or head.startswith(b"<"):
            return parse_xml(response.text)
    except (ValueError, ET.ParseError, AttributeError, TypeError) as exc:
        log.warning("STOW-RS response (HTTP %s) could not be parsed: %s", response.status_code, exc)
    return None


def _batches(items: Sequence[SendItem], max_n: int, max_bytes: int) -> list[list[SendItem]]:
    batches: list[list[SendItem]] = []
    cur: list[SendItem] = []
    size = 0
    for it in items:
        n = it.path.stat().st_size
        if cur and (len(cur) >= max_n or size + n > max_bytes):
            batches.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        batches.append(cur)
    return batches


def multipart_body(payloads: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"unimedvl-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for data in payloads:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


class StowSender:
    def __init__(self, dest: Destination, *, max_instances: int = 64, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.dest = dest
        self.max_instances = max_instances
        self.max_bytes = max_bytes

    def _client(self) -> httpx.Client:
        ctx = self.dest.ssl_context()
        return httpx.Client(
            verify=ctx if ctx is not None else True,
            timeout=httpx.Timeout(self.dest.timeout_seconds, connect=min(self.dest.timeout_seconds, 10.0)),
            headers={"Accept": "application/dicom+json, application/dicom+xml;q=0.5"},
        )

    def send(self, items: Sequence[SendItem], report: Callable[[SendItem, Outcome], None]) -> None:
        with self._client() as client:
            for batch in _batches(items, self.max_instances, self.max_bytes):
                self._post(client, batch, report)

    def _post(self, client: httpx.Client, batch: list[SendItem], report: Callable[[SendItem, Outcome], None]) -> None:
        url = f"{self.dest.url}/studies"
        payloads: list[bytes] = []
        readable: list[SendItem] = []
        for it in batch:
            try:
                payloads.append(it.read_verified())
                readable.append(it)
            except StoredObjectDamaged as exc:
                report(it, Outcome(Kind.FAIL, None, str(exc)))
            except OSError as exc:
                report(it, Outcome(Kind.RETRY, None, f"cannot read the stored object: {exc}"))
        if not readable:
            return
        batch = readable
        body, ctype = multipart_body(payloads)
        try:
            response = client.post(url, content=body, headers={"Content-Type": ctype})
        except httpx.HTTPError as exc:
            msg = f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}"
            log.warning("export %s: %s", self.dest.name, msg)
            for it in batch:
                report(it, Outcome(Kind.RETRY, None, msg))
            return
        code = response.status_code
        parsed = _parse(response)
        if parsed is None or (code not in (200, 202, 409) and not parsed.referenced and not parsed.failed):
            for it in batch:
                report(it, self._http_outcome(code, response))
            return
        for it in batch:
            report(it, self._instance_outcome(it, code, parsed, response))

    def _http_outcome(self, code: int, response: httpx.Response) -> Outcome:
        detail = response.text[:200].strip().replace("\n", " ")
        msg = f"STOW-RS answered HTTP {code}" + (f": {detail}" if detail else "")
        if code in (200, 202):
            return Outcome(Kind.RETRY, code, f"STOW-RS answered HTTP {code} without a readable store result")
        if code in _RETRY_HTTP or code >= 500:
            return Outcome(Kind.RETRY, code, msg)
        if code == 415:
            return Outcome(Kind.REFUSED, code, msg)
        return Outcome(Kind.FAIL, code, msg)

    def _instance_outcome(self, it: SendItem, code: int, parsed: StowResponse, response: httpx.Response) -> Outcome:
        uid = it.sop_instance_uid
        if uid in parsed.referenced:
            warning = parsed.referenced[uid]
            if warning is None and code == 202 and parsed.warning is not None:
                warning = parsed.warning
            if warning:
                out = classify_status(warning, what="STOW-RS")
                if out.kind is not Kind.WARNING:  # a WarningReason is a warning whatever its value
                    out = Outcome(Kind.WARNING, warning, f"STOW-RS warning 0x{warning:04X}")
                return Outcome(out.kind, warning, out.message, it.transfer_syntax_uid)
            return Outcome(Kind.OK, code, None, it.transfer_syntax_uid)
        if uid in parsed.failed:
            reason = parsed.failed[uid]
            if reason is None:
                return Outcome(Kind.FAIL, code, f"STOW-RS (HTTP {code}) lists the instance as failed without a reason")
            out = classify_status(reason, what="STOW-RS")
            return Outcome(out.kind, reason, f"{out.message} (HTTP {code})")
        if code not in (200, 202, 409):
            return self._http_outcome(code, response)
        return Outcome(
            Kind.RETRY,
            code,
            f"STOW-RS (HTTP {code}) did not confirm this instance (not in ReferencedSOPSequence): "
            "the destination did not store it",
        )
