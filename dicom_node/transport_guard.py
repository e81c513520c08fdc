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
  its length at MIN_RATE bytes/s. The gap between PDUs is pynetdicom's own `network_timeout`;
- cap each C-STORE data set while it arrives (`max_dataset_bytes`): the P-DATA-TF PDVs (PS3.8
  9.3.5, E.2: 4-byte length, context ID, message control header) are counted per message, and
  once a data set passes the cap every further data fragment reaches pynetdicom empty (the
  PDU is re-framed), so nothing more is written or held; the final fragment still arrives,
  pynetdicom completes the message, and the C-STORE handler (`take_oversize`) answers it
  0xA700 on an association that stays usable;
- stop a data set the storage cannot take (`write_check`, dicom_node/write_check.py, asked
  before each data fragment reaches pynetdicom, whose failed write would end the association
  without a response): its remaining fragments reach pynetdicom empty, or, when the storage
  cannot take even the file's start, the command says "no data set" and the fragments are
  dropped; the C-STORE handler (`take_storage_error`) answers 0xA700;
- check each C-STORE-RQ command set whole, however the peer split it over PDVs and PDUs
  (fragments before the last are withheld, up to COMMAND_MAX): an empty or absent Affected SOP
  Class/Instance UID gets a mark the EVT_DIMSE_RECV handler answers 0xC001.

`ConnectionGuard` also counts open connections per remote address and closes any beyond
`max_connections_per_host` at accept time, so one peer cannot take every slot.
"""

from __future__ import annotations

import errno
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

from dicom_node.logs import kv

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
        "dataset_bytes",
        "oversize",
        "header_out",
        "command",
        "command_spilled",
        "storage_error",
        "swallow",
        "to_file",
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
        self.dataset_bytes = 0  # data set bytes of the message arriving
        self.oversize = 0  # bytes of the last data set that passed the cap (0: none since taken)
        self.header_out = bytearray()  # the current PDU header, not yet handed to the reader
        self.command = bytearray()  # command fragments withheld until the command set is complete
        self.command_spilled = False  # this command outgrew COMMAND_MAX: passed on as it comes
        self.storage_error = 0  # errno that stopped the arriving data set's writes (0: none since taken)
        self.swallow = False  # drop this message's data fragments (its command now says "no data set")
        self.to_file = False  # this message's data set goes to a file (a C-STORE-RQ): check its writes


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
            # The whole header before any of it is handed out: a P-DATA-TF may be re-framed.
            while len(st.header) < 6:
                data = self._raw_recv(6 - len(st.header))
                if not data:
                    short = bytes(st.header)  # pynetdicom sees a short header: the transport closed
                    st.header.clear()
                    return short
                st.header += data
            try:
                st.header_out = bytearray(self._start_pdu(st))
            except _Refused:
                # End of stream for pynetdicom: a short header is a closed transport (Evt17),
                # without its error log and traceback for what was a deliberate refusal.
                st.dead = True
                st.guard.released(st)
                return b""
        if st.header_out:
            data = bytes(st.header_out[:bufsize])
            del st.header_out[: len(data)]
            return data
        if st.pending:
            data = bytes(st.pending[:bufsize])
            del st.pending[: len(data)]  # bytearray: dropping the front is O(1) amortised
        else:
            data = self._raw_recv(min(bufsize, st.left))
        st.left -= len(data)
        if st.left == 0 and st.associated:
            # PDU complete: what follows is idle time (pynetdicom's network_timeout), not ours.
            st.pdu_type = -1
            st.deadline = None
        return data

    def _start_pdu(self, st: _GuardState) -> bytes:
        """Check a complete PDU header; returns the header to hand out (re-framed P-DATA-TF)."""
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
            if pdu_type == P_DATA_TF and (guard.max_dataset_bytes or guard.write_check is not None):
                body = self._read_body(length)
                if len(body) == length:
                    body = _scan_p_data(st, body, guard)
                st.pending = body
                st.left = len(body)
                if not st.left:
                    st.pdu_type = -1
                    st.deadline = None
                return struct.pack(">BBL", pdu_type, 0, len(body)) if len(body) != length else header
            return header
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
        return header

    def _read_body(self, length: int) -> bytearray:
        """Up to `length` bytes (fewer if the stream ends), read into one buffer."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            n = self._raw_recv_into(view[got:])
            if not n:
                del body[got:]
                break
            got += n
        return body

    def _raw_recv_into(self, view: memoryview) -> int:
        return super().recv_into(view)  # type: ignore[misc, no-any-return]

    def take_oversize(self) -> int:
        """Bytes of the last data set cut at `max_dataset_bytes` (0 if none), and forget it.

        Called by the C-STORE handler of that message: a DIMSE peer sends its next request only
        after this one's response (no asynchronous operations are negotiated, PS3.7 D.3.3.3), and a
        new command clears the mark, so it belongs to the message being answered.
        """
        st = self._guard_state
        if st is None:
            return 0
        n, st.oversize = st.oversize, 0
        return n

    def take_storage_error(self) -> int:
        """The errno that stopped the last data set's writes (0 if none), and forget it.

        Set when `ConnectionGuard.write_check` refused a fragment of the message being answered
        (same reasoning as `take_oversize`): the rest of that data set reached pynetdicom empty,
        or, when it was refused at the command, not at all.
        """
        st = self._guard_state
        if st is None:
            return 0
        code, st.storage_error = st.storage_error, 0
        return code

    def abort_now(self) -> None:
        """Refuse from outside the read path (e.g. an instance growing past its cap): A-ABORT,
        free the slot; pynetdicom's next read sees the end of the stream."""
        st = self._guard_state
        if st is None or st.dead:
            return
        st.dead = True
        self._send_quietly(ABORT_INVALID_PARAMETER)
        try:
            socket.socket.shutdown(self, socket.SHUT_RDWR)  # type: ignore[arg-type]
        except OSError:
            pass
        st.guard.released(st)

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
        max_dataset_bytes: int = 0,
        write_check: Callable[[int, int], int] | None = None,
    ) -> None:
        self.max_dataset_bytes = max_dataset_bytes  # 0: no cap on an arriving data set
        # (end offset, bytes) of a data fragment about to be written -> 0 or the errno the write
        # would fail with (dicom_node.write_check.WriteCheck); None: not checked.
        self.write_check = write_check
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

    def storage_refused(self, st: _GuardState, code: int, at: str) -> None:
        """Log that `write_check` stopped a data set (`at`: "command" or "data"); the C-STORE
        handler answers it and records the rejection row."""
        log.warning(
            "received data set not written: storage would fail",
            extra=kv(error=errno.errorcode.get(code, str(code)), at=at, remote_ip=st.remote_ip),
        )

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


