"""`make gpu-check` at tiny shapes on CPU (--smoke): every part runs and reports, so a GPU run only
has to measure. Slow tier (several training processes)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    if not (ROOT / "data" / "demo" / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "prepare-demo-data", "--out", "data/demo"],
                       cwd=ROOT, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "parts with errors: none" in res.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["variant"]: r for r in report["throughput"]["0.5b"]["rows"]}
    assert rows["SDPA"]["tokens_per_s"] > 0 and rows["local attention"]["tokens_per_s"] > 0
    assert "not installed" in rows["TE"]["skipped"]
    assert report["parity"]["max_rel_diff"] < 1e-5  # fp32 on CPU: the same losses
    assert report["packed"]["max_abs_loss_diff"] < 1e-5
    assert report["verify"]["skipped"] == "no CUDA device"
    assert all(r["exact"] for r in report["speculative"]["eager"]["rows"])
    assert (tmp_path / "gpu_check.png").stat().st_size > 10_000
