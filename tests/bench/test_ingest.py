"""The ingest benchmark: its verification and target logic, and a smoke run of all three legs."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks import ingest
from benchmarks.ingest import NodeProcess, Report, Run, checks, exit_code, node_config, to_json
from benchmarks.peers import PeerError, StoreSCP
from dicom_node.synthetic import make_ct_series


def _run(target: str, assoc: int, seconds: float, *, verified: bool = True, n: int = 100) -> Run:
    return Run(target, assoc, 0, seconds, n, n * 525_000, n if verified else n - 1, verified, 0)


def _report(node1: float, node8: float, n: int = 100) -> Report:
    r = Report(n=n, repeats=1, listeners=None)
    r.runs = [
        _run("storescp", 1, 1.0, n=n),
        _run("orthanc", 1, 2.0, n=n),
        _run("storescp", 8, 1.0, n=n),
        _run("orthanc", 8, 1.5, n=n),
        _run("node", 1, node1, n=n),
        _run("node", 8, node8, n=n),
    ]
    return r


def test_checks_and_exit_codes():
    # checks: 8 assocs >= 1.0x 1 assoc; 1 assoc >= 1.5x Orthanc; 8 assocs >= 1.5x Orthanc
    good = _report(node1=1.2, node8=0.9)  # 1.33x, 1.67x, 1.67x
    assert [c["met"] for c in checks(good)] == [True, True, True]
    assert exit_code(good) == 0
    slow = _report(node1=1.9, node8=0.9)  # 1 association only 1.05x Orthanc
    assert [c["met"] for c in checks(slow)] == [True, False, True]
    assert exit_code(slow) == 2
    worse_on_8 = _report(node1=0.8, node8=0.9)  # 8 associations slower than 1
    assert [c["met"] for c in checks(worse_on_8)] == [False, True, True]


def test_best_of_repeats_and_unverified_runs_are_excluded():
    r = _report(node1=1.2, node8=1.4)
    r.runs.append(_run("node", 1, 0.1, verified=False))  # fast but lost an instance: never the "best"
    r.runs.append(Run("node", 1, 1, 1.1, 100, 1, 100, True, 0))
    assert r.best("node", 1).seconds == 1.1
    assert exit_code(r) == 1  # any unverified run fails the benchmark


def test_thousand_slice_target_only_from_1000_slices():
    assert all("1,000" not in c["name"] for c in checks(_report(1.2, 1.4, n=999)))
    fast = checks(_report(node1=3.5, node8=3.0, n=1000))[-1]
    assert fast["name"].startswith("1,000-slice") and fast["met"] and fast["value"] == pytest.approx(3.5)
    slow = checks(_report(node1=9.0, node8=8.0, n=2000))[-1]
    assert slow["value"] == pytest.approx(4.5) and not slow["met"]


def test_json_has_best_figures_and_ratios_inputs():
    doc = to_json(_report(node1=1.25, node8=1.4))
    assert doc["best"]["node/1"]["instances_per_s"] == pytest.approx(80.0)
    assert doc["best"]["orthanc/8"]["seconds"] == 1.5
    assert len(doc["runs"]) == 6 and doc["checks"][1]["value"] == pytest.approx(1.6)
    json.dumps(doc)


def test_node_config_is_valid_toml_with_the_design_keys(tmp_path: Path):
    cfg = tomllib.loads(node_config(tmp_path, 4242, listeners=2))
    assert cfg["node"] == {"ae_title": "UNIMEDVL", "host": "127.0.0.1", "port": 4242, "listeners": 2}
    assert cfg["storage"]["path"] == str(tmp_path / "storage")
    assert cfg["database"]["url"] == f"sqlite:///{tmp_path / 'index.db'}"
    assert "listeners" not in tomllib.loads(node_config(tmp_path, 4242))["node"]


@pytest.mark.dcmtk
def test_node_that_dies_at_start_up_is_reported(tmp_path: Path):
    node = NodeProcess(tmp_path / "n", wrap=["false"], startup_timeout=10)
    with pytest.raises(PeerError, match="exited with 1 before answering C-ECHO"):
        node.start()


@pytest.mark.dcmtk
def test_lost_instances_fail_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A target that acknowledges but does not store (storescp --ignore) must not pass as fast."""

    @contextmanager
    def lossy(name: str, workdir: Path, **_: object) -> Iterator[ingest.Target]:
        with StoreSCP(workdir, extra_args=["--ignore"]) as scp:
            yield ingest.Target(scp.host, scp.port, scp.aet, lambda: len(scp.received_files()))

    monkeypatch.setattr(ingest, "_target", lossy)
    files = make_ct_series(tmp_path / "ct", 3, rows=32, cols=32)
    warm = make_ct_series(tmp_path / "w", 1, rows=32, cols=32)[0]
    run = ingest.run_once("storescp", 1, files, warm, tmp_path / "t", settle_timeout=1.0)
    assert not run.verified and run.rc == 0
    assert run.received == 0 and run.note == "received 0 of 3"


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.orthanc
@pytest.mark.timeout(120)
def test_smoke_run_all_three_legs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "ingest.json"
    rc = ingest.main(n=5, out=str(out), repeats=1, workdir=str(tmp_path / "w"))
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["errors"] == [], doc["errors"]
    assert rc in (0, 2)  # with 5 slices the ratios are noise; the legs and the verification are what count
    assert sorted(doc["best"]) == sorted(f"{t}/{a}" for t in ("node", "storescp", "orthanc") for a in (1, 8))
    assert all(r["verified"] and r["received"] == 5 for r in doc["runs"])
    assert "C-STORE ingest, 5 CT slices" in printed and "vs Orthanc" in printed


@pytest.mark.dcmtk
@pytest.mark.timeout(120)
def test_floor_leg_stores_through_the_node_handler(tmp_path: Path):
    """The floor leg (benchmarks/acceptor_floor.py) stores and indexes like the node: every file
    it acknowledged is in storage with its index row, and its per-instance split is read."""
    files = make_ct_series(tmp_path / "ct", 4, rows=32, cols=32)
    warm = make_ct_series(tmp_path / "w", 1, rows=32, cols=32, patient_id="W")[0]
    for assoc in (1, 2):
        run = ingest.run_once("floor", assoc, files, warm, tmp_path / f"floor{assoc}", settle_timeout=5.0)
        assert run.verified and run.received == 4, run.note
        assert set(run.split) == {"transport_ms", "handler_ms", "write_ms", "fsync_ms", "index_ms"}
