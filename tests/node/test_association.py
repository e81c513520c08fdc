"""Association access control and DICOM TLS."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.presentation import build_context
from sqlmodel import Session, select

from dicom_node.models import Rejection
from tests.conftest import free_port, require_tool
from tests.node.conftest import associate, make_ct, store


def _rejections(node: Any, expect: int = 0) -> list[Rejection]:
    """Rejection rows; waits briefly for `expect` rows (some are written as the peer is dropped)."""
    deadline = time.monotonic() + 5
    while True:
        with Session(node.engine) as s:
            rows = list(s.exec(select(Rejection).order_by(Rejection.id)).all())
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _reject_info(assoc: Any) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_calling_and_called_ae_checks(db_url: str, make_settings: Any, start_node: Any) -> None:
    settings = make_settings(db_url, node={"allowed_calling_aets": ["MODALITY1", "TESTSCU"]})
    node = start_node(settings, completion=False)

    stranger = associate(node.port, calling="STRANGER")
    assert stranger.is_rejected
    assert _reject_info(stranger) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised

    wrong_called = associate(node.port, called="SOMEONEELSE")
    assert wrong_called.is_rejected
    assert _reject_info(wrong_called) == (0x01, 0x01, 0x07)  # called AE not recognised

    assert [s.Status for s in store(node.port, [make_ct()], calling="MODALITY1")] == [0]
    rej = _rejections(node)
    assert [(r.stage, r.reason, r.calling_ae) for r in rej] == [
        ("association", "calling_ae_not_allowed", "STRANGER"),
        ("association", "called_ae_mismatch", "TESTSCU"),
    ]
    assert rej[1].called_ae == "SOMEONEELSE" and rej[0].remote_ip == "127.0.0.1"


def test_host_allow_list(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'i.db'}"
    node = start_node(make_settings(url, node={"allowed_hosts": ["10.0.0.0/8"]}), completion=False)
    assoc = associate(node.port)
    assert assoc.is_rejected and _reject_info(assoc) == (0x01, 0x01, 0x01)
    assert [r.reason for r in _rejections(node)] == ["host_not_allowed"]
    node.stop(1)
    node = start_node(make_settings(url, node={"allowed_hosts": ["10.0.0.0/8", "127.0.0.1"]}), completion=False)
    assert [s.Status for s in store(node.port, [make_ct()])] == [0]


def test_association_limit(make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    node = start_node(make_settings(f"sqlite:///{tmp_path / 'i.db'}", node={"max_associations": 1}), completion=False)
    first = associate(node.port)
    assert first.is_established
    try:
        second = associate(node.port)
        assert second.is_rejected and _reject_info(second) == (0x02, 0x03, 0x02)  # transient, local limit
    finally:
        first.release()
    assert [r.reason for r in _rejections(node, expect=1)] == ["too_many_associations"]


# ---------------------------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=Test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return {k: d / v for k, v in {
        "ca": "ca.pem", "server_cert": "server.pem", "server_key": "server.key",
        "client_cert": "client.pem", "client_key": "client.key"}.items()}  # fmt: skip


def _client_ctx(pki: dict[str, Path], *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


def _tls_node(make_settings: Any, start_node: Any, url: str, pki: dict[str, Path], **node: Any) -> Any:
    settings = make_settings(
        url,
        node={
            "tls_port": free_port(),
            "tls_cert": str(pki["server_cert"]),
            "tls_key": str(pki["server_key"]),
            "tls_ca": str(pki["ca"]),
            **node,
        },
    )
    return start_node(settings, completion=False)


def test_tls_store_and_plain_on_tls_port_rejected(
    db_url: str, pki: dict[str, Path], make_settings: Any, start_node: Any
) -> None:
    node = _tls_node(make_settings, start_node, db_url, pki)
    tls_port = node.listener.tls_port
    assert tls_port
    ds = make_ct()
    statuses = store(tls_port, [ds], tls_args=(_client_ctx(pki, with_cert=False), "127.0.0.1"))
    assert [s.Status for s in statuses] == [0]
    # Plain DICOM on the TLS port: no association.
    plain = associate(tls_port)
    assert not plain.is_established
    # The plain port still works next to it.
    assert [s.Status for s in store(node.port, [make_ct()])] == [0]
    reasons = [r.reason for r in _rejections(node, expect=1)]
    assert reasons == ["tls_handshake"]


def test_tls_client_certificate_required(
    pki: dict[str, Path], make_settings: Any, start_node: Any, tmp_path: Path
) -> None:
    node = _tls_node(make_settings, start_node, f"sqlite:///{tmp_path / 'i.db'}", pki, tls_require_client_cert=True)
    tls_port = node.listener.tls_port
    anonymous = associate(
        tls_port,
        tls_args=(_client_ctx(pki, with_cert=False), "127.0.0.1"),
        contexts=[build_context("1.2.840.10008.1.1")],
    )
    assert not anonymous.is_established
    assert [
        s.Status for s in store(tls_port, [make_ct()], tls_args=(_client_ctx(pki, with_cert=True), "127.0.0.1"))
    ] == [0]


@pytest.mark.dcmtk
def test_echoscu_over_tls(pki: dict[str, Path], make_settings: Any, start_node: Any, tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    node = _tls_node(make_settings, start_node, f"sqlite:///{tmp_path / 'i.db'}", pki)
    out = subprocess.run(
        [echoscu, "-aec", "UNIMEDVL", "+tls", str(pki["client_key"]), str(pki["client_cert"]),
         "+cf", str(pki["ca"]), "127.0.0.1", str(node.listener.tls_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
