"""C-STORE bad input over a hand-rolled SCU: every request gets a response, nothing incomplete is
acknowledged, and the node keeps serving. Cases from the adversarial run of issue 15."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from sqlmodel import Session, select

from dicom_node.models import Instance, Rejection
from tests.node.conftest import make_ct
from tests.node.raw_dimse import RawAssociation, encode_dataset, store_command


def _ct_bytes(sop: str, size: int = 8) -> bytes:
    return encode_dataset(make_ct(sop_uid=sop, size=size))


def _pixel_at(data: bytes) -> int:
    return data.index(b"\xe0\x7f\x10\x00")


def _with_pixel_length(data: bytes, length: int) -> bytes:
    i = _pixel_at(data)
    return data[: i + 8] + length.to_bytes(4, "little") + data[i + 12 :]


Case = tuple[str, Callable[[str], tuple[bytes, bytes | None]], tuple[int, ...]]

CASES: list[Case] = [
    ("valid", lambda s: (store_command(CTImageStorage, s), _ct_bytes(s)), (0x0000,)),
    ("empty data set", lambda s: (store_command(CTImageStorage, s), b""), (0xC000,)),
    ("cut in the pixel data", lambda s: (store_command(CTImageStorage, s), _ct_bytes(s)[:-10]), (0xC000,)),
    (
        "cut in an element header",
        lambda s: (store_command(CTImageStorage, s), _ct_bytes(s)[: _pixel_at(_ct_bytes(s)) + 5]),
        (0xC000,),
    ),
    (
        "cut before Pixel Data",
        lambda s: (store_command(CTImageStorage, s), _ct_bytes(s)[: _pixel_at(_ct_bytes(s))]),
        (0xA900,),
    ),
    (
        "Pixel Data length 0x7FFFFFFF",
        lambda s: (store_command(CTImageStorage, s), _with_pixel_length(_ct_bytes(s), 0x7FFFFFFF)),
        (0xC000,),
    ),
    (
        "Pixel Data length 0xFFFFFFFF",
        lambda s: (store_command(CTImageStorage, s), _with_pixel_length(_ct_bytes(s), 0xFFFFFFFF)),
        (0xC000,),
    ),
    (
        "Pixel Data shorter than its attributes",
        lambda s: (store_command(CTImageStorage, s), encode_dataset(_short_pixels(s))),
        (0xA900,),
    ),
    ("empty Affected SOP Instance UID", lambda s: (store_command(CTImageStorage, ""), _ct_bytes(s)), (0xC001, 0xA900)),
    (
        "Affected SOP Instance UID over 64",
        lambda s: (store_command(CTImageStorage, "1." + "2" * 70), _ct_bytes(s)),
        (0xC002, 0xA900),
    ),
    (
        "Affected SOP Class UID over 64",
        lambda s: (store_command("1.2.840.10008." + "5" * 60, s), _ct_bytes(s)),
        (0xC002, 0xA900, 0x0122),
    ),
    (
        "UID component with a leading zero",
        lambda s: (store_command(CTImageStorage, s), encode_dataset(make_ct(sop_uid=s, study_uid="1.02.3"))),
        (0xC002,),
    ),
    (
        "NUL in the Affected SOP Instance UID",
        lambda s: (store_command(CTImageStorage, s[:-1] + "\0"), _ct_bytes(s)),
        (0xC002, 0xA900),
    ),
]


def _short_pixels(sop: str) -> Any:
    ds = make_ct(sop_uid=sop, size=8)
    ds.PixelData = ds.PixelData[:-16]
    return ds


def _rejections(node: Any) -> list[Rejection]:
    with Session(node.engine) as s:
        return list(s.exec(select(Rejection).order_by(Rejection.id)).all())


@pytest.mark.parametrize("name,build,expected", CASES, ids=[c[0] for c in CASES])
def test_every_store_request_gets_a_status(
    name: str, build: Any, expected: tuple[int, ...], make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    sop = generate_uid()
    command, dataset = build(sop)
    assoc = RawAssociation(node.port, CTImageStorage)
    try:
        rsp = assoc.store(command, dataset)
        assert rsp is not None, f"{name}: no C-STORE response"
        assert rsp.Status in expected, f"{name}: 0x{rsp.Status:04X}"
        if rsp.Status != 0:
            assert rsp.get("ErrorComment"), name
            # The association still serves the next instance.
            good = generate_uid()
            assert assoc.store(store_command(CTImageStorage, good), _ct_bytes(good)).Status == 0
    finally:
        assoc.release()
    with Session(node.engine) as s:
        stored = {i.sop_instance_uid for i in s.exec(select(Instance)).all()}
    if expected == (0,):
        assert stored == {sop}
    else:
        assert sop not in stored
        assert _rejections(node), name


def test_seeded_fuzzer_never_acknowledges_a_broken_data_set(
    make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    """240 mutated data sets (bit flips, cuts, length fields, inserted bytes), seeded.

    Each gets a status; whatever is acknowledged must read back as a complete data set whose
    pixel data length matches its attributes; the node answers a valid store at the end.
    """
    from pydicom import dcmread

    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}"), completion=False)
    rng = random.Random(15)
    base_sop = generate_uid()
    base = _ct_bytes(base_sop, size=4)
    assoc = RawAssociation(node.port, CTImageStorage)
    answered = acked = 0
    try:
        for n in range(240):
            data = bytearray(base)
            kind = n % 5
            if kind == 0:  # flip bytes
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif kind == 1:  # cut
                del data[rng.randrange(1, len(data)) :]
            elif kind == 2:  # rewrite one 4-byte length-like field
                i = rng.randrange(0, len(data) - 4)
                data[i : i + 4] = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0, rng.randrange(1 << 16)]).to_bytes(4, "little")
            elif kind == 3:  # insert junk
                i = rng.randrange(len(data))
                data[i:i] = rng.randbytes(rng.randint(1, 9))
            else:  # 2-byte length field of a short element
                i = rng.randrange(0, len(data) - 2)
                data[i : i + 2] = rng.randrange(1 << 16).to_bytes(2, "little")
            rsp = assoc.store(store_command(CTImageStorage, base_sop, message_id=n + 1), bytes(data))
            if rsp is None:  # the association ended: allowed only with an abort, then reconnect
                assoc = RawAssociation(node.port, CTImageStorage)
                continue
            answered += 1
            if rsp.Status in (0x0000, 0xB000, 0xB007, 0xB006):
                acked += 1
    finally:
        assoc.release()
    assert answered >= 230
    root = tmp_path / "storage"
    with Session(node.engine) as s:
        for inst in s.exec(select(Instance)).all():
            ds = dcmread(root / inst.relpath)
            px = ds.get("PixelData")
            if px is not None and "PixelData" in ds:
                spp, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
                want = (ds.Rows * ds.Columns * spp * frames * ds.BitsAllocated + 7) // 8
                assert len(px) in (want, want + (want & 1)), inst.relpath
    assert acked >= 1  # the unmutated-enough ones still get stored


def test_received_values_are_escaped_in_log_lines(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from sqlmodel import SQLModel, create_engine

    from dicom_node.ingest import Peer, printable, record_rejection

    assert printable("A\x00B\nC\x1b[31m") == "A\\x00B\\x0aC\\x1b[31m"
    engine = create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    SQLModel.metadata.create_all(engine)
    caplog.set_level("WARNING", logger="dicom_node.ingest")
    record_rejection(
        engine,
        stage="store",
        reason="invalid_command",
        detail="bad\x00value\nnext line",
        peer=Peer(calling_ae="EVIL\x1b[2J", called_ae="UNIMEDVL", remote_ip="127.0.0.1"),
    )
    fields = caplog.records[-1].kv  # type: ignore[attr-defined]
    assert "\x00" not in fields["detail"] and "\n" not in fields["detail"]
    assert "\x1b" not in fields["calling_ae"]
