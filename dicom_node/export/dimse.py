"""C-STORE SCU: one association per destination per batch, many instances over it.

Transfer syntax: for each SOP class we propose the stored syntax (when it is not plain
little endian) in one presentation context and Explicit + Implicit VR Little Endian in
another. When the PACS accepts the stored syntax the file is streamed from disk as is
(no decode); otherwise it is decoded and sent uncompressed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.export.destinations import Destination
from dicom_node.export.outcome import Kind, Outcome, SendItem, StoredObjectDamaged, classify_status

log = logging.getLogger(__name__)

UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"

# Stream files from disk instead of decoding them: only affects C-STORE from a file path.
_config.STORE_SEND_CHUNKED_DATASET = True


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


class _ParkedCheckpoint(threading.Event):
    """Keeps an association's own reactor thread parked while this sender drives it.

    pynetdicom 3.0.4 pauses the reactor around each send_c_store() with a flag/Event pair that
    can race: under CPU load the reactor can slip past its checkpoint, take the C-STORE response
    off the DIMSE queue ("Received unexpected C-STORE service message") and leave the sender
    waiting for the DIMSE timeout. A requestor that only sends needs nothing from that reactor
    (aborts still reach send_c_store through the DUL, which puts (None, None) on the queue),
    so it stays parked for the batch and is released before A-RELEASE.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held = True
        self.parked = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.parked.set()  # only the reactor thread waits on the checkpoint
        return super().wait(timeout)

    def set(self) -> None:
        if not self.held:
            super().set()

    @classmethod
    def install(cls, assoc: Association) -> _ParkedCheckpoint:
        cp = cls()
        assoc._reactor_checkpoint = cp
        # Wait until the reactor sits in *our* checkpoint; only then is no response stolen.
        if not cp.parked.wait(timeout=5.0):
            log.warning("association reactor did not park within 5 s")
        return cp

    def release(self) -> None:
        self.held = False
        super().set()


class DimseSender:
    def __init__(self, dest: Destination) -> None:
        self.dest = dest

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

    def _associate(self, ae: AE) -> Association:
        tls_args = None
        ctx = self.dest.ssl_context()
        if ctx is not None:
            tls_args = (ctx, self.dest.host if ctx.check_hostname else None)
        return ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls_args)

    def _send_chunk(self, items: list[SendItem], report: Callable[[SendItem, Outcome], None]) -> None:
        contexts = _contexts_for(items)
        ae = self._ae(contexts)
        assoc = self._associate(ae)
        parked: _ParkedCheckpoint | None = None
        try:
            if not assoc.is_established:
                self._not_established(assoc, items, report)
                return
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            if sock is not None:
                # Each C-STORE waits for its response: Nagle would add a delayed-ACK wait per instance.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parked = _ParkedCheckpoint.install(assoc)
            accepted = assoc.accepted_contexts
            for i, it in enumerate(items):
                out = self._store(assoc, accepted, it)
                report(it, out)
                if out.kind is Kind.RETRY and out.status is None:
                    # No response: the association is gone or unusable; the rest waits for the next round.
                    lost = Outcome(Kind.SKIPPED, None, "association ended before this instance was sent")
                    for rest in items[i + 1 :]:
                        report(rest, lost)
                    return
        finally:
            if parked is not None:
                parked.release()
            if assoc.is_established and not assoc.acse.is_aborted():
                assoc.release()
            elif not assoc.is_aborted and not assoc.is_rejected and assoc.dul.is_alive():
                assoc.abort()
            ae.shutdown()

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

    def _store(self, assoc: Association, accepted: list[PresentationContext], it: SendItem) -> Outcome:
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
