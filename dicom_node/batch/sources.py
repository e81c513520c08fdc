"""Where a batch's studies come from, and how a worker fetches one into scratch space.

SOURCE forms (`parse_source`):
- a folder (recursive, any layout, mixed studies) or a DICOMDIR file: the DICOMDIR's folder is
  walked (its records' file IDs are received values, so they are never turned into paths);
- ``dimse://AET@host:port``: study-level C-FIND (``--query KEY=VALUE``), C-GET or C-MOVE to our AE;
- ``http(s)://...``: a DICOMweb server (QIDO-RS to list, WADO-RS to fetch; dicomweb-client);
- a ``.csv``/``.txt`` file of StudyInstanceUIDs with ``fetch_from`` naming one of the PACS forms.

Files fetched into scratch get names we generate (a counter), never from received values.
Errors a person can act on raise ``SourceError`` with one readable sentence.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

log = logging.getLogger("dicom_node.batch.sources")

_DIMSE = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>[^:/]+):(?P<port>\d{1,5})/?$")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SourceError(Exception):
    """The source cannot be listed or a study cannot be fetched; `reason` is one readable sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class StudyRef:
    study_instance_uid: str
    patient_id: str | None = None
    locator: dict[str, Any] = field(default_factory=dict)


class Source:
    """A study archive: `studies()` lists it, `fetch()` copies one study into `scratch`."""

    kind = "source"
    local = False  # True: files are read in place (no scratch copy)

    def studies(self) -> Iterator[StudyRef]:
        raise NotImplementedError

    def fetch(self, ref: StudyRef, scratch: Path) -> list[Path]:
        raise NotImplementedError


def _write_scratch(ds: Dataset, scratch: Path, n: int) -> Path:
    path = scratch / f"{n:06d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- folders


class FolderSource(Source):
    kind = "folder"
    local = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def studies(self) -> Iterator[StudyRef]:
        by_study: dict[str, StudyRef] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.upper() == "DICOMDIR":
                    continue
                try:
                    ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "PatientID"])
                except (InvalidDicomError, OSError, ValueError, EOFError):
                    continue  # not DICOM: archives hold reports, thumbnails, ...
                uid = str(ds.get("StudyInstanceUID", "") or "")
                if not UID_RE.match(uid) or len(uid) > 64:
                    log.warning("a file without a valid StudyInstanceUID is skipped")
                    continue
                ref = by_study.setdefault(uid, StudyRef(uid, str(ds.get("PatientID", "") or "") or None, {"files": []}))
                ref.locator["files"].append(str(path.relative_to(self.root)))
        yield from by_study.values()

    def fetch(self, ref: StudyRef, scratch: Path) -> list[Path]:
        out = []
        for rel in ref.locator.get("files", []):
            path = (self.root / rel).resolve()
            if not path.is_relative_to(self.root):  # the locator is ours, but the DB is not the source of trust
                raise SourceError("a listed file lies outside the source folder")
            if not path.is_file():
                raise SourceError("a file of the study is no longer in the source folder")
            out.append(path)
        return out


# --------------------------------------------------------------------------- DICOMweb


class DicomWebSource(Source):
    kind = "dicomweb"

    def __init__(self, url: str, query: dict[str, str], timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.query = query
        self.timeout = timeout

    def _client(self) -> Any:
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.url)

    def studies(self) -> Iterator[StudyRef]:
        client = self._client()
        offset, page = 0, 200
        while True:
            try:
                found = client.search_for_studies(search_filters=dict(self.query), limit=page, offset=offset)
            except Exception as exc:
                raise SourceError(f"the DICOMweb server did not answer the study query ({_why(exc)})") from None
            for r in found:
                uid = _json_value(r, "0020000D")
                if uid:
                    yield StudyRef(uid, _json_value(r, "00100020"))
            if len(found) < page:
                return
            offset += len(found)

    def fetch(self, ref: StudyRef, scratch: Path) -> list[Path]:
        try:
            datasets = self._client().retrieve_study(ref.study_instance_uid)
        except Exception as exc:
            raise SourceError(f"WADO-RS retrieval of the study failed ({_why(exc)})") from None
        if not datasets:
            raise SourceError("WADO-RS returned no instance for the study")
        return [_write_scratch(ds, scratch, i) for i, ds in enumerate(datasets)]


