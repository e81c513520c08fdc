"""Configuration loading/validation and the durable object store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config
from dicom_node.storage import Storage, StorageFull
from tests.conftest import REPO

DESIGN_MINIMAL = """
[node]
ae_title = "UNIMEDVL"
host = "0.0.0.0"
port = 11112
[storage]
path = "var/storage"
[database]
url = "sqlite:///var/index.db"
[broker]
url = "sqla+sqlite:///var/broker.db"
[http]
bind = "127.0.0.1:8080"
[model]
path = "tiny"                  # or a folder holding the released checkpoint
[completion]
study_quiet_seconds = 30
[[destinations]]
name = "pacs"
kind = "dimse"
ae_title = "PACS"
host = "pacs.example.org"
port = 104
"""


def test_design_minimal_config_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "unimedvl.toml"
    cfg.parent.mkdir()
    cfg.write_text(DESIGN_MINIMAL)
    s = load_config(cfg)
    assert (s.node.ae_title, s.node.port, s.completion.study_quiet_seconds) == ("UNIMEDVL", 11112, 30)
    # Relative paths resolve against the config file's folder.
    assert s.storage.path == str(cfg.parent / "var" / "storage")
    assert s.database.url == f"sqlite:///{cfg.parent / 'var' / 'index.db'}"
    assert s.broker.url == f"sqla+sqlite:///{cfg.parent / 'var' / 'broker.db'}"
    assert s.destinations[0].name == "pacs" and s.destinations[0].port == 104
    assert (s.export.max_attempts, s.export.backoff_initial_seconds, s.export.backoff_max_seconds) == (8, 5, 600)
    assert s.node.listeners == 1 and s.node.duplicate_policy == "keep_first" and not s.node.log_phi


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_config()
    assert s.config_path is None
    assert s.storage.path == str(tmp_path / "var" / "storage")
    assert s.database.url == f"sqlite:///{tmp_path / 'var' / 'index.db'}"
    (tmp_path / "unimedvl.toml").write_text("[node]\nport = 4242\n")
    assert load_config().node.port == 4242  # ./unimedvl.toml is picked up when present


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "u.toml"
    cfg.write_text(DESIGN_MINIMAL)
    monkeypatch.setenv("UNIMEDVL_NODE__PORT", "4104")
    monkeypatch.setenv("UNIMEDVL_DATABASE__URL", "postgresql+psycopg://root@127.0.0.1/x")
    monkeypatch.setenv("UNIMEDVL_NODE__ALLOWED_CALLING_AETS", '["CT1","MR2"]')
    s = load_config(cfg)
    assert s.node.port == 4104 and s.node.ae_title == "UNIMEDVL"
    assert s.database.url == "postgresql+psycopg://root@127.0.0.1/x"
    assert s.node.allowed_calling_aets == ["CT1", "MR2"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[node]\nport = 70000\n", r"node\.port = 70000: .*less than or equal to 65535"),
        ('[node]\nduplicate_policy = "newest"\n', r"node\.duplicate_policy = 'newest': .*keep_first"),
        ('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', r"node\.ae_title = 'THIS_TITLE_IS_TOO_LONG'"),
        ('[node]\nallowed_hosts = ["10.0.0.0/8", "not-an-ip"]\n', r"node\.allowed_hosts = .*'not-an-ip'"),
        ("[node]\nprot = 104\n", r"node\.prot: unknown key"),
        ("[completion]\nstudy_quiet_seconds = -5\n", r"completion\.study_quiet_seconds = -5: .*greater than 0"),
        ('[model]\nencoders = "cuda"\n', r"model\.encoders = 'cuda'"),
        ('[[destinations]]\nname = "p"\nkind = "dimse"\n', r"destinations\.0: .*needs ae_title and host"),
        ("[node]\ntls_port = 2762\n", r"node: .*tls_port needs tls_cert and tls_key"),
        ('[http]\nbind = "8080"\n', r"http\.bind = '8080'"),
        ("[node\nport = 1\n", r"not valid TOML"),
    ],
)
def test_validation_errors_name_key_and_value(tmp_path: Path, toml: str, expected: str) -> None:
    cfg = tmp_path / "u.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert re.search(expected, str(info.value)), str(info.value)


def test_env_error_names_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIMEDVL_NODE__PORT", "eleven")
    with pytest.raises(ConfigError, match=r"node\.port = 'eleven' \(from UNIMEDVL_NODE__PORT\)"):
        load_config(None)


def test_cli_config_error_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "u.toml"
    cfg.write_text("[node]\nport = 0\n")
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "node.port = 0" in out.stderr


# -------------------------------------------------------------------------------------------- storage


def test_storage_write_is_atomic_and_named_by_uuid(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", min_free_bytes=0)
    obj = st.write([b"abc", b"def"])
    assert re.fullmatch(r"objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm", obj.relpath)
    assert obj.size == 6 and st.path(obj.relpath).read_bytes() == b"abcdef"
    import hashlib

    assert obj.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert st.write(b"x").relpath != obj.relpath


def test_storage_path_refuses_escape(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s")
    for bad in ("../outside", "/etc/passwd", "objects/../../x", "", "a\x00b", "."):
        with pytest.raises(ValueError):
            st.path(bad)
    os.symlink("/etc", tmp_path / "s" / "objects" / "link")
    with pytest.raises(ValueError):
        st.path("objects/link/passwd")


def test_storage_full_and_sweep(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", min_free_bytes=2**62)
    with pytest.raises(StorageFull):
        st.write(b"data")
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    (tmp_path / "s" / "tmp" / "leftover.tmp").write_bytes(b"partial")
    assert Storage(tmp_path / "s").sweep_temp() == 1
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_failed_write_leaves_no_temp(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s")

    def chunks():  # noqa: ANN202
        yield b"first"
        raise OSError("disk went away")

    with pytest.raises(OSError):
        st.write(chunks())
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert [p for p in (tmp_path / "s" / "objects").rglob("*") if p.is_file()] == []
