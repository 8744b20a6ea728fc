"""benchmarks/gpu.py, the one command for a GPU, runs every section at toy size on the CPU (--cpu-smoke), so that the
script a short GPU slot depends on cannot rot: its report names each section, every kernel check passes, the train
step runs for every backbone (fp32 adapters in the checkpoint) and nothing is skipped."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_cpu_smoke(tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--cpu-smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
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
    assert {r["phase"] for r in rows("memory")} >= {"rollout", "update", "decode"}
    assert any(r["impl"] == "compile" for r in rows("blocks"))
    assert '{"compile": 0}' in report  # no graph break in the compiled block