def _json_value(r: dict[str, Any], tag: str) -> str | None:
    v = (r.get(tag) or {}).get("Value") or []
    return str(v[0]) if v else None


def _why(exc: BaseException) -> str:
    """A cause without identifiers: the exception type and an HTTP status when there is one."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"{type(exc).__name__}{f', HTTP {status}' if status else ''}"


# --------------------------------------------------------------------------- DIMSE


class _ScratchSink:
    """The C-STORE side of a C-GET / C-MOVE retrieval: each received instance is written, as
    received, to `scratch/NNNNNN.dcm` (numbered in arrival order; no received value names a file)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.files: list[Path] = []
        self._lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        with self._lock:
            path = self.scratch / f"{len(self.files):06d}.dcm"
            self.files.append(path)
        _save_received(event, path)
        return 0x0000


class DimseSource(Source):
    kind = "dimse"

    def __init__(
        self,
        aet: str,
        host: str,
        port: int,
        query: dict[str, str],
        *,
        calling_ae: str = "UNIMEDVL",
        retrieve: str = "get",
        move_port: int = 0,
        timeout: float = 60.0,
    ) -> None:
        self.aet, self.host, self.port = aet, host, port
        self.query = query
        self.calling_ae = calling_ae
        self.retrieve = retrieve
        self.move_port = move_port
        self.timeout = timeout

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae: Any, **kw: Any) -> Any:
        assoc = ae.associate(self.host, self.port, ae_title=self.aet, **kw)
        if not assoc.is_established:
            raise SourceError(
                f"the PACS {self.aet} at {self.host}:{self.port} refused or did not answer the association"
            )
        return assoc

    def studies(self) -> Iterator[StudyRef]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

        ae = self._ae()
        ae.add_requested_context(Find)
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ""
        ident.PatientID = ""
        for k, v in self.query.items():
            setattr(ident, k, v)
        assoc = self._associate(ae)
        refs: list[StudyRef] = []
        try:
            for status, found in assoc.send_c_find(ident, Find):
                code = getattr(status, "Status", None)
                if code is None:
                    raise SourceError("the PACS stopped answering the study query")
                if code in (0xFF00, 0xFF01) and found is not None:
                    uid = str(found.get("StudyInstanceUID", "") or "")
                    if UID_RE.match(uid):
                        refs.append(StudyRef(uid, str(found.get("PatientID", "") or "") or None))
                elif code not in (0x0000, 0xFF00, 0xFF01):
                    raise SourceError(f"the PACS answered the study query with status 0x{code:04X}")
        finally:
            assoc.release()
        yield from refs

    def fetch(self, ref: StudyRef, scratch: Path) -> list[Path]:
        return self._move(ref, scratch) if self.retrieve == "move" else self._get(ref, scratch)

    def _identifier(self, ref: StudyRef) -> Dataset:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ref.study_instance_uid
        return ident

    def _get(self, ref: StudyRef, scratch: Path) -> list[Path]:
        from pynetdicom import StoragePresentationContexts, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

        ae = self._ae()
        ae.add_requested_context(Get)
        roles = []
        for cx in StoragePresentationContexts[:127]:  # 128 contexts at most per association
            ae.add_requested_context(cx.abstract_syntax)
            roles.append(build_role(cx.abstract_syntax, scp_role=True))
        sink = _ScratchSink(scratch)
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, sink.on_store)])
        return self._retrieve(assoc, assoc.send_c_get(self._identifier(ref), Get), sink.files, "C-GET")

    def _move(self, ref: StudyRef, scratch: Path) -> list[Path]:
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move

        sink = _ScratchSink(scratch)
        ae = self._ae()
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            ("0.0.0.0", self.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, sink.on_store)]
        )
        try:
            ae.add_requested_context(Move)
            assoc = self._associate(ae)
            return self._retrieve(
                assoc, assoc.send_c_move(self._identifier(ref), self.calling_ae, Move), sink.files, "C-MOVE"
            )
        finally:
            server.shutdown()

    def _retrieve(self, assoc: Any, responses: Any, files: list[Path], what: str) -> list[Path]:
        final = None
        try:
            for status, _ in responses:
                code = getattr(status, "Status", None)
                if code is None:
                    raise SourceError(f"the PACS stopped answering the {what}")
                if code not in (0xFF00,):
                    final = (code, int(status.get("NumberOfFailedSuboperations", 0) or 0))
        finally:
            assoc.release()
        if final is None:
            raise SourceError(f"the PACS ended the {what} without a final status")
        code, failed = final
        if code not in (0x0000, 0xB000) or failed:
            raise SourceError(f"the {what} ended with status 0x{code:04X} ({failed} failed sub-operation(s))")
        if not files:
            raise SourceError(f"the {what} returned no instance for the study")
        return sorted(files)


