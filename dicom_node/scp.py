"""The DICOM listener: C-ECHO and C-STORE SCP on a plain port and (optionally) a TLS port.

pynetdicom does the protocol; this module adds what a gateway needs around it:
- access control before anything else is negotiated (remote IP allow-list, calling AE
  allow-list, called AE check), each refusal an A-ASSOCIATE-RJ with the matching reason and a
  rejection-log row;
- TCP_NODELAY on accepted sockets (pynetdicom does not set it; small C-STORE-RSP PDUs would
  otherwise wait on Nagle + delayed ACK);
- the TLS handshake in the association's own thread with a timeout, so a silent or plain-text
  client on the TLS port cannot stall the accept loop;
- SO_REUSEPORT when several listener processes share one port;
- the C-STORE handler that hands the raw received bytes to `Ingest` (no decode/re-encode).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom import association as _pynetdicom_association
from pynetdicom.acse import ACSE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.config import Settings
from dicom_node.ingest import PROCESSING_FAILURE, Ingest, Peer, Refused, record_rejection, short_ae
from dicom_node.logs import kv

log = logging.getLogger("dicom_node.scp")

# Per-PDU/DIMSE logging handlers cost time on every message; we log per association instead.
_config.LOG_HANDLER_LEVEL = "none"
# Decode nothing we do not have to.
_config.STORE_RECV_CHUNKED_DATASET = False
# Received data is often slightly non-conformant: index what we can without a warning per element.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

PREAMBLE = b"\x00" * 128 + b"DICM"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (the standard contexts plus its registry) and
    the retired image storage classes of pydicom's UID dictionary: old modalities still send
    Ultrasound Image Storage (Retired, 1.2.840.10008.5.1.4.1.1.6) and its kin (PS3.4 B.5)."""
    from pydicom._uid_dict import UID_dictionary

    uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    uids += [str(u) for u in _STORAGE_CLASSES.values()]
    uids += [
        uid
        for uid, (_name, kind, _info, retired, _kw) in UID_dictionary.items()
        if kind == "SOP Class" and retired == "Retired" and uid.startswith("1.2.840.10008.5.1.4.1.1.")
    ]
    return list(dict.fromkeys(uids))


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


# Longest idle wait of a DUL thread in select(); data and our own responses wake it earlier.
IDLE_WAIT = 0.02
# Longest idle wait of an association reactor; DIMSE messages and release/abort wake it earlier.
REACTOR_IDLE_WAIT = 0.02


class _ReactorClock:
    """Stands in for the `time` module inside pynetdicom.association.

    An association's reactor polls its queues with `time.sleep(0.001)` between looks, so every
    received C-STORE waits up to a millisecond (more on a loaded machine) before its handler
    runs, and 8 idle associations wake 8,000 times a second to compete for the GIL. In the
    acceptor threads of this listener that sleep becomes a wait on an event which the arrival
    of a DIMSE message or of a release/abort primitive sets, so the handler starts at once and
    an idle reactor wakes only every REACTOR_IDLE_WAIT (timers, kill flag, a dead DUL thread).
    Every other thread sleeps as before.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def attach(self, *queues: Any) -> None:
        """Call in the association's own thread: wake its reactor when one of `queues` gets an item."""
        event = threading.Event()
        self._local.event = event
        for q in queues:
            q.put = _put_and_set(q.put, event)

    def sleep(self, seconds: float) -> None:
        event = getattr(self._local, "event", None)
        if event is None:
            time.sleep(seconds)
            return
        # An item put after this clear() sets the event again; one put before it is already in
        # its queue, which the reactor reads next.
        event.wait(REACTOR_IDLE_WAIT if seconds <= 0.001 else seconds)
        event.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _put_and_set(put: Callable[..., None], event: threading.Event) -> Callable[..., None]:
    def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
        put(item, *args, **kwargs)
        event.set()

    return put_and_wake


_REACTOR_CLOCK = _ReactorClock()
_pynetdicom_association.time = _REACTOR_CLOCK  # type: ignore[attr-defined]


