"""DICOM TLS to Orthanc (mutual TLS, certificates made with openssl for the test)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session, select

from dicom_node.export import DONE, PENDING, Exporter, OutboxRow, enqueue
from tests.conftest import require_tool
from tests.export.conftest import dimse_destination
from tests.export.objects import ct_slices

pytestmark = pytest.mark.orthanc


def _ca(d: Path, name: str) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key", "-out",
         d / f"{name}.pem", "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    subprocess.run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
         "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key",
         "-CAcreateserial", "-out", d / f"{name}.pem", "-days", "2", "-extfile", ext],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    require_tool("openssl")
    d = tmp_path / "pki"
    d.mkdir()
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca")
    _leaf(d, "client", "ca")
    return d


def test_dimse_over_mutual_tls(sqlite_engine, storage, orthanc_factory, make_settings, pki: Path, tmp_path) -> None:
    orthanc = orthanc_factory(
        dicomweb=False,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki / "server.pem"),
            "DicomTlsPrivateKey": str(pki / "server.key"),
            "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    client = {"tls": True, "tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "client.key")}
    good = dimse_destination(orthanc, name="tls", tls_ca=str(pki / "ca.pem"), **client)
    # Same PACS, but we do not trust its certificate: must not send, must say why.
    untrusted = dimse_destination(orthanc, name="untrusted", tls_ca=str(pki / "other-ca.pem"), **client)
    settings = make_settings(sqlite_engine, [good, untrusted])
    ct = ct_slices(tmp_path / "ct", 2)
    enqueue(sqlite_engine, storage, ct[0], ["tls"])
    enqueue(sqlite_engine, storage, ct[1], ["untrusted"])

    result = Exporter(settings, sqlite_engine, storage).run_once()

    assert result.sent == {"tls": 1} and result.retried == {"untrusted": 1}
    with Session(sqlite_engine) as s:
        rows = {r.destination: r for r in s.exec(select(OutboxRow))}
    assert rows["tls"].state == DONE
    assert rows["untrusted"].state == PENDING
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in rows["untrusted"].last_error
    assert orthanc.instance_uids() == [str(ct[0].SOPInstanceUID)]
