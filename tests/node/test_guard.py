"""The connection guard: memory and slots a peer can hold before and during an association.

Each attack of the adversarial run (issue 15) is reproduced with a raw socket against an
in-process node: PDU headers claiming huge lengths, PDUs longer than the advertised maximum,
connections that send slowly or nothing, and one host taking every slot.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from dicom_node.models import Rejection
from dicom_node.transport_guard import ASSOCIATION_PDU_MAX
from tests.node.conftest import associate, make_ct, store

GIB = 1 << 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the node sends until it closes the connection (fails after `timeout` s)."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {timeout} s (received {got!r})")
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _reasons(node: Any, expect: int) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        with Session(node.engine) as s:
            rows = [r.reason for r in s.exec(select(Rejection).order_by(Rejection.id)).all()]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _assoc_rq(called: str = "UNIMEDVL", calling: str = "TESTSCU") -> bytes:
    """A minimal A-ASSOCIATE-RQ (PS3.8 9.3.2): application context + one Verification context."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32
    body += app + pc + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.parametrize(
    "pdu_type,length",
    [
        (0x01, GIB),  # A-ASSOCIATE-RQ claiming 1 GiB
        (0x01, ASSOCIATION_PDU_MAX + 1),
        (0x04, GIB),  # P-DATA-TF before any association
        (0x04, 0xFFFFFFFF),
        (0x02, 100),  # A-ASSOCIATE-AC sent to an acceptor
        (0x05, 4),  # A-RELEASE-RQ before association
        (0x07, 4),  # A-ABORT before association
    ],
)
def test_bad_first_pdu_is_aborted_without_reading_it(
    pdu_type: int, length: int, make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(struct.pack(">BBL", pdu_type, 0, length))
        answer = _read_until_closed(sock, 5)
    assert answer[:1] == b"\x07" and answer[8:9] == b"\x02", answer  # A-ABORT from the service provider
    assert _reasons(node, 1)[-1] in ("pdu_too_long", "unexpected_pdu")
    assert store(node.port, [make_ct()])[0].Status == 0


def test_huge_header_claims_do_not_grow_memory(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """The attack that took the node from 222 MB to 2.3 GB: headers claiming 1 GiB, body trickling."""
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    assert store(node.port, [make_ct()])[0].Status == 0  # warm
    before = _rss_bytes()
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(struct.pack(">BBL", 0x04, 0, GIB) + b"\0" * 4096)
        socks.append(s)
    for s in socks:
        assert _read_until_closed(s, 5)[:1] == b"\x07"
        s.close()
    assert _rss_bytes() - before < 64 * 1024 * 1024


def test_pdu_over_advertised_max_aborts_the_association(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """An 8 MiB P-DATA-TF against our 1 MiB maximum: A-ABORT as soon as its header arrives."""
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}", node={"max_pdu": 1 << 20}), completion=False)
    assoc = associate(node.port)
    assert assoc.is_established
    raw = assoc.dul.socket.socket  # the requestor's own TCP socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 8 << 20) + b"\0" * 1024)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    assert _reasons(node, 1) == ["pdu_too_long"]
    assert store(node.port, [make_ct()])[0].Status == 0


@pytest.mark.parametrize("behaviour", ["silent", "one_byte_per_second", "header_then_silence"])
def test_slow_peers_lose_their_slot(behaviour: str, make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'i.db'}",
        node={"associate_timeout_seconds": 1.0, "max_connections_per_host": 2},
    )
    node = start_node(settings, completion=False)
    rq = _assoc_rq()
    socks = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
    started = time.monotonic()
    if behaviour == "header_then_silence":
        for s in socks:
            s.sendall(rq[:10])
    # Both slots of this host are taken: a third connection is closed at once.
    with socket.create_connection(("127.0.0.1", node.port)) as third:
        assert _read_until_closed(third, 5) == b""
    for i in range(len(rq)):
        if all(s.fileno() < 0 for s in socks) or time.monotonic() - started > 8:
            break
        if behaviour == "one_byte_per_second":
            for s in list(socks):
                try:
                    s.sendall(rq[i : i + 1])
                except OSError:
                    socks.remove(s)
                    s.close()
        time.sleep(0.25 if behaviour != "one_byte_per_second" else 1.0)
        # Stop once the node has closed them (a read returns b"" or reset).
        for s in list(socks):
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    socks.remove(s)
                    s.close()
            except BlockingIOError:
                pass
            except OSError:
                socks.remove(s)
                s.close()
    assert socks == [], "slow connections still hold their slots"
    assert time.monotonic() - started < 8  # associate_timeout 1 s + reaper interval, loaded machine
    reasons = _reasons(node, 3)
    assert reasons.count("associate_timeout") == 2 and "too_many_connections" in reasons
    # The slots are free again for a real modality.
    deadline = time.monotonic() + 5
    while node.listener.guard.connections("127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store(node.port, [make_ct()])[0].Status == 0


def test_policy_refusal_happens_on_the_raw_request(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """A hand-written A-ASSOCIATE-RQ with a wrong called AE gets an A-ASSOCIATE-RJ (1, 1, 7)."""
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(_assoc_rq(called="NOTUS"))
        answer = _read_until_closed(sock, 5)
    assert answer == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 7])
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(_assoc_rq())
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    assert _reasons(node, 1)[0] == "called_ae_mismatch"


def test_oversized_instance_is_refused_while_it_arrives(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    """A data set streaming far past max_instance_bytes is read to its end but not kept (the guard
    empties its fragments past the cap), answered 0xA700 with an Error Comment, and the same
    association then stores the next instance: memory does not follow what the peer sends."""
    from pydicom.uid import CTImageStorage, generate_uid

    from tests.node.raw_dimse import RawAssociation, encode_dataset, p_data, store_command

    node = start_node(
        make_settings(f"sqlite:///{tmp_path / 'i.db'}", node={"max_instance_bytes": 1 << 20}), completion=False
    )
    assert store(node.port, [make_ct()])[0].Status == 0  # warm
    before = _rss_bytes()
    assoc = RawAssociation(node.port, CTImageStorage)
    chunk = p_data(b"\0" * (256 * 1024), command=False, last=False)
    try:
        assoc.sock.sendall(p_data(store_command(CTImageStorage, generate_uid()), command=True))
        for _ in range(128):  # 32 MiB against a 1 MiB cap
            assoc.sock.sendall(chunk)
        assoc.sock.sendall(p_data(b"", command=False, last=True))
        rsp = assoc.response()
        assert rsp is not None and rsp.Status == 0xA700
        assert "max_instance_bytes" in rsp.ErrorComment
        ds = make_ct()
        ok = assoc.store(store_command(CTImageStorage, ds.SOPInstanceUID, message_id=2), encode_dataset(ds))
        assert ok is not None and ok.Status == 0  # the association stays usable
    finally:
        assoc.release()
    assert _rss_bytes() - before < 32 * 1024 * 1024
    with Session(node.engine) as s:
        rows = s.exec(select(Rejection).where(Rejection.reason == "too_large")).all()
    assert len(rows) == 1 and rows[0].status == 0xA700 and f"{128 * 256 * 1024} B" in rows[0].detail
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []


def test_cut_fragments_past_the_cap_keep_the_message_framing() -> None:
    """The guard's P-DATA filter: data fragments past the cap lose their value, the command and the
    last fragment keep their control headers, and the verdict is kept for the handler."""
    from dicom_node.transport_guard import ConnectionGuard, _GuardState, _scan_p_data
    from tests.node.raw_dimse import p_data

    guard = ConnectionGuard(max_pdu=0, associate_timeout=1, pdu_timeout=1, max_per_host=1, max_dataset_bytes=100)
    st = _GuardState(guard, "127.0.0.1")

    def pdvs(pdu: bytes) -> list[tuple[int, bytes]]:
        body, out, at = pdu[6:], [], 0
        while at < len(body):
            (length,) = struct.unpack(">L", body[at : at + 4])
            out.append((body[at + 5], body[at + 6 : at + 4 + length]))
            at += 4 + length
        return out

    def through(pdu: bytes) -> list[tuple[int, bytes]]:
        return pdvs(bytes(6) + bytes(_scan_p_data(st, bytearray(pdu[6:]), guard)))

    assert through(p_data(b"C" * 10, command=True)) == [(3, b"C" * 10)]
    assert through(p_data(b"a" * 60, command=False, last=False)) == [(0, b"a" * 60)]
    assert through(p_data(b"b" * 60, command=False, last=False)) == [(0, b"")]  # 120 > 100: cut
    assert through(p_data(b"c" * 10, command=False, last=True)) == [(2, b"")]
    assert st.oversize == 130 and st.dataset_bytes == 0
    assert through(p_data(b"C" * 10, command=True)) == [(3, b"C" * 10)] and st.oversize == 0
    assert through(p_data(b"d" * 100, command=False, last=True)) == [(2, b"d" * 100)]  # at the cap: kept
    assert st.oversize == 0
