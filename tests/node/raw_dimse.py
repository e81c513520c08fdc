"""A hand-rolled C-STORE SCU (PS3.8 9.3, PS3.7 9.3.1) for sending what pynetdicom's SCU refuses
to build: malformed command sets, empty or truncated data sets. Test helper only."""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(abstract_syntax: str, transfer_syntax: str, called: str = "UNIMEDVL") -> bytes:
    pc = _item(
        0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 1 << 20)) + _item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + b"RAWSCU".ljust(16) + b"\0" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def encode_command(**elements: Any) -> bytes:
    """Command set (group 0000, implicit VR LE) with CommandGroupLength computed."""
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    body = buf.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def store_command(sop_class: str, sop_instance: str, *, message_id: int = 1, has_dataset: bool = True) -> bytes:
    return encode_command(
        AffectedSOPClassUID=sop_class,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000 if has_dataset else 0x0101,
        AffectedSOPInstanceUID=sop_instance,
    )


def p_data(payload: bytes, *, command: bool, last: bool = True, context_id: int = 1) -> bytes:
    mch = (1 if command else 0) | (2 if last else 0)
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, mch) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


class RawAssociation:
    """One association over a plain socket; `store` returns the response Status (None: no answer)."""

    def __init__(
        self, port: int, abstract_syntax: str, transfer_syntax: str = EXPLICIT_LE, timeout: float = 10
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(associate_rq(abstract_syntax, transfer_syntax))
        kind, body = self._read_pdu()
        if kind != 0x02:
            raise ConnectionError(f"association not accepted (PDU type 0x{kind:02X})")
        # The first presentation context item (0x21) carries the result at its offset 6.
        at = 68
        while at < len(body):
            item_type, _, item_len = struct.unpack(">BBH", body[at : at + 4])
            if item_type == 0x21:
                if body[at + 6] != 0:
                    raise ConnectionError(f"presentation context refused (result {body[at + 6]})")
                break
            at += 4 + item_len

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBL", self._recv_exact(6))
        return kind, self._recv_exact(length)

    def store(self, command: bytes, dataset: bytes | None, *, max_pdv: int = 16384) -> Dataset | None:
        """Send a C-STORE-RQ (command + data set fragments); the C-STORE-RSP command set, or None
        if the association ended (abort/close/timeout) without one."""
        self.sock.sendall(p_data(command, command=True))
        if dataset is not None:
            chunks = [dataset[i : i + max_pdv] for i in range(0, len(dataset), max_pdv)] or [b""]
            for i, chunk in enumerate(chunks):
                self.sock.sendall(p_data(chunk, command=False, last=i == len(chunks) - 1))
        return self.response()

    def response(self) -> Dataset | None:
        """The next C-STORE-RSP command set, or None if the association ended without one."""
        try:
            payload = b""
            while True:
                kind, body = self._read_pdu()
                if kind != 0x04:
                    return None
                at = 0
                while at < len(body):
                    (length,) = struct.unpack(">L", body[at : at + 4])
                    mch = body[at + 5]
                    payload += body[at + 6 : at + 4 + length]
                    at += 4 + length
                    if mch & 0x03 == 0x03:
                        return read_dataset(BytesIO(payload), is_implicit_VR=True, is_little_endian=True)
        except (ConnectionError, TimeoutError, OSError):
            return None

    def release(self) -> None:
        try:
            self.sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            self._read_pdu()
        except OSError:
            pass
        finally:
            self.sock.close()


def encode_dataset(ds: Dataset, *, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()