class GatewayACSE(ACSE):
    """ACSE that applies the AccessPolicy before pynetdicom's own acceptor negotiation."""

    policy: AccessPolicy

    def _negotiate_as_acceptor(self) -> None:
        # Runs in the association's thread, before its reactor starts serving DIMSE messages.
        _REACTOR_CLOCK.attach(self.assoc.dimse.msg_queue, self.assoc.dul.to_user_queue)
        rq = self.requestor.primitive
        peer = Peer(
            calling_ae=short_ae(rq.calling_ae_title),
            called_ae=short_ae(rq.called_ae_title),
            remote_ip=str(self.requestor.address),
        )
        verdict = self.policy.check(peer)
        if verdict is None:
            super()._negotiate_as_acceptor()
            return
        rsd, reason, detail = verdict
        self.requestor.ae_title = rq.calling_ae_title
        self.assoc._unimedvl_rejected = True  # type: ignore[attr-defined]
        self.policy.on_reject(reason, detail, peer)  # logged before the peer hears of it
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FastAssociationSocket(AssociationSocket):
    """Reads a PDU with few large recv_into calls and keeps delayed ACKs off.

    pynetdicom reads 4 KiB per recv() call (about 130 calls for one 512 KiB CT slice). And
    most senders (DCMTK storescu, pynetdicom) leave Nagle on: they write the C-STORE command
    and the data set as two small segments, and the second waits for our ACK of the first,
    which Linux delays up to 40 ms. TCP_QUICKACK after each read sends that ACK at once.
    """

    # A pipe that wakes the DUL thread from its idle select() as soon as a primitive (our
    # C-STORE-RSP) is queued for sending; -1 until `arm_wakeup` runs.
    _wake_r = -1
    _wake_w = -1

    def arm_wakeup(self, dul: Any) -> None:
        """Make `dul` block on (socket | wake pipe) when idle instead of polling every millisecond.

        pynetdicom's DUL thread sleeps 1 ms between polls, so each incoming C-STORE and each
        outgoing response waits up to a millisecond (more on a loaded machine) for the next
        poll. Here it waits in select() on the socket and a pipe that `dul.send_pdu` writes
        to, so both directions proceed at once; IDLE_WAIT only bounds how late it notices
        timers and a kill request.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = r, w
        # Closed when the socket object is collected, not in close(): the DUL thread may still
        # be selecting on the pipe then, and a recycled descriptor number must never be read.
        weakref.finalize(self, _close_fds, r, w)
        queue_pdu = dul.send_pdu

        def send_pdu(primitive: Any) -> None:
            queue_pdu(primitive)
            try:
                os.write(w, b"\0")
            except OSError:  # pipe full (a wake-up is pending anyway) or closed
                pass

        dul.send_pdu = send_pdu
        dul._run_loop_delay = 0  # the select() below is the idle wait now

    @property
    def ready(self) -> bool:
        if self._wake_r < 0:
            return bool(super().ready)
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as pynetdicom does
            return False
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes:
            n = sock.recv_into(view[got:], min(nr_bytes - got, 1 << 20))
            if not n:
                del view
                return buf[:got]
            got += n
        if _QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        return buf


class GatewayRequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # Same object, faster reads (the class only overrides recv; no extra state).
        assoc.dul.socket.__class__ = FastAssociationSocket
        assoc.dul.socket.arm_wakeup(assoc.dul)
        acse = GatewayACSE(assoc)
        acse.policy = self.server.policy  # type: ignore[attr-defined]
        assoc.acse = acse
        return assoc


class GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY, SO_REUSEPORT and a deferred TLS handshake."""

    daemon_threads = True
    policy: AccessPolicy
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
        if self.ssl_context:
            # Handshake later, in the connection's thread (process_request_thread).
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

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
    __slots__ = ("peer", "started", "stored", "refused", "bytes")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.started = time.monotonic()
        self.stored = 0
        self.refused = 0
        self.bytes = 0


