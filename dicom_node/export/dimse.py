"""C-STORE SCU: one association per destination per batch, many instances over it; the
exporter's loop keeps it open for a short idle time so the next batch reuses it.

Transfer syntax: for each SOP class we propose the stored syntax (when it is not plain
little endian) in one presentation context and Explicit + Implicit VR Little Endian in
another. When the PACS accepts the stored syntax the file is streamed from disk as is
(no decode); otherwise it is decoded and sent uncompressed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.export.destinations import Destination
from dicom_node.export.outcome import Kind, Outcome, SendItem, StoredObjectDamaged, classify_status
from dicom_node.pynetdicom_internals import ParkedCheckpoint

log = logging.getLogger(__name__)

UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


def _contexts_for(items: Sequence[SendItem]) -> list[PresentationContext]:
    seen: set[tuple[str, str]] = set()
    contexts: list[PresentationContext] = []
    for it in items:
        ts = it.transfer_syntax_uid
        if ts not in UNCOMPRESSED_LE and (it.sop_class_uid, ts) not in seen:
            seen.add((it.sop_class_uid, ts))
            contexts.append(build_context(it.sop_class_uid, [ts]))
        if (it.sop_class_uid, "LE") not in seen:
            seen.add((it.sop_class_uid, "LE"))
            contexts.append(build_context(it.sop_class_uid, list(UNCOMPRESSED_LE)))
    return contexts


def _contexts_from_keys(keys: set[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for (SOP class, transfer syntax or "LE") keys, as _contexts_for proposes them."""
    return [build_context(cls, list(UNCOMPRESSED_LE) if ts == "LE" else [ts]) for cls, ts in sorted(keys)]


def _context_keys(it: SendItem) -> set[tuple[str, str]]:
    keys = {(it.sop_class_uid, "LE")}
    if it.transfer_syntax_uid not in UNCOMPRESSED_LE:
        keys.add((it.sop_class_uid, it.transfer_syntax_uid))
    return keys


def _chunks(items: Sequence[SendItem]) -> list[list[SendItem]]:
    """Split a batch so that no association needs more than 128 presentation contexts."""
    chunks: list[list[SendItem]] = []
    current: list[SendItem] = []
    keys: set[tuple[str, str]] = set()
    for it in items:
        new = _context_keys(it)
        if current and len(keys | new) > MAX_CONTEXTS:
            chunks.append(current)
            current, keys = [], set()
        current.append(it)
        keys |= new
    if current:
        chunks.append(current)
    return chunks


