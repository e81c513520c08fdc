"""Bounds on what one TCP peer can make the listener hold, enforced below pynetdicom.

Accepted connections become `GuardedSocket` / `GuardedSSLSocket` objects (plain socket
subclasses, built from the accepted descriptor and through `SSLContext.sslsocket_class`, both
public APIs). They watch the PDU framing (PS3.8 9.3.1: type, reserved, 4-byte big-endian
length) of the bytes pynetdicom reads through them and:

- refuse, with an A-ABORT (source: service provider, reason: invalid PDU parameter value), a
  PDU whose header claims more than we advertised (`max_pdu` for P-DATA-TF, ASSOCIATION_PDU_MAX
  for the others) before any of its body is read. pynetdicom itself grows its buffer as data
  arrives, so memory per connection stays at most one allowed PDU;
- apply the access policy to the A-ASSOCIATE-RQ (remote address, calling and called AE title,
  PS3.8 9.3.2 fixed fields) and answer a refusal with an A-ASSOCIATE-RJ themselves;
- carry deadlines that `ConnectionGuard`'s reaper thread enforces by shutting the socket down
  (a blocked recv then returns, and pynetdicom sees the transport close): a complete
  A-ASSOCIATE-RQ within `associate_timeout`, and each started PDU within `pdu_timeout` plus
  its length at MIN_RATE bytes/s. The gap between PDUs is pynetdicom's own `network_timeout`.

`ConnectionGuard` also counts open connections per remote address and closes any beyond
`max_connections_per_host` at accept time, so one peer cannot take every slot.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dicom_node.transport_guard")

P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01
# Largest non-P-DATA PDU we read: an A-ASSOCIATE-RQ with 128 contexts and a user identity item
# (2-byte primary field) stays far below it.
ASSOCIATION_PDU_MAX = 256 * 1024
# Ceiling for P-DATA-TF when max_pdu is 0 ("unlimited" in PS3.8 terms): still bounded memory.
UNLIMITED_PDU_MAX = 64 * 1024 * 1024
# Slowest transfer a started PDU is allowed (bytes/s) on top of pdu_timeout.
MIN_RATE = 256 * 1024
REAP_INTERVAL = 0.25

# A-ABORT: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8
ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
# A-ABORT: source 2, reason 2 (unexpected PDU), PS3.8 9.3.8
ABORT_UNEXPECTED_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x02])


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """Encoded A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, diagnostic])


@dataclass(frozen=True)
class AssociateRequest:
    """Fixed fields of an A-ASSOCIATE-RQ (PS3.8 table 9-11), as received."""

    called_ae: str
    calling_ae: str
    remote_ip: str


def parse_associate_rq(pdu: bytes | bytearray, remote_ip: str) -> AssociateRequest | None:
    """Called/calling AE titles of an encoded A-ASSOCIATE-RQ (header included); None if too short."""
    if len(pdu) < 74:
        return None

    def ae(raw: bytes | bytearray) -> str:
        return bytes(raw).decode("ascii", "replace").replace("\x00", " ").strip()

    return AssociateRequest(called_ae=ae(pdu[10:26]), calling_ae=ae(pdu[26:42]), remote_ip=remote_ip)


# Verdict on an A-ASSOCIATE-RQ: None to accept, else the A-ASSOCIATE-RJ (result, source, diagnostic).
PolicyCheck = Callable[[AssociateRequest], tuple[int, int, int] | None]


class _Refused(Exception):
    """This connection was refused and answered; pynetdicom is to see the stream end."""


class _GuardState:
    """Framing and deadline state of one guarded connection (used by both socket classes)."""

    __slots__ = (
        "guard",
        "remote_ip",
        "header",
        "left",
        "pdu_type",
        "pending",
        "deadline",
        "deadline_reason",
        "associated",
        "closed",
        "dead",
    )

    def __init__(self, guard: ConnectionGuard, remote_ip: str) -> None:
        self.guard = guard
        self.remote_ip = remote_ip
        self.header = bytearray()
        self.left = 0  # body bytes of the current PDU not yet handed to the reader
        self.pdu_type = -1
        self.pending = bytearray()  # an A-ASSOCIATE-RQ body read ahead for the policy check
        self.deadline: float | None = time.monotonic() + guard.associate_timeout
        self.deadline_reason = "associate_timeout"
        self.associated = False
        self.closed = False
        self.dead = False  # refused: every further read is the end of the stream


