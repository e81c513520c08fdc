"""The engine benchmark runs end to end on CPU at the tiny size and writes its figures."""

from __future__ import annotations

import json

from benchmarks.engine import main


def test_engine_bench_tiny_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "engine.json"
    rc = main(out=str(out), device="cpu", sizes=["tiny"], repeats=1, quick=True, cache_dir=str(tmp_path / "cache"))
    assert rc == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["size"] == "tiny"
    assert run["errors"] == []
    llm = {r["measure"]: r for r in run["llm"]["rows"]}
    for measure in ("prefill (text)", "prefill (image + text)", "decode (1 stream)", "denoising"):
        assert llm[measure]["value"] > 0, measure
    rows = run["vision"]["rows"]
    assert {r["component"] for r in rows} == {"vit+connector", "vae encode", "vae decode"}
    for r in rows:
        assert r["torch_s"] > 0 and r["onnx_s"] > 0 and r["onnx_speedup"] > 0
        assert r["onnx_rel_err"] < 1e-4, r  # the ONNX graphs compute the same thing
    assert run["providers"]["onnx"]["vit"] == "CPUExecutionProvider"
    assert any(p.suffix == ".onnx" for p in (tmp_path / "cache").rglob("*"))
    printed = capsys.readouterr().out
    assert "Vision encoders" in printed and "torch/onnx" in printed and "decode (1 stream)" in printed


def test_engine_bench_rejects_bad_options(capsys) -> None:
    assert main(device="cpu", sizes=["huge"]) == 2
    assert main(device="cpu", dtype="int4") == 2
    assert "unknown" in capsys.readouterr().err