def _connect_error(host: str, port: int, timeout: float, ctx: ssl.SSLContext | None = None) -> str:
    """Why connecting fails (pynetdicom only logs it): 'Connection refused', a TLS verify error..."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)) as sock:
            if ctx is not None:
                with ctx.wrap_socket(sock, server_hostname=host if ctx.check_hostname else None):
                    pass
            return "the connection works but the association was aborted during negotiation"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


@dataclass
class _Open:
    """An established association this sender drives (its reactor parked)."""

    ae: AE
    assoc: Association
    parked: ParkedCheckpoint | None  # None: the installed pynetdicom cannot be parked safely
    keys: set[tuple[str, str]]
    last_used: float = field(default_factory=time.monotonic)
    sent: int = 0

    def usable(self) -> bool:
        return self.assoc.is_established and not self.assoc.acse.is_aborted() and self.assoc.dul.is_alive()


class DimseSender:
    """C-STORE SCU for one destination.

    With `keep_open_seconds` > 0 the association stays open after a batch, and the next batch
    whose presentation contexts it already negotiated goes over it (no TCP + A-ASSOCIATE round
    trip per job output); `close_if_idle()` releases it once it has been idle that long. The
    caller uses one such sender from one thread at a time.
    """

    def __init__(self, dest: Destination, *, keep_open_seconds: float = 0.0) -> None:
        # pynetdicom's documented option, set when a sender is made (never on import): C-STORE
        # from a file path streams it from disk instead of decoding it. Affects nothing else.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.dest = dest
        self.keep_open_seconds = keep_open_seconds
        self._kept: _Open | None = None

    def _ae(self, contexts: list[PresentationContext]) -> AE:
        ae = AE(ae_title=self.dest.calling_ae)
        ae.acse_timeout = self.dest.timeout_seconds
        ae.dimse_timeout = self.dest.timeout_seconds
        ae.network_timeout = self.dest.timeout_seconds
        ae.connection_timeout = self.dest.timeout_seconds
        ae.maximum_pdu_size = 0  # we mostly send; no reason to cap what the PACS may send back
        ae.requested_contexts = contexts
        return ae

    def send(self, items: Sequence[SendItem], report: Callable[[SendItem, Outcome], None]) -> None:
        for chunk in _chunks(items):
            self._send_chunk(chunk, report)

    def close_if_idle(self, now: float | None = None) -> float | None:
        """Release the kept association once idle for keep_open_seconds.

        Returns the seconds until it is due to close, or None when none is open (any more)."""
        kept = self._kept
        if kept is None:
            return None
        left = kept.last_used + self.keep_open_seconds - (time.monotonic() if now is None else now)
        if left > 0 and kept.usable():
            return left
        self._kept = None
        self._close(kept, f"idle for {self.keep_open_seconds:.1f} s" if left <= 0 else "ended by the peer")
        return None

    def close(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            self._close(kept, "exporter stopping")

    def _associate(self, ae: AE) -> Association:
        tls_args = None
        ctx = self.dest.ssl_context()
        if ctx is not None:
            tls_args = (ctx, self.dest.host if ctx.check_hostname else None)
        return ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls_args)

    def _take(self, keys: set[tuple[str, str]]) -> tuple[_Open | None, set[tuple[str, str]]]:
        """The kept association when it can carry `keys`; else close it and say what to propose."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None, keys
        if kept.usable() and keys <= kept.keys:
            return kept, keys
        wider = kept.keys | keys  # alternating SOP classes (SR, SEG...) then share one association
        self._close(kept, "needs other presentation contexts" if kept.usable() else "ended by the peer")
        return None, wider if len(wider) <= MAX_CONTEXTS else keys

    def _open(
        self, items: list[SendItem], keys: set[tuple[str, str]], report: Callable[[SendItem, Outcome], None]
    ) -> _Open | None:
        contexts = _contexts_for(items)
        seen = {k for it in items for k in _context_keys(it)}
        contexts += _contexts_from_keys(keys - seen)
        ae = self._ae(contexts)
        assoc = self._associate(ae)
        if not assoc.is_established:
            try:
                self._not_established(assoc, items, report)
            finally:
                if not assoc.is_aborted and not assoc.is_rejected and assoc.dul.is_alive():
                    assoc.abort()
                ae.shutdown()
            return None
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            # Each C-STORE waits for its response: Nagle would add a delayed-ACK wait per instance.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("export %s: association open to %s", self.dest.name, self.dest.address())
        return _Open(ae, assoc, ParkedCheckpoint.install(assoc), keys | seen)

    def _close(self, conn: _Open, why: str) -> None:
        if conn.parked is not None:
            conn.parked.release()
        assoc = conn.assoc
        try:
            if assoc.is_established and not assoc.acse.is_aborted():
                assoc.release()
            elif not assoc.is_aborted and not assoc.is_rejected and assoc.dul.is_alive():
                assoc.abort()
        finally:
            conn.ae.shutdown()
        log.info("export %s: association closed (%s), %d instance(s) sent over it", self.dest.name, why, conn.sent)

    def _send_chunk(self, items: list[SendItem], report: Callable[[SendItem, Outcome], None]) -> None:
        keys = {k for it in items for k in _context_keys(it)}
        conn, propose = self._take(keys)
        rest = items
        if conn is not None:
            first = self._store(conn, items[0])
            if first.kind is Kind.RETRY and first.status is None:
                # The kept association went stale while idle (the peer closed it): one fresh try.
                self._close(conn, "unusable after idling")
                conn = None
            else:
                report(items[0], first)
                rest = items[1:]
        if conn is None:
            conn = self._open(items, propose, report)
            if conn is None:
                return
        healthy = False
        try:
            healthy = self._send_over(conn, rest, report)
        finally:
            if healthy and self.keep_open_seconds > 0:
                conn.last_used = time.monotonic()
                self._kept = conn
            else:
                self._close(conn, "batch sent" if healthy else "association lost")

    def _send_over(self, conn: _Open, items: list[SendItem], report: Callable[[SendItem, Outcome], None]) -> bool:
        """Send `items` in order; False when the association was lost (the rest is skipped)."""
        for i, it in enumerate(items):
            out = self._store(conn, it)
            report(it, out)
            if out.kind is Kind.RETRY and out.status is None:
                # No response: the association is gone or unusable; the rest waits for the next round.
                lost = Outcome(Kind.SKIPPED, None, "association ended before this instance was sent")
                for rest in items[i + 1 :]:
                    report(rest, lost)
                return False
        return conn.usable()

    def _not_established(
        self, assoc: Association, items: list[SendItem], report: Callable[[SendItem, Outcome], None]
    ) -> None:
        where = self.dest.address()
        if assoc.is_rejected:
            out = Outcome(
                Kind.RETRY,
                None,
                f"association rejected by {where} (check the called AE title and that the PACS knows "
                f"calling AE {self.dest.calling_ae!r})",
            )
        elif assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The PACS answered but accepted none of the SOP classes of this batch.
            for it in items:
                report(it, self._refused(it))
            return
        else:
            # pynetdicom reports a failed TCP connect as an abort too; probe to say which it was.
            reason = _connect_error(self.dest.host, self.dest.port, self.dest.timeout_seconds, self.dest.ssl_context())
            out = Outcome(Kind.RETRY, None, f"cannot associate with {where}: {reason}")
        log.warning("export %s: %s (%d instance(s) will be retried)", self.dest.name, out.message, len(items))
        for it in items:
            report(it, out)

    def _refused(self, it: SendItem) -> Outcome:
        return Outcome(
            Kind.REFUSED,
            None,
            f"{self.dest.address()} accepts no presentation context for SOP class {it.sop_class_uid} "
            f"(stored as {UID(it.transfer_syntax_uid).name}, also offered Explicit/Implicit VR Little Endian)",
        )

    def _store(self, conn: _Open, it: SendItem) -> Outcome:
        out = self._store_one(conn.assoc, conn.assoc.accepted_contexts, it)
        if out.delivered:
            conn.sent += 1
        return out

    def _store_one(self, assoc: Association, accepted: list[PresentationContext], it: SendItem) -> Outcome:
        for_class = [cx for cx in accepted if cx.abstract_syntax == it.sop_class_uid]
        if not for_class:
            return self._refused(it)
        exact = any(cx.transfer_syntax[0] == it.transfer_syntax_uid for cx in for_class)
        try:
            it.read_verified()
        except StoredObjectDamaged as exc:
            return Outcome(Kind.FAIL, None, str(exc))
        except OSError as exc:
            return Outcome(Kind.RETRY, None, f"cannot read the stored object: {exc}")
        try:
            if exact:
                payload: object = it.path
                sent_ts = it.transfer_syntax_uid
            else:
                # The PACS does not take the stored syntax: decode and send little endian uncompressed.
                ds = dcmread(it.path)
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    # Keep the SOP Instance UID: it is the same object (pydicom would mint a new one).
                    ds.decompress(generate_instance_uid=False)
                else:
                    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                payload = ds
                le = [cx.transfer_syntax[0] for cx in for_class if cx.transfer_syntax[0] in UNCOMPRESSED_LE]
                sent_ts = str(le[0]) if le else ExplicitVRLittleEndian
        except Exception as exc:  # decoding needs a codec we may lack
            return Outcome(
                Kind.FAIL,
                None,
                f"destination does not accept {UID(it.transfer_syntax_uid).name} and the object could not be "
                f"decoded to send uncompressed: {exc}",
            )
        try:
            rsp = assoc.send_c_store(payload)  # type: ignore[arg-type]
        except (OSError, RuntimeError) as exc:
            return Outcome(Kind.RETRY, None, f"C-STORE to {self.dest.address()} failed: {exc}")
        except Exception as exc:  # the object itself cannot be encoded/sent (e.g. malformed file meta)
            return Outcome(Kind.FAIL, None, f"C-STORE of this object is impossible: {type(exc).__name__}: {exc}")
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            why = "association aborted" if not assoc.is_established else "no response within the DIMSE timeout"
            return Outcome(Kind.RETRY, None, f"C-STORE to {self.dest.address()}: {why}")
        out = classify_status(int(status))
        if not exact:
            note = f"sent as {UID(sent_ts).name} (destination does not accept {UID(it.transfer_syntax_uid).name})"
            msg = f"{out.message}; {note}" if out.message else note
            out = Outcome(out.kind, out.status, msg, sent_ts)
        else:
            out = Outcome(out.kind, out.status, out.message, sent_ts)
        return out
