"""The DICOM listener: C-ECHO and C-STORE SCP on a plain port and (optionally) a TLS port.

pynetdicom does the protocol, through its public API only (subclassed server with the
`server_class` argument of `AE.make_server`, event handlers, documented `_config` options set
explicitly by `configure_dicom_libraries`, never on import). This module adds what a gateway needs
around it:
- the connection guard (dicom_node/transport_guard.py) on every accepted socket: per-host
  connection slots, PDU length limits with A-ABORT, deadlines for the A-ASSOCIATE-RQ and for
  each PDU, and the access policy (remote IP allow-list, calling AE allow-list, called AE
  check) applied to the A-ASSOCIATE-RQ before pynetdicom decodes it, each refusal an
  A-ASSOCIATE-RJ with the matching reason and a rejection-log row;
- TCP_NODELAY on accepted sockets (pynetdicom does not set it; small C-STORE-RSP PDUs would
  otherwise wait on Nagle + delayed ACK);
- the TLS handshake in the association's own thread with a timeout, so a silent or plain-text
  client on the TLS port cannot stall the accept loop;
- SO_REUSEPORT when several listener processes share one port;
- refused presentation contexts recorded in the rejection log with calling AE and SOP class;
- the C-STORE handler that hands the file pynetdicom wrote as the data set arrived
  (`STORE_RECV_CHUNKED_DATASET`, in the storage's `tmp/` folder) to `Ingest` (no decode or
  re-encode, memory bounded by the PDU size whatever the instance size); a data set the guard
  cut at `max_instance_bytes` while it arrived, or stopped because the storage could not take
  it (dicom_node/write_check.py: ENOSPC, EFBIG, EROFS), is answered 0xA700 with an Error Comment;
- the Modality Performed Procedure Step SCP (N-CREATE / N-SET, PS3.4 Annex F) in
  dicom_node/mpps.py, when `completion.mpps` is on, and the series count queries to a
  sending PACS (dicom_node/count_query.py, `completion.count_sources`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.completion import CompletionWaker
from dicom_node.config import Settings
from dicom_node.count_query import CountQueries
from dicom_node.ingest import (
    MALFORMED_UID,
    MISSING_UID,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    UID_RE,
    Ingest,
    Peer,
    Refused,
    printable,
    record_rejection,
    short_ae,
)
from dicom_node.logs import kv
from dicom_node.mpps import MPPS_SOP_CLASS, MppsStore
from dicom_node.periodic import Periodic
from dicom_node.sop_classes import storable, storage_keyword, storage_sop_classes
from dicom_node.transport_guard import MISSING_UID_MARK, AssociateRequest, ConnectionGuard
from dicom_node.write_check import WriteCheck, errno_name

log = logging.getLogger("dicom_node.scp")

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)


class AccessPolicy:
    """Who may associate: remote address, calling AE title, called AE title."""

    def __init__(self, settings: Settings, on_reject: Callable[[str, str, Peer], None]) -> None:
        node = settings.node
        self.ae_title = node.ae_title
        self.calling = {a.strip() for a in node.allowed_calling_aets}
        self.networks = [ipaddress.ip_network(h, strict=False) for h in node.allowed_hosts]
        self.on_reject = on_reject

    def check(self, peer: Peer) -> tuple[tuple[int, int, int], str, str] | None:
        if self.networks:
            try:
                ip = ipaddress.ip_address(peer.remote_ip)
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.networks):
                return RJ_NO_REASON, "host_not_allowed", "remote address not in allowed_hosts"
        if self.calling and peer.calling_ae not in self.calling:
            return RJ_CALLING_AE, "calling_ae_not_allowed", "calling AE title not in allowed_calling_aets"
        if peer.called_ae != self.ae_title:
            return RJ_CALLED_AE, "called_ae_mismatch", f"called AE title is not {self.ae_title}"
        return None


class GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY, SO_REUSEPORT and a deferred TLS handshake."""

    daemon_threads = True
    guard: ConnectionGuard
    reuse_port = False
    handshake_timeout = 30.0
    on_tls_failure: Callable[[str, str], None] | None = None

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        guarded = self.guard.admit(client, str(address[0]))
        if guarded is None:  # over its host's slots: closed; socketserver skips an OSError here
            raise ConnectionRefusedError("too many connections from this host")
        if self.ssl_context:
            # Handshake later, in the connection's thread (process_request_thread).
            return self.guard.wrap_tls(guarded, self.ssl_context), address
        return guarded, address

    def shutdown(self) -> None:
        # socketserver's own shutdown: pynetdicom's also unregisters from the AE's private server
        # list, which this server was never added to (it is started by Listener, not the AE).
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:
                if self.on_tls_failure is not None:
                    self.on_tls_failure(str(client_address[0]), type(exc).__name__)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def build_ssl_context(settings: Settings) -> ssl.SSLContext:
    node = settings.node
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195 / PS3.15 B.12: no TLS 1.0/1.1
    ctx.load_cert_chain(node.tls_cert, node.tls_key)
    if node.tls_ca:
        ctx.load_verify_locations(cafile=node.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if node.tls_require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ActiveAssociations:
    """Count of established associations in this process, optionally mirrored to a shared slot."""

    def __init__(self, shared: Any = None, slot: int = 0) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self.shared = shared
        self.slot = slot

    def add(self, key: int) -> None:
        with self._lock:
            self._ids.add(key)
            self._publish()

    def discard(self, key: int) -> None:
        with self._lock:
            self._ids.discard(key)
            self._publish()

    def _publish(self) -> None:
        if self.shared is not None:
            self.shared[self.slot] = len(self._ids)

    @property
    def count(self) -> int:
        return len(self._ids)


class _AssocStats:
    __slots__ = ("peer", "started", "stored", "refused", "bytes", "handler_s", "write_s", "fsync_s", "index_s")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.started = time.monotonic()
        self.stored = 0
        self.refused = 0
        self.bytes = 0
        self.handler_s = 0.0  # in our C-STORE handler; the rest of the association is transport
        self.write_s = 0.0
        self.fsync_s = 0.0
        self.index_s = 0.0


class Listener:
    """One process's DICOM listener (plain port + optional TLS port), sharing one Ingest."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        *,
        reuse_port: bool = False,
        active: ActiveAssociations | None = None,
        wake_completion: CompletionWaker | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        # Tells the completion monitor (in this process or, through a notification, another) to look now.
        self.wake_completion = wake_completion
        self.mpps = MppsStore(ingest.engine, on_final=wake_completion)
        sources = settings.completion.count_sources
        self.counts = (
            CountQueries(ingest.engine, sources, settings.node.ae_title, on_count=wake_completion) if sources else None
        )
        self.reuse_port = reuse_port
        self.active = active or ActiveAssociations()
        self.servers: list[GatewayServer] = []
        self._threads: list[threading.Thread] = []
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()
        self._sweeper: Periodic | None = None
        self.ae = self._build_ae()
        self.policy = AccessPolicy(settings, self._on_policy_reject)
        node = settings.node
        self.guard = ConnectionGuard(
            max_pdu=node.max_pdu,
            associate_timeout=node.associate_timeout_seconds,
            pdu_timeout=node.pdu_timeout_seconds,
            max_per_host=node.max_connections_per_host,
            policy=self._check_request,
            on_refuse=self._on_guard_refuse,
            max_dataset_bytes=node.max_instance_bytes,
            # Checked before each received fragment reaches pynetdicom's file in storage/tmp.
            write_check=WriteCheck(ingest.storage.tmp_dir),
        )

    # ------------------------------------------------------------------ setup

    def _build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        # Access control is ours (the guard applies AccessPolicy to the raw A-ASSOCIATE-RQ and
        # records why it refused).
        ae.require_called_aet = False
        ae.require_calling_aet = []
        # The A-ASSOCIATE-RQ deadline is the guard's (exact, enforced on the socket); pynetdicom's
        # ARTIM/ACSE timer is only a backstop, with room for a loaded machine.
        ae.acse_timeout = node.associate_timeout_seconds + node.pdu_timeout_seconds
        ae.network_timeout = node.pdu_timeout_seconds
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        if self.settings.completion.mpps:
            ae.add_supported_context(MPPS_SOP_CLASS, DEFAULT_TRANSFER_SYNTAXES)
        return ae

    def _evt_handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
        ]

    def _make_server(self, port: int, ssl_context: ssl.SSLContext | None) -> GatewayServer:
        address = (self.settings.node.host, port)
        server_cls = type(
            "BoundGatewayServer",
            (GatewayServer,),
            {"reuse_port": self.reuse_port, "guard": self.guard, "on_tls_failure": self._on_tls_failure},
        )
        server = self.ae.make_server(
            address,
            ae_title=self.settings.node.ae_title,
            contexts=self.ae.supported_contexts,
            ssl_context=ssl_context,
            evt_handlers=self._evt_handlers(),
            server_class=server_cls,
        )
        return server  # type: ignore[return-value]

    def start(self) -> None:
        configure_dicom_libraries(accept_private=self.settings.node.accept_private_sop_classes)
        _TEMP_DIRS.claim(self, self.ingest.storage.tmp_dir)
        self._sweeper = Periodic("temp-sweeper", self.sweep_temp, lambda: TEMP_SWEEP_INTERVAL_S, log)
        self._sweeper.start()
        node = self.settings.node
        self.guard.start()
        self.servers.append(self._make_server(node.port, None))
        if node.tls_port:
            self.servers.append(self._make_server(node.tls_port, build_ssl_context(self.settings)))
        for server in self.servers:
            t = threading.Thread(target=server.serve_forever, name=f"listener:{server.server_address[1]}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "listening",
            extra=kv(ae_title=node.ae_title, host=node.host, port=self.port, tls_port=self.tls_port or 0),
        )

    @property
    def port(self) -> int:
        return int(self.servers[0].server_address[1]) if self.servers else 0

    @property
    def tls_port(self) -> int | None:
        return int(self.servers[1].server_address[1]) if len(self.servers) > 1 else None

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let running associations finish (up to grace_seconds), abort the rest."""
        for server in list(self.servers):
            server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.servers.clear()
        self.guard.stop()
        if self.counts is not None:
            self.counts.stop()
        _TEMP_DIRS.release(self)
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def sweep_temp(self, older_than_s: float | None = None) -> int:
        """Remove received files left in the storage's `tmp/` (see Storage.sweep_stale_temp)."""
        age = STALE_TEMP_S if older_than_s is None else older_than_s
        removed = self.ingest.storage.sweep_stale_temp(age)
        if removed:
            log.info("stale temp files removed", extra=kv(count=removed))
        return removed

    # ------------------------------------------------------------------ events

    def _peer(self, assoc: Any) -> Peer:
        return Peer(
            calling_ae=short_ae(assoc.requestor.ae_title),
            called_ae=short_ae(assoc.acceptor.ae_title),
            remote_ip=str(assoc.requestor.address),
        )

    def _on_policy_reject(self, reason: str, detail: str, peer: Peer) -> None:
        record_rejection(self.ingest.engine, stage="association", reason=reason, detail=detail, peer=peer)

    def _check_request(self, rq: AssociateRequest) -> tuple[int, int, int] | None:
        """The guard's policy hook: the A-ASSOCIATE-RJ (result, source, reason) or None to go on."""
        peer = Peer(calling_ae=short_ae(rq.calling_ae), called_ae=short_ae(rq.called_ae), remote_ip=rq.remote_ip)
        verdict = self.policy.check(peer)
        if verdict is None:
            return None
        rsd, reason, detail = verdict
        self._on_policy_reject(reason, detail, peer)  # recorded before the peer hears of it
        return rsd

    def _on_guard_refuse(self, reason: str, detail: str, remote_ip: str) -> None:
        record_rejection(
            self.ingest.engine,
            stage="association",
            reason=reason,
            detail=detail,
            peer=Peer(calling_ae="", called_ae="", remote_ip=remote_ip),
        )

    def _on_tls_failure(self, remote_ip: str, error: str) -> None:
        record_rejection(
            self.ingest.engine,
            stage="association",
            reason="tls_handshake",
            detail=f"TLS handshake failed ({error})",
            peer=Peer(calling_ae="", called_ae="", remote_ip=remote_ip),
        )

    def _on_rejected(self, event: Any) -> None:
        # pynetdicom's own refusals: only the association limit is left to it.
        record_rejection(
            self.ingest.engine,
            stage="association",
            reason="too_many_associations",
            detail=f"more than max_associations ({self.settings.node.max_associations}) active",
            peer=self._peer(event.assoc),
        )

    def _on_established(self, event: Any) -> None:
        assoc = event.assoc
        self.active.add(id(assoc))
        peer = self._peer(assoc)
        with self._stats_lock:
            self._stats[id(assoc)] = _AssocStats(peer)
        for cx in assoc.rejected_contexts:
            # PS3.8 9.3.3.2 results: 1 user rejection, 2 no reason, 3 abstract syntax, 4 transfer syntaxes.
            record_rejection(
                self.ingest.engine,
                stage="negotiation",
                reason="context_refused",
                detail=f"presentation context refused (result {cx.result})",
                peer=peer,
                sop_class_uid=str(cx.abstract_syntax),
            )
        log.info("association established", extra=kv(calling_ae=printable(peer.calling_ae), remote_ip=peer.remote_ip))

    def _on_close(self, event: Any) -> None:
        key = id(event.assoc)
        self.active.discard(key)
        with self._stats_lock:
            stats = self._stats.pop(key, None)
        if stats is not None:
            log.info(
                "association closed",
                extra=kv(
                    calling_ae=printable(stats.peer.calling_ae),
                    remote_ip=stats.peer.remote_ip,
                    stored=stats.stored,
                    refused=stats.refused,
                    bytes=stats.bytes,
                    seconds=round(time.monotonic() - stats.started, 3),
                    handler_s=round(stats.handler_s, 4),
                    write_s=round(stats.write_s, 4),
                    fsync_s=round(stats.fsync_s, 4),
                    index_s=round(stats.index_s, 4),
                    # group commit so far (this process): rows per index transaction
                    commit_rows_per_batch=round(self.ingest.committer.stats.rows_per_batch, 2),
                ),
            )

    def _on_dimse_recv(self, event: Any) -> None:
        """Answer a C-STORE-RQ that pynetdicom would drop without a response.

        pynetdicom ignores a request whose command set fails its checks (empty or over-long
        Affected SOP Instance/Class UID: `is_valid_request` false) and the sender waits until it
        times out. Here (the DUL thread, before the request is queued) such a request gets a
        C-STORE-RSP with 0xC001/0xC002 and an Error Comment, and a rejection-log row.
        """
        message = event.message
        command = message.command_set
        if command is None or command.get("CommandField") != 0x0001:
            return
        problem, bad = _command_problem(command)
        if problem is None:
            try:
                if message.message_to_primitive().is_valid_request:
                    return
            except Exception:  # pynetdicom aborts on these (Evt19): nothing we can answer in time
                return
            problem = "C-STORE request command set is not valid"
        # Drop the bad values from the message before pynetdicom converts it: it then sees an
        # incomplete request and skips it quietly, instead of aborting the association (and
        # logging the raw received value).
        for keyword in bad:
            del command[keyword]
        code = MISSING_UID if "missing" in problem else MALFORMED_UID
        peer = self._peer(event.assoc)
        record_rejection(
            self.ingest.engine,
            stage="store",
            reason="invalid_command",
            detail=problem,
            status=code,
            peer=peer,
            sop_class_uid=_uid_or_empty(command.get("AffectedSOPClassUID")),
        )
        rsp = C_STORE()
        try:
            rsp.MessageIDBeingRespondedTo = int(command.get("MessageID") or 0)
        except (TypeError, ValueError):
            rsp.MessageIDBeingRespondedTo = 0
        for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            value = _uid_or_empty(command.get(keyword))
            if value:
                setattr(rsp, keyword, value)
        rsp.Status = code
        rsp.ErrorComment = problem[:64]
        event.assoc.dimse.send_msg(rsp, message.context_id)

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_n_create(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        return self.mpps.handle("N-CREATE", event, self._peer(event.assoc))

    def _on_n_set(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        return self.mpps.handle("N-SET", event, self._peer(event.assoc))

    def _on_store(self, event: Any) -> int | Dataset:
        assoc = event.assoc
        stats = self._stats.get(id(assoc))
        peer = stats.peer if stats is not None else self._peer(assoc)
        request = event.request
        t0 = time.perf_counter()
        try:
            failed = _take_storage_error(assoc)
            if failed:
                raise Refused(
                    OUT_OF_RESOURCES,
                    f"Node storage failed while receiving ({errno_name(failed)})",
                    "storage_error",
                    f"the node's storage could not take the data set as it arrived ({errno_name(failed)}:"
                    f" {os.strerror(failed)}); nothing of it kept",
                )
            sop_class = str(request.AffectedSOPClassUID or "")
            if not storable(sop_class, accept_private=self.settings.node.accept_private_sop_classes):
                raise Refused(
                    SOP_CLASS_NOT_SUPPORTED,
                    "SOP Class not supported for storage",
                    "sop_class_not_supported",
                    "not a storage SOP class of PS3.6 (private classes need node.accept_private_sop_classes)",
                )
            cut = _take_oversize(assoc)
            if cut:
                raise Refused(
                    OUT_OF_RESOURCES,
                    "Instance larger than max_instance_bytes",
                    "too_large",
                    f"data set of {cut} B > max_instance_bytes {self.ingest.max_instance_bytes} B,"
                    " discarded while it arrived",
                )
            outcome = self.ingest.receive_file(
                event.dataset_path,
                peer,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                affected_sop_class_uid=request.AffectedSOPClassUID,
                affected_sop_instance_uid=request.AffectedSOPInstanceUID,
            )
        except Refused as exc:
            if stats is not None:
                stats.refused += 1
            record_rejection(
                self.ingest.engine,
                stage="store",
                reason=exc.reason,
                detail=exc.detail,
                status=exc.status,
                peer=peer,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
            )
            return _status(exc.status, exc.comment)
        except Exception as exc:
            if stats is not None:
                stats.refused += 1
            log.exception("C-STORE failed", extra=kv(calling_ae=printable(peer.calling_ae)))
            record_rejection(
                self.ingest.engine,
                stage="store",
                reason="processing_failure",
                detail=f"{type(exc).__name__}",
                status=PROCESSING_FAILURE,
                peer=peer,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
            )
            return _status(PROCESSING_FAILURE, "Processing failure: instance not stored")
        if self.wake_completion is not None:
            self.wake_completion.stored(outcome)
        if self.counts is not None and outcome.action == "stored":
            self.counts.seen(peer.calling_ae, outcome.study_instance_uid, outcome.series_instance_uid)
        if stats is not None:
            stats.stored += 1
            stats.bytes += outcome.size
            stats.handler_s += time.perf_counter() - t0
            stats.write_s += outcome.write_s
            stats.fsync_s += outcome.fsync_s
            stats.index_s += outcome.index_s
        return outcome.status


# A received file in tmp/ untouched this long is a leftover (its transfer writes every PDU).
STALE_TEMP_S = 900.0
TEMP_SWEEP_INTERVAL_S = 300.0


def _take_oversize(assoc: Any) -> int:
    """Bytes of this association's last data set that the guard cut at the cap (0: none)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    take = getattr(sock, "take_oversize", None)
    return int(take()) if take is not None else 0


def _take_storage_error(assoc: Any) -> int:
    """The errno that stopped this association's last data set from being written (0: none)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    take = getattr(sock, "take_storage_error", None)
    return int(take()) if take is not None else 0


class _TempDirs:
    """Where pynetdicom's chunked receive writes: `tempfile.tempdir` (the documented default of
    `NamedTemporaryFile`, which pynetdicom calls without a folder) set to the storage's `tmp/`
    while a listener runs, so a received file is renamed into `objects/` on the same filesystem
    (no copy) and a crash's leftovers are swept at start-up. The newest running listener's folder
    wins; the value before the first claim comes back when the last listener stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: list[tuple[int, str]] = []
        self._before: str | None = None

    def claim(self, owner: object, folder: Any) -> None:
        with self._lock:
            if not self._claims:
                self._before = tempfile.tempdir
            self._claims.append((id(owner), str(folder)))
            tempfile.tempdir = str(folder)

    def release(self, owner: object) -> None:
        with self._lock:
            self._claims = [c for c in self._claims if c[0] != id(owner)]
            tempfile.tempdir = self._claims[-1][1] if self._claims else self._before


_TEMP_DIRS = _TempDirs()


def configure_dicom_libraries(*, accept_private: bool = False) -> None:
    """pynetdicom's documented process-wide options this listener needs; called by `Listener.start`.

    - retired storage SOP classes registered with `register_uid` as storage: pynetdicom's own
      list lacks them and would abort the association on their C-STORE;
    - UNRESTRICTED_STORAGE_SERVICE only with `accept_private`: it accepts any private SOP class
      (which cannot be listed in advance) and passes its C-STORE to our handler. Without it,
      pynetdicom refuses their presentation contexts and the listener records each refusal.
    - LOG_HANDLER_LEVEL "none": no per-PDU/DIMSE log lines (they cost time on every message and
      would print received values unescaped); the listener logs per association.
    - pydicom reading validation IGNORE: its warnings quote received values (patient data) and
      cost time per element; `dicom_node.ingest` runs its own checks on what it indexes.
    - STORE_RECV_CHUNKED_DATASET: a C-STORE data set is written to a file as its P-DATA arrive
      (not assembled in memory); the handler gets `event.dataset_path`. Other C-STORE SCPs in
      the process (batch C-GET/C-MOVE) read the file too (`dicom_node.batch.sources`).
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = accept_private
    _config.LOG_HANDLER_LEVEL = "none"
    for uid in storage_sop_classes():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, storage_keyword(uid), StorageServiceClass)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def _raw_uid(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return "" if value is None else str(value)


def _uid_or_empty(value: Any) -> str:
    """The value if it is a well-formed UID (PS3.5 9.1), else ""."""
    uid = _raw_uid(value).rstrip("\x00 ")
    return uid if uid and len(uid) <= 64 and UID_RE.match(uid) else ""


def _command_problem(command: Dataset) -> tuple[str | None, list[str]]:
    """A sentence naming the first bad UID of a C-STORE-RQ command set (None if both are fine),
    and the keywords of the present but bad elements."""
    problem: str | None = None
    bad: list[str] = []
    for keyword, name in (
        ("AffectedSOPClassUID", "Affected SOP Class UID"),
        ("AffectedSOPInstanceUID", "Affected SOP Instance UID"),
    ):
        raw = _raw_uid(command.get(keyword)).rstrip("\x00 ")
        if not raw or raw == MISSING_UID_MARK:
            this = f"{name} missing"
        elif len(raw) > 64:
            this = f"{name} longer than 64 characters"
        elif not UID_RE.match(raw):
            this = f"{name} is not a valid UID"
        else:
            continue
        problem = problem or this
        if keyword in command:
            bad.append(keyword)
    return problem, bad


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