class Listener:
    """One process's DICOM listener (plain port + optional TLS port), sharing one Ingest."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        *,
        reuse_port: bool = False,
        active: ActiveAssociations | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.reuse_port = reuse_port
        self.active = active or ActiveAssociations()
        self.servers: list[GatewayServer] = []
        self._threads: list[threading.Thread] = []
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()
        self.ae = self._build_ae()
        self.policy = AccessPolicy(settings, self._on_policy_reject)

    # ------------------------------------------------------------------ setup

    def _build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        # Access control is ours (GatewayACSE): it also records why it refused.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]

    def _make_server(self, port: int, ssl_context: ssl.SSLContext | None) -> GatewayServer:
        address = (self.settings.node.host, port)
        server_cls = type(
            "BoundGatewayServer",
            (GatewayServer,),
            {"reuse_port": self.reuse_port, "policy": self.policy, "on_tls_failure": self._on_tls_failure},
        )
        server = self.ae.make_server(
            address,
            ae_title=self.settings.node.ae_title,
            contexts=self.ae.supported_contexts,
            ssl_context=ssl_context,
            evt_handlers=self._handlers(),
            server_class=server_cls,
            request_handler=GatewayRequestHandler,
        )
        return server  # type: ignore[return-value]

    def start(self) -> None:
        node = self.settings.node
        self.servers.append(self._make_server(node.port, None))
        if node.tls_port:
            self.servers.append(self._make_server(node.tls_port, build_ssl_context(self.settings)))
        for server in self.servers:
            self.ae._servers.append(server)
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

    # ------------------------------------------------------------------ events

    def _peer(self, assoc: Any) -> Peer:
        return Peer(
            calling_ae=short_ae(assoc.requestor.ae_title),
            called_ae=short_ae(assoc.acceptor.ae_title),
            remote_ip=str(assoc.requestor.address),
        )

    def _on_policy_reject(self, reason: str, detail: str, peer: Peer) -> None:
        record_rejection(self.ingest.engine, stage="association", reason=reason, detail=detail, peer=peer)

    def _on_tls_failure(self, remote_ip: str, error: str) -> None:
        record_rejection(
            self.ingest.engine,
            stage="association",
            reason="tls_handshake",
            detail=f"TLS handshake failed ({error})",
            peer=Peer(calling_ae="", called_ae="", remote_ip=remote_ip),
        )

    def _on_rejected(self, event: Any) -> None:
        if getattr(event.assoc, "_unimedvl_rejected", False):
            return
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
        for cx in getattr(assoc, "_rejected_cx", []):
            log.warning(
                "presentation context refused",
                extra=kv(abstract_syntax=str(cx.abstract_syntax), result=cx.result, calling_ae=peer.calling_ae),
            )
        log.info("association established", extra=kv(calling_ae=peer.calling_ae, remote_ip=peer.remote_ip))

    def _on_close(self, event: Any) -> None:
        key = id(event.assoc)
        self.active.discard(key)
        with self._stats_lock:
            stats = self._stats.pop(key, None)
        if stats is not None:
            log.info(
                "association closed",
                extra=kv(
                    calling_ae=stats.peer.calling_ae,
                    remote_ip=stats.peer.remote_ip,
                    stored=stats.stored,
                    refused=stats.refused,
                    bytes=stats.bytes,
                    seconds=round(time.monotonic() - stats.started, 3),
                ),
            )

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int | Dataset:
        assoc = event.assoc
        stats = self._stats.get(id(assoc))
        peer = stats.peer if stats is not None else self._peer(assoc)
        request = event.request
        try:
            meta = event.file_meta
            buf = DicomBytesIO()
            write_file_meta_info(buf, meta, enforce_standard=True)
            head = PREAMBLE + buf.getvalue()
            dataset = event.encoded_dataset(include_meta=False)
            outcome = self.ingest.receive(
                head,
                dataset,
                peer,
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
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
            log.exception("C-STORE failed", extra=kv(calling_ae=peer.calling_ae))
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
        if stats is not None:
            stats.stored += 1
            stats.bytes += outcome.size
        return outcome.status


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