class _Guarded:
    """Mixin over socket.socket / ssl.SSLSocket: `recv` enforces the PDU framing limits."""

    _guard_state: _GuardState | None = None
    _guard_finalizer: Any = None

    def attach_guard(self, guard: ConnectionGuard, remote_ip: str) -> None:
        self._guard_state = _GuardState(guard, remote_ip)

    def _raw_recv(self, n: int) -> bytes:
        return super().recv(n)  # type: ignore[misc]

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # noqa: C901 - one state machine
        st = self._guard_state
        if st is None or flags:
            return super().recv(bufsize, flags)  # type: ignore[misc]
        if st.dead:
            return b""
        if st.pdu_type < 0:
            # Inside a header: hand out at most the header's remaining bytes.
            if not st.header and st.deadline is None:
                st.deadline = time.monotonic() + st.guard.pdu_timeout
                st.deadline_reason = "pdu_timeout"
            data = self._raw_recv(min(bufsize, 6 - len(st.header)))
            if not data:
                return data
            st.header += data
            if len(st.header) == 6:
                try:
                    self._start_pdu(st)
                except _Refused:
                    # End of stream for pynetdicom: a short header is a closed transport (Evt17),
                    # without its error log and traceback for what was a deliberate refusal.
                    st.dead = True
                    st.guard.released(st)
                    return b""
            return data
        if st.pending:
            data = bytes(st.pending[:bufsize])
            del st.pending[: len(data)]
        else:
            data = self._raw_recv(min(bufsize, st.left))
        st.left -= len(data)
        if st.left == 0 and st.associated:
            # PDU complete: what follows is idle time (pynetdicom's network_timeout), not ours.
            st.pdu_type = -1
            st.deadline = None
        return data

    def _start_pdu(self, st: _GuardState) -> None:
        pdu_type, _, length = struct.unpack(">BBL", st.header)
        header = bytes(st.header)
        st.header.clear()
        guard = st.guard
        limit = guard.p_data_max if pdu_type == P_DATA_TF else ASSOCIATION_PDU_MAX
        if length > limit:
            self._refuse(
                st, ABORT_INVALID_PARAMETER, "pdu_too_long", f"PDU type 0x{pdu_type:02X} claims {length} B > {limit} B"
            )
        if not st.associated and pdu_type != A_ASSOCIATE_RQ:
            self._refuse(st, ABORT_UNEXPECTED_PDU, "unexpected_pdu", f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        st.pdu_type = pdu_type
        st.left = length
        if st.associated:
            st.deadline = time.monotonic() + guard.pdu_timeout + length / MIN_RATE
            st.deadline_reason = "pdu_timeout"
            return
        # A-ASSOCIATE-RQ: read it whole (bounded above) under the associate deadline, check it.
        body = bytearray()
        while len(body) < length:
            chunk = self._raw_recv(min(65536, length - len(body)))
            if not chunk:
                break
            body += chunk
        st.pending = body
        request = parse_associate_rq(header + body, st.remote_ip)
        verdict = guard.policy(request) if request is not None and guard.policy is not None else None
        if verdict is not None:
            self._send_quietly(associate_rj(*verdict))
            raise _Refused("association refused by policy")
        st.associated = True
        st.deadline = None

    def _refuse(self, st: _GuardState, pdu: bytes, reason: str, detail: str) -> None:
        self._send_quietly(pdu)
        st.guard.report(reason, detail, st.remote_ip)
        raise _Refused(detail)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sendall(data)  # type: ignore[attr-defined]
        except OSError:
            pass

    def close(self) -> None:
        st = self._guard_state
        if st is not None:
            st.guard.released(st)
        super().close()  # type: ignore[misc]


class GuardedSocket(_Guarded, socket.socket):
    """An accepted plain TCP connection with PDU framing limits and deadlines."""


class GuardedSSLSocket(_Guarded, ssl.SSLSocket):
    """An accepted TLS connection with PDU framing limits and deadlines (set as `sslsocket_class`)."""


class ConnectionGuard:
    """Per-listener bookkeeping: connections per host and the deadline reaper."""

    def __init__(
        self,
        *,
        max_pdu: int,
        associate_timeout: float,
        pdu_timeout: float,
        max_per_host: int,
        policy: PolicyCheck | None = None,
        on_refuse: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.p_data_max = max_pdu if max_pdu > 0 else UNLIMITED_PDU_MAX
        self.associate_timeout = associate_timeout
        self.pdu_timeout = pdu_timeout
        self.max_per_host = max_per_host
        self.policy = policy
        self.on_refuse = on_refuse
        self._lock = threading.Lock()
        self._per_host: dict[str, int] = {}
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="connection-reaper", daemon=True)
            self._reaper.start()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ connections

    def admit(self, sock: socket.socket, remote_ip: str) -> GuardedSocket | None:
        """Take an accepted socket: the guarded replacement, or None (closed) if its host is over its slots."""
        with self._lock:
            n = self._per_host.get(remote_ip, 0)
            if n >= self.max_per_host:
                over = True
            else:
                over = False
                self._per_host[remote_ip] = n + 1
        if over:
            sock.close()
            self.report("too_many_connections", f"more than {self.max_per_host} connections from this host", remote_ip)
            return None
        guarded = GuardedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.attach_guard(self, remote_ip)
        self._track(guarded)
        return guarded

    def wrap_tls(self, plain: GuardedSocket, context: ssl.SSLContext) -> GuardedSSLSocket:
        """TLS server wrapper (handshake deferred) of an admitted socket; its slot moves along."""
        context.sslsocket_class = GuardedSSLSocket
        st = plain._guard_state
        plain._guard_state = None  # detached by wrap_socket, never closed: the slot is the wrapper's now
        plain._guard_finalizer.detach()
        self._open.discard(plain)
        tls = context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
        assert isinstance(tls, GuardedSSLSocket)
        tls._guard_state = st
        self._track(tls)
        return tls

    def _track(self, sock: Any) -> None:
        self._open.add(sock)
        # A socket dropped without close() (a bug elsewhere) must still give its slot back.
        sock._guard_finalizer = weakref.finalize(sock, self.released, sock._guard_state)

    def released(self, st: _GuardState | None) -> None:
        if st is None or st.closed:
            return
        st.closed = True
        with self._lock:
            n = self._per_host.get(st.remote_ip, 0) - 1
            if n > 0:
                self._per_host[st.remote_ip] = n
            else:
                self._per_host.pop(st.remote_ip, None)

    def connections(self, remote_ip: str) -> int:
        with self._lock:
            return self._per_host.get(remote_ip, 0)

    def report(self, reason: str, detail: str, remote_ip: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason, detail, remote_ip)

    # ------------------------------------------------------------------ deadlines

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL):
            now = time.monotonic()
            for sock in list(self._open):
                st = sock._guard_state
                if st is None or st.closed:
                    continue
                deadline = st.deadline
                if deadline is not None and now > deadline:
                    st.deadline = None
                    self.report(st.deadline_reason, _TIMEOUT_DETAIL[st.deadline_reason], st.remote_ip)
                    try:
                        # The base class's shutdown: on a TLS socket it leaves the SSL object to the
                        # reading thread, which then sees the end of the stream.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
                    # Its slot is free now, whenever pynetdicom gets round to closing the object.
                    self.released(st)


_TIMEOUT_DETAIL = {
    "associate_timeout": "no complete A-ASSOCIATE-RQ within associate_timeout_seconds",
    "pdu_timeout": "a PDU did not arrive in full within pdu_timeout_seconds",
}