_PDV = struct.Struct(">LBB")
_EMPTY_PDV = 6  # 4-byte item length (2), context ID, message control header
# Command bytes withheld per message before the guard gives up and passes them on as they come
# (a C-STORE-RQ command set is a few hundred bytes; pynetdicom buffers whatever arrives anyway).
COMMAND_MAX = 64 * 1024
# Upper bound of the preamble, "DICM" and File Meta pynetdicom writes before the data set
# (128 + 4 + group 0002 with two UIDs of at most 64 bytes and its own version fields).
META_BOUND = 1024


def _scan_p_data(st: _GuardState, body: bytearray, guard: ConnectionGuard) -> bytearray:
    """Walk the PDVs (PS3.8 9.3.5, E.2) of one complete P-DATA-TF body and return it, or its
    re-framed copy when a fragment had to change:

    - command fragments that are not the last of their command set are withheld (handed on
      empty) and the whole command set travels in its last fragment, so the command checks
      below see it whatever its fragmentation (a missing UID split over three PDVs too);
    - a C-STORE-RQ with an empty or absent Affected SOP Class/Instance UID gets the mark
      (`_fill_missing_uids`);
    - data fragments past `max_dataset_bytes` lose their value (an empty PDV keeps its context
      and control header, so the message still ends where the peer ends it);
    - a data fragment `write_check` says the disk cannot take loses its value, and so does the
      rest of that data set; when the disk cannot even take the file's start (checked at the
      command), the command is re-encoded without a data set and the data fragments that follow
      are dropped: pynetdicom then never writes, and the handler answers from `storage_error`.
    """
    out: bytearray | None = None
    at, end = 0, len(body)
    cap = guard.max_dataset_bytes
    while at + _EMPTY_PDV <= end:
        length, context_id, control = _PDV.unpack_from(body, at)
        stop = min(at + 4 + length, end)
        emit: bytes | None = None  # None: this PDV goes on as it is; b"": dropped
        if control & 1:  # command fragment (a data fragment's value is never copied)
            value = body[at + 6 : stop]
            if not control & 2:
                if not st.command_spilled and len(st.command) + len(value) <= COMMAND_MAX:
                    st.command += value
                    emit = _PDV.pack(2, context_id, control)
                elif not st.command_spilled:
                    st.command_spilled = True  # too long to check: hand on what was withheld, and the rest
                    spilled = bytes(st.command) + bytes(value)
                    st.command.clear()
                    emit = _PDV.pack(len(spilled) + 2, context_id, control) + spilled
            else:
                emit = _end_of_command(st, bytes(value), context_id, control, guard)
        elif st.swallow:
            emit = b""
            if control & 2:
                st.swallow = False
        else:
            n = max(length - 2, 0)
            st.dataset_bytes += n
            cut = st.dataset_bytes > cap if cap else False
            if not cut and st.storage_error:
                cut = True
            elif not cut and n and st.to_file and guard.write_check is not None:
                st.storage_error = guard.write_check(META_BOUND + st.dataset_bytes, n)
                if st.storage_error:
                    cut = True
                    guard.storage_refused(st, st.storage_error, "data")
            if control & 2:  # last fragment of the data set
                if cap and st.dataset_bytes > cap:
                    st.oversize = st.dataset_bytes
                st.dataset_bytes = 0
            if cut:
                emit = _PDV.pack(2, context_id, control)
        if emit is not None and out is None:
            out = bytearray(body[:at])
        if out is not None:
            out += body[at:stop] if emit is None else emit
        at = stop
    if out is None:
        return body
    out += body[at:]
    return out