# --------------------------------------------------------------------------- UID lists


class UidListSource(Source):
    """StudyInstanceUIDs from a text file (one a line) or a CSV (a StudyInstanceUID column)."""

    kind = "uids"

    def __init__(self, path: Path, fetch_from: Source) -> None:
        self.path = path
        self.backend = fetch_from

    def studies(self) -> Iterator[StudyRef]:
        text = self.path.read_text(encoding="utf-8-sig")
        rows = list(csv.reader(text.splitlines()))
        col = 0
        if rows and any(c.strip() == "StudyInstanceUID" for c in rows[0]):
            col = [c.strip() for c in rows[0]].index("StudyInstanceUID")
            rows = rows[1:]
        for n, row in enumerate(rows, 1):
            if not row or not row[col].strip() or row[col].startswith("#"):
                continue
            uid = row[col].strip()
            if not UID_RE.match(uid) or len(uid) > 64:
                raise SourceError(f"line {n} of the UID list is not a StudyInstanceUID")
            yield StudyRef(uid)

    def fetch(self, ref: StudyRef, scratch: Path) -> list[Path]:
        return self.backend.fetch(ref, scratch)


def parse_query(pairs: list[str] | None) -> dict[str, str]:
    """["StudyDate=20240101-20241231", "ModalitiesInStudy=CT"] -> a dict; unknown keywords refused."""
    from pydicom.datadict import tag_for_keyword

    out: dict[str, str] = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or tag_for_keyword(key.strip()) is None:
            raise SourceError(f"--query {p!r}: expected KEYWORD=VALUE with a DICOM keyword")
        out[key.strip()] = value.strip()
    return out


def parse_source(source: str, options: dict[str, Any]) -> Source:
    """A Source from the SOURCE argument and the batch options (query, fetch_from, retrieve, ...)."""
    query = dict(options.get("query") or {})
    timeout = float(options.get("fetch_timeout_seconds", 60.0))
    m = _DIMSE.match(source)
    if m:
        return DimseSource(
            m["aet"],
            m["host"],
            int(m["port"]),
            query,
            calling_ae=str(options.get("calling_ae") or "UNIMEDVL"),
            retrieve=str(options.get("retrieve") or "get"),
            move_port=int(options.get("move_port") or 0),
            timeout=timeout,
        )
    if source.startswith(("http://", "https://")):
        return DicomWebSource(source, query, timeout)
    path = Path(source)
    if path.is_file() and path.name.upper() == "DICOMDIR":
        return FolderSource(path.parent)
    if path.is_file() and path.suffix.lower() in (".csv", ".txt"):
        backend = options.get("fetch_from")
        if not backend:
            raise SourceError("a list of StudyInstanceUIDs needs --fetch-from dimse://... or a DICOMweb URL")
        return UidListSource(path, parse_source(str(backend), {**options, "fetch_from": None}))
    if path.is_dir():
        return FolderSource(path)
    raise SourceError(
        "SOURCE must be a folder, a DICOMDIR, a .csv/.txt list of StudyInstanceUIDs, dimse://AET@host:port "
        "or an http(s):// DICOMweb URL"
    )


def _save_received(event: Any, path: Path) -> None:
    """Write a received C-STORE data set as a Part 10 file: the file pynetdicom already wrote when
    the process receives in chunks (`STORE_RECV_CHUNKED_DATASET`, set by a listener), else the
    encoded bytes as received."""
    received = event.dataset_path
    if received:
        shutil.copyfile(received, path)
        return
    with path.open("wb") as f:
        f.write(event.encoded_dataset())
