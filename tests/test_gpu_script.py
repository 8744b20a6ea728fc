"""benchmarks/gpu.py, the one command for a GPU, runs every section at toy size on the CPU (--cpu-smoke), so that the
script a short GPU slot depends on cannot rot: its report names each section, every kernel check passes, the train
step runs for every backbone (fp32 adapters in the checkpoint) and nothing is skipped."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_cpu_smoke(tmp_path):
    out = tmp_path / "report"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("kernels", "train", "memory", "bench", "blocks"):
        assert f"## {section}: " in report and (out / f"{section}.jsonl").is_file(), section
    assert "skipped" not in report and "FAIL" not in report
    rows = lambda name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows("kernels")) == 36 and {r["result"] for r in rows("kernels")} == {"PASS"}
    steps = rows("train")
    assert {r["backbone"] for r in steps} == {"sd35", "flux-kontext", "ltx2"}
    assert {r["kernels"] for r in steps if r["backbone"] == "sd35"} == {"torch", "triton"}
    assert all(r["adapters"] == "float32" and r["loss"] == r["loss"] and r["gnorm"] > 0 for r in steps)
    sd35 = {r["kernels"]: r for r in steps if r["backbone"] == "sd35"}
    assert abs(sd35["torch"]["loss"] - sd35["triton"]["loss"]) <= 0.01 * abs(sd35["torch"]["loss"])
    assert {r["phase"] for r in rows("memory")} >= {"rollout", "update", "decode", "in", "out (frozen: no copy)"}
    assert any(r["impl"] == "compile" for r in rows("blocks"))
    assert '{"compile": 0}' in report  # no graph break in the compiled block


def test_gpu_script_keeps_going_and_keeps_other_files(tmp_path, monkeypatch):
    # a section that breaks on the GPU (out of memory, a compile error) is reported FAILED and the next one runs; the
    # exit code says so; --out may hold other files: only the report's own are replaced
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_script", os.path.join(ROOT, "benchmarks", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "report"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "notes.jsonl").write_text("{}")

    def broken(*a):
        raise RuntimeError("CUDA out of memory (as a GPU could say)")

    monkeypatch.setattr(gpu, "memory_plan", broken)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--cpu-smoke", "--sections", "memory,kernels", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        gpu.main()
    assert e.value.code == 1
    report = (out / "report.md").read_text()
    assert "## memory: FAILED" in report and "CUDA out of memory" in report and "36 of 36 PASS" in report
    assert (out / "README.md").read_text() == "mine" and (out / "notes.jsonl").exists()
