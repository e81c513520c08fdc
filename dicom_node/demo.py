"""`unimedvl demo`: send a synthetic study to a running gateway and show what came of it.

It writes a small CT volume with a phantom lesion and a chest CR (one study, one synthetic
patient), sends both over DICOM like a modality would, then follows the study's timeline in
the status API until every job has finished and every output is delivered (or failed), and
prints the objects produced. The series descriptions start with "UNIMEDVL DEMO", which the
shipped `demo` routing rule matches to run every output type (SR, SEG + TID 1500, SC).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pynetdicom import AE, StoragePresentationContexts
from rich.console import Console
from rich.table import Table

from dicom_node.config import Settings
from dicom_node.routing import DEMO_SERIES_PREFIX

TERMINAL_JOB = {"done", "failed"}
TERMINAL_DELIVERY = {"done", "failed", "superseded"}


def make_demo_study(folder: Path, *, ct_slices: int = 12) -> tuple[str, list[Path]]:
    """A CT volume with a lesion and a chest CR in one study; returns (StudyInstanceUID, files)."""
    from dicom_node.synthetic import make_cr, make_ct_series, new_uid

    study_uid = new_uid()
    files = make_ct_series(folder / "ct", ct_slices, 128, 128, study_uid=study_uid, patient_id="DEMO^0001")
    files.append(make_cr(folder / "cr", 256, 256, study_uid=study_uid, patient_id="DEMO^0001"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = f"{DEMO_SERIES_PREFIX} {ds.Modality}"
        ds.save_as(f)
    return study_uid, files


def send(files: list[Path], host: str, port: int, called_ae: str, calling_ae: str = "UNIMEDVL-DEMO") -> int:
    """C-STORE every file over one association; returns how many got a success status."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at {host}:{port} ({called_ae}) did not accept the association")
    ok = 0
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            ok += int(getattr(status, "Status", -1) == 0x0000)
    finally:
        assoc.release()
    return ok


def _finished(timeline: dict[str, Any]) -> bool:
    revisions = timeline.get("revisions") or []
    if not revisions or revisions[-1].get("state") != "complete" or not revisions[-1].get("planned_at"):
        return False
    jobs = [j for r in revisions for j in r.get("jobs", [])]
    return all(
        j["state"] in TERMINAL_JOB and all(d["state"] in TERMINAL_DELIVERY for d in j["deliveries"]) for j in jobs
    )


def follow(api: str, study_uid: str, timeout: float, console: Console) -> dict[str, Any] | None:
    """Poll the study's timeline until it is finished; None on timeout."""
    deadline = time.monotonic() + timeout
    last = ""
    timeline: dict[str, Any] | None = None
    with httpx.Client(base_url=api, timeout=10) as client:
        while time.monotonic() < deadline:
            r = client.get(f"/api/studies/{study_uid}/timeline")
            if r.status_code == 200:
                timeline = r.json()
                revs = timeline.get("revisions") or []
                jobs = [j for rv in revs for j in rv.get("jobs", [])]
                state = f"{revs[-1].get('state') if revs else 'receiving'}; jobs " + ", ".join(
                    f"{j['kind']}={j['state']}" for j in jobs
                )
                if state != last:
                    console.print(f"  {state}")
                    last = state
                if _finished(timeline):
                    return timeline
            time.sleep(1.0)
    return None


def print_outputs(timeline: dict[str, Any], console: Console) -> int:
    table = Table(title="Jobs and outputs")
    for c in ("job", "kind", "state", "outputs", "deliveries", "error"):
        table.add_column(c)
    failed = 0
    for rev in timeline.get("revisions", []):
        for j in rev.get("jobs", []):
            failed += j["state"] == "failed"
            deliveries = ", ".join(f"{d['destination']}:{d['state']}" for d in j["deliveries"]) or "-"
            table.add_row(str(j["id"]), j["kind"], j["state"], str(j["outputs"]), deliveries, j.get("error") or "")
    console.print(table)
    return failed


def unrequested_outputs(settings: Settings) -> list[str]:
    """What the shipped demo rules would produce for the demo study that the configured
    `[[rules]]` do not ask for (custom rules replace the shipped ones, demo rules included).

    One line per missing task kind and series, e.g. "segment on the demo CT"; empty when the
    configured rules ask for everything the shipped ones do."""
    from dicom_node.routing import SeriesInfo, parse_rules, plan_study

    series = [
        SeriesInfo(f"demo-{m}", modality=m, series_description=f"{DEMO_SERIES_PREFIX} {m}", calling_ae="UNIMEDVL-DEMO")
        for m in ("CT", "CR")
    ]

    def asked(rules: Any) -> set[tuple[str, str]]:
        return {(t.task.kind, uid) for t in plan_study(parse_rules(rules), series).tasks for uid in t.series}

    missing = asked(None) - asked(settings.rules)
    order = {k: i for i, k in enumerate(("report", "vqa", "segment", "translate", "super_resolve", "synthesize"))}
    return [
        f"{kind} on the demo {uid.removeprefix('demo-')}"
        for kind, uid in sorted(missing, key=lambda m: (m[1], order.get(m[0], 99)))
    ]


def _say_unrequested(settings: Settings, console: Console) -> None:
    missing = unrequested_outputs(settings)
    if missing:
        console.print(
            "[yellow]no routing rule asks for: "
            + "; ".join(missing)
            + ". The configured [[rules]] replace the shipped ones (demo rules included): copy the demo-ct and"
            " demo-cr rules from dicom_node/routing.py into the config to get them.[/]"
        )


def run_demo(settings: Settings, *, timeout: float = 900.0, keep: Path | None = None) -> int:
    console = Console()
    _say_unrequested(settings, console)
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host
    api_host = "127.0.0.1" if settings.http.host in ("0.0.0.0", "::", "") else settings.http.host
    api = f"http://{api_host}:{settings.http.port}"
    with tempfile.TemporaryDirectory(prefix="unimedvl-demo-") as tmp:
        folder = keep or Path(tmp)
        study_uid, files = make_demo_study(folder)
        console.print(f"demo study {study_uid}: {len(files)} instances (CT volume with a lesion, chest CR)")
        sent = send(files, host, settings.node.port, settings.node.ae_title)
        console.print(f"sent {sent}/{len(files)} instances to {settings.node.ae_title}@{host}:{settings.node.port}")
        if sent != len(files):
            return 1
    console.print(
        f"waiting for completion ({settings.completion.study_quiet_seconds:g} s quiet period), jobs and delivery"
    )
    timeline = follow(api, study_uid, timeout, console)
    if timeline is None:
        console.print(f"[red]timed out after {timeout:g} s; see `unimedvl timeline {study_uid}`[/]")
        return 1
    failed = print_outputs(timeline, console)
    _say_unrequested(settings, console)  # again under the table, where the shortfall shows
    return 1 if failed else 0
