"""`unimedvl batch` over a folder archive on the embedded defaults: de-identified report + VQA,
outputs by pseudonymous patient/study/series, the results table, and the same command again
redoing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from pydicom import dcmread

from tests.batch.conftest import FAST_TASKS, identifying_values, run_cli
from tests.conftest import require_tool
from tests.jobs.conftest import write_config


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm"))


def test_folder_batch_deidentified_and_rerun_redoes_nothing(tmp_path: Path, archive) -> None:
    root, studies = archive
    (root / "DICOMDIR").write_bytes(b"not parsed: the DICOMDIR's folder is walked")
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    out = tmp_path / "out"
    key = tmp_path / "private" / "mapping.csv"
    args = ["batch", str(root / "DICOMDIR"), "--out", str(out), *FAST_TASKS, "--deidentify", "--json-progress"]
    args += ["--mapping-key", str(key), "-c", str(cfg)]
    r = run_cli(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    final = json.loads([line for line in r.stdout.splitlines() if '"finished"' in line and "{" in line][-1])
    assert final["total"] == len(studies) == 4
    # The US study is refused (burned-in annotation possible), with its reason.
    assert final["counts"]["done"] == 3 and final["counts"]["skipped"] == 1, final

    table = pq.read_table(out / "results.parquet").to_pylist()
    csv_text = (out / "results.csv").read_text()
    done = [row for row in table if row["state"] == "done"]
    assert sorted({(row["task"]) for row in done}) == ["report", "vqa"]
    assert len(done) == 6  # 3 studies x (report, vqa), one series each
    skipped = [row for row in table if row["state"] == "skipped"]
    assert len(skipped) == 1 and "burned-in" in skipped[0]["reason"]
    for row in done:
        assert row["model_name"] and row["checkpoint_sha256"] and row["model_seconds"] is not None
        paths = json.loads(row["output_paths"])
        assert len(paths) == 1 and (out / paths[0]).is_file()
        ds = dcmread(out / paths[0])
        assert ds.SOPInstanceUID == json.loads(row["output_sop_instance_uids"])[0]
        assert ds.StudyInstanceUID == row["study_instance_uid"] and ds.PatientIdentityRemoved == "YES"
        if row["task"] == "vqa":
            assert json.loads(row["questions"]) == ["Is there a nodule?"]
    # Every identifying value of every input is absent from every output object and the table.
    inputs = [p for ps in studies.values() for p in ps]
    secrets = identifying_values(inputs)
    files = _outputs(out)
    assert len(files) == 6
    for f in [*files, out / "results.csv", out / "results.parquet"]:
        data = f.read_bytes()
        leaked = [v for v in secrets if v.encode() in data]
        assert not leaked, (f.name, leaked)
    assert not [v for v in secrets if v in csv_text]
    # Layout: generated names; the two CR studies of one patient share one pseudonymous patient folder.
    patients = {p.relative_to(out).parts[0] for p in files}
    assert len(patients) == 2 and all(p.startswith("P") and len(p) == 17 for p in patients)
    # The mapping key exists only because it was asked for, outside DIR.
    mapping = key.read_text()
    assert "MRN-4711-JD" in mapping and not list(out.rglob("*mapping*"))

    # Validity of a de-identified output (dciodvfy, allow-listed errors only).
    require_tool("dciodvfy")
    from tests.sr.validators import unexpected_dciodvfy, unexpected_dsrdump

    for f in files[:2]:
        # Warnings about emptied dates (the profile's Z action) are expected; no Error line is.
        assert [x for x in unexpected_dciodvfy(f) if x.startswith("Error")] == [], f
        assert [x for x in unexpected_dsrdump(f) if not x.startswith("W:")] == [], f

    # Same command again: resumes the finished batch, redoes nothing, writes nothing twice.
    before = {p: p.stat().st_mtime_ns for p in files}
    r2 = run_cli(args)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in _outputs(out)} == before
    assert len(pq.read_table(out / "results.parquet")) == len(table)

    st = run_cli(["batch", "status", "-c", str(cfg)])
    assert st.returncode == 0 and "skipped" in st.stdout, st.stdout + st.stderr


def test_batch_bad_input_is_one_sentence(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    cases = [
        (["batch", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "SOURCE must be"),
        (["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--task", "dance"], "--task 'dance'"),
        (["batch", "dimse://PACS@127.0.0.1:1", "--out", str(tmp_path / "o"), "--query", "NotAKeyword=1"], "--query"),
        (["batch", "--resume", "999", "-c", str(cfg)], "there is no batch 999"),
        (["batch", str(tmp_path / "uids.txt"), "--out", str(tmp_path / "o")], "needs --fetch-from"),
    ]
    (tmp_path / "uids.txt").write_text("1.2.3\n")
    for args, expected in cases:
        r = run_cli([*args, "-c", str(cfg)] if "-c" not in args else args, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