def _end_of_command(
    st: _GuardState, last: bytes, context_id: int, control: int, guard: ConnectionGuard
) -> bytes | None:
    """The PDV to hand on for the last fragment of a command set (None: unchanged)."""
    withheld = bool(st.command)
    command = bytes(st.command) + last if withheld else last
    st.command.clear()
    spilled, st.command_spilled = st.command_spilled, False
    # A new message starts: the previous one's verdicts were taken or are stale.
    st.dataset_bytes = 0
    st.oversize = 0
    st.storage_error = 0
    st.swallow = False
    st.to_file = True  # unless the command is known not to be a C-STORE-RQ with a data set
    if spilled:
        return None
    elements = _parse_command(command)
    if elements is not None and not _is_store_with_data_set(elements):
        st.to_file = False  # e.g. an MPPS N-CREATE: pynetdicom keeps its data set in memory
    replace: bytes | None = None
    if elements is not None and _is_store_with_data_set(elements):
        filled = _fill_missing_uids(elements)
        if filled is not None:
            replace = _encode_command(filled)
        elif guard.write_check is not None:
            st.storage_error = guard.write_check(META_BOUND, META_BOUND)
            if st.storage_error:
                guard.storage_refused(st, st.storage_error, "command")
                st.swallow = True
                elements[0x0800] = _NO_DATA_SET
                replace = _encode_command(elements)
    if replace is None and not withheld:
        return None
    value = command if replace is None else replace
    return _PDV.pack(len(value) + 2, context_id, control) + value


# Stands in for an empty or absent Affected SOP Class/Instance UID of a C-STORE-RQ (see below).
MISSING_UID_MARK = "MISSINGUID"
_CSTORE_RQ = b"\x01\x00"
_NO_DATA_SET = b"\x01\x01"


def _parse_command(command: bytes) -> dict[int, bytes] | None:
    """Elements (element number -> value) of a command set (group 0000, implicit VR LE, PS3.7
    E.1); None if it is not one."""
    elements: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, at)
        if group != 0 or at + 8 + length > len(command):
            return None
        elements[elem] = command[at + 8 : at + 8 + length]
        at += 8 + length
    return elements


def _is_store_with_data_set(elements: dict[int, bytes]) -> bool:
    return elements.get(0x0100) == _CSTORE_RQ and elements.get(0x0800, _NO_DATA_SET) != _NO_DATA_SET


def _encode_command(elements: dict[int, bytes]) -> bytes:
    """Command set from its elements, with a recomputed Command Group Length."""
    elements.pop(0x0000, None)
    body = b"".join(struct.pack("<HHL", 0, e, len(v)) + v for e, v in sorted(elements.items()))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _fill_missing_uids(elements: dict[int, bytes]) -> dict[int, bytes] | None:
    """The elements of a C-STORE-RQ whose Affected SOP Class or Instance UID is empty or absent,
    with MISSING_UID_MARK in their place; None if both are present.

    pynetdicom's chunked receive writes the File Meta from these two values when the command
    arrives and raises in its DUL thread if either is empty, leaving the association without a
    response; with the mark it completes the message and the listener's EVT_DIMSE_RECV handler
    answers 0xC001 naming the missing UID."""
    missing = [e for e in (0x0002, 0x1000) if not elements.get(e, b"").strip(b"\x00 ")]
    if not missing:
        return None
    for e in missing:
        elements[e] = MISSING_UID_MARK.encode()
    return elements


_TIMEOUT_DETAIL = {
    "associate_timeout": "no complete A-ASSOCIATE-RQ within associate_timeout_seconds",
    "pdu_timeout": "a PDU did not arrive in full within pdu_timeout_seconds",
}
