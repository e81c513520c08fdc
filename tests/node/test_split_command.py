"""A C-STORE-RQ command set split over several P-DATA fragments (PDVs) is checked as a whole: an
empty or absent Affected SOP Class/Instance UID is answered 0xC001 whatever the split (one, two,
three fragments; inside the UID element's tag, its length or its value; fragments in one PDU or
one PDU each), like the one-fragment case, and a valid command split the same way is stored."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage
from sqlmodel import Session, select

from dicom_node.models import Instance, Rejection
from tests.node.conftest import make_ct
from tests.node.raw_dimse import RawAssociation, encode_command, encode_dataset


def _pdv(value: bytes, *, command: bool, last: bool) -> bytes:
    return struct.pack(">LBB", len(value) + 2, 1, (1 if command else 0) | (2 if last else 0)) + value


def _pdu(pdvs: bytes) -> bytes:
    return struct.pack(">BBL", 0x04, 0, len(pdvs)) + pdvs


def _command(message_id: int, sop_class: str | None, sop_instance: str | None) -> bytes:
    """C-STORE-RQ command set; None leaves the UID element out, "" sends it empty."""
    elements: dict[str, Any] = {"CommandField": 0x0001, "MessageID": message_id, "Priority": 0}
    if sop_class is not None:
        elements["AffectedSOPClassUID"] = sop_class
    elements["CommandDataSetType"] = 0x0000
    if sop_instance is not None:
        elements["AffectedSOPInstanceUID"] = sop_instance
    return encode_command(**elements)


def _element_at(command: bytes, element: int) -> int:
    """Offset of (0000,element)'s tag in an implicit VR LE command set; -1 if absent."""
    at = 0
    while at + 8 <= len(command):
        _, elem, length = struct.unpack_from("<HHL", command, at)
        if elem == element:
            return at
        at += 8 + length
    return -1


def _cut_points(command: bytes, element: int) -> dict[str, int]:
    """Where to split a command: inside the element's tag, its length, at and inside its value
    (the element following where it is absent), at its end, and at the command's first and
    last bytes."""
    at = _element_at(command, element)
    if at < 0:  # absent: split around the element that precedes it in tag order
        at = _element_at(command, 0x0800 if element == 0x1000 else 0x0100)
    (length,) = struct.unpack_from("<L", command, at + 4)
    points = {
        "after byte 1": 1,
        "mid-tag": at + 2,
        "mid-length": at + 6,
        "at the value": at + 8,
        "mid-value": at + 8 + max(length // 2, 0),
        "after the element": at + 8 + length,
        "before the last byte": len(command) - 1,
    }
    return {k: v for k, v in points.items() if 0 < v < len(command)}


def _splits(command: bytes, element: int) -> Iterator[tuple[str, list[bytes]]]:
    yield "one fragment", [command]
    points = _cut_points(command, element)
    for name, p in points.items():
        yield f"two fragments, {name}", [command[:p], command[p:]]
    ordered = sorted(set(points.values()))
    for a, b in zip(ordered, ordered[1:], strict=False):
        yield f"three fragments at {a} and {b}", [command[:a], command[a:b], command[b:]]


def _send(assoc: RawAssociation, fragments: list[bytes], data: bytes, *, one_pdu: bool) -> Any:
    pdvs = [_pdv(f, command=True, last=i == len(fragments) - 1) for i, f in enumerate(fragments)]
    pdvs.append(_pdv(data, command=False, last=True))
    if one_pdu:  # the command's fragments and the data set in one PDU
        assoc.sock.sendall(_pdu(b"".join(pdvs)))
    else:
        for p in pdvs:
            assoc.sock.sendall(_pdu(p))
    return assoc.response()


BAD = {
    "empty Affected SOP Instance UID": ((CTImageStorage, ""), 0x1000, "Affected SOP Instance UID missing"),
    "absent Affected SOP Instance UID": ((CTImageStorage, None), 0x1000, "Affected SOP Instance UID missing"),
    "empty Affected SOP Class UID": (("", "SOP"), 0x0002, "Affected SOP Class UID missing"),
}


def _uid(n: int) -> str:
    """A UID of fixed length (36), so every command of a case splits at the same offsets."""
    return f"2.25.{10**30 + n}"


def test_missing_uid_in_a_split_command_is_answered(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    assoc = RawAssociation(node.port, CTImageStorage)
    message_id = 0
    stored: set[str] = set()
    refused = 0
    try:
        for bad, ((sop_class, sop_instance), element, comment) in BAD.items():
            n_splits = len(list(_splits(_command(1, sop_class, sop_instance), element)))
            for i in range(n_splits):
                for one_pdu in (False, True):
                    message_id += 1
                    sop = _uid(message_id)
                    command = _command(message_id, sop_class, sop if sop_instance == "SOP" else sop_instance)
                    split, fragments = list(_splits(command, element))[i]
                    case = f"{bad}, {split}, {'one PDU' if one_pdu else 'a PDU each'}"
                    rsp = _send(assoc, fragments, encode_dataset(make_ct(sop_uid=sop)), one_pdu=one_pdu)
                    assert rsp is not None, f"{case}: no response"
                    assert rsp.Status == 0xC001, f"{case}: 0x{rsp.Status:04X}"
                    assert rsp.ErrorComment == comment, case
                    assert rsp.MessageIDBeingRespondedTo == message_id, case
                    refused += 1
                    # A valid command split the same way on the same association: stored.
                    message_id += 1
                    good = _uid(message_id)
                    command = _command(message_id, CTImageStorage, good)
                    _, fragments = list(_splits(command, 0x1000))[i % len(list(_splits(command, 0x1000)))]
                    ok = _send(assoc, fragments, encode_dataset(make_ct(sop_uid=good)), one_pdu=one_pdu)
                    assert ok is not None and ok.Status == 0, f"valid command after {case}: {ok}"
                    stored.add(good)
    finally:
        assoc.release()
    with Session(node.engine) as s:
        assert {i.sop_instance_uid for i in s.exec(select(Instance)).all()} == stored
        rows = s.exec(select(Rejection).where(Rejection.reason == "invalid_command")).all()
    assert len(rows) == refused and all(r.status == 0xC001 for r in rows)


def test_command_longer_than_the_withholding_bound_passes_as_it_comes() -> None:
    """Past COMMAND_MAX the guard stops withholding (it hands on what it held and the rest as it
    arrives): pynetdicom sees the same bytes in the same order, only the split differs."""
    from dicom_node.transport_guard import COMMAND_MAX, ConnectionGuard, _GuardState, _scan_p_data

    guard = ConnectionGuard(max_pdu=0, associate_timeout=1, pdu_timeout=1, max_per_host=1, max_dataset_bytes=1 << 20)
    st = _GuardState(guard, "127.0.0.1")
    parts = [b"a" * 100, b"b" * COMMAND_MAX, b"c" * 10, b"d" * 5]
    seen = b""
    for i, part in enumerate(parts):
        body = _scan_p_data(st, bytearray(_pdv(part, command=True, last=i == len(parts) - 1)), guard)
        seen += bytes(body[6:])
    assert seen == b"".join(parts)
    assert not st.command and not st.command_spilled  # the next command is withheld again
