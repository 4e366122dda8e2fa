"""`make gpu-check` at tiny shapes on CPU (--smoke): every part runs, reports and holds its figures to
their bounds, so a GPU run only has to measure; and each planted bug (non-causal attention, a missing or
off-by-one document mask, a wrong verify op, a lossy decoder) makes the check fail naming its part."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, job_env


@pytest.fixture(scope="module")
def demo_data():
    if not (ROOT / "data" / "demo" / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "prepare-demo-data", "--out", "data/demo"],
                       cwd=ROOT, check=True, capture_output=True)


def gpu_check(out, *args):
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500, env=job_env())


def planted_bug_fails(out, part, *args, plant=None):
    """The check with a bug planted in `part` fails, naming that part only."""
    res = gpu_check(out, "--parts", "env", part, "--plant", plant or part, *args)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"gpu-check FAILED: {part}" in res.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["wrong"][part] and not report["parts"]["env"]["wrong"]
    assert report["provenance"]["commit"] and "--plant" in report["provenance"]["command"]
    return report


def test_a_planted_bug_fails_the_check_naming_the_part(demo_data, tmp_path):
    planted_bug_fails(tmp_path, "verify")  # a lossy decoder: in the smoke test (it reuses that run's trained pair)


@pytest.mark.slow
@pytest.mark.parametrize("plant,part", [("parity", "parity"), ("packed", "packed"), ("packed-boundary", "packed")])
def test_a_planted_masking_bug_fails_the_check(demo_data, tmp_path, plant, part):
    """Non-causal SDPA, FlexAttention without its document mask, and a mask that lets each example's first
    token see the token before it: each changes losses the probe says must not change."""
    report = planted_bug_fails(tmp_path, part, plant=plant)
    probe = report["parts"][part]["causal_probe" if part == "parity" else "packed_probe"]
    leaky = [r for r in probe["rows"] if r["leaks"]]
    assert [r["path"] for r in leaky] == (["sdpa"] if part == "parity" else ["flex"])
    assert all(not r["leaks"] for r in probe["rows"] if r not in leaky)  # the paths not planted stay clean


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(demo_data, tmp_path):
    res = gpu_check(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu-check passed" in res.stdout
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["env", "parity", "packed", "cp", "verify", "speculative", "throughput"]
    rows = {r["variant"]: r for r in parts["throughput"]["0.5b"]["rows"]}
    assert rows["SDPA"]["tokens_per_s"] > 0 and rows["local attention"]["tokens_per_s"] > 0
    assert "not installed" in rows["TE"]["skipped"]
    assert parts["parity"]["max_rel_diff"] < 1e-5  # fp32 on CPU: the same losses
    assert parts["packed"]["max_abs_loss_diff"] < 1e-5
    assert len(parts["cp"]["cp2"]) == 3 and parts["cp"]["max_rel_diff"] < 1e-5  # CP 2 = CP 1 from the same seed
    for part, key, paths in (("parity", "causal_probe", ["megatron_local", "sdpa"]), ("packed", "packed_probe", ["dense_mask", "flex"])):
        rows = parts[part][key]["rows"]
        assert [r["path"] for r in rows] == paths and all(not r["leaks"] and r["reach"] > 0.9 for r in rows)
    assert parts["packed"]["packed_probe"]["rows"][0]["grad_rel_diff"] < 1e-4  # packed = one by one, gradients too
    assert all(r["same_output"] for r in parts["verify"]["rows"])  # the C++ op on CPU
    assert all(r["exact"] for r in parts["speculative"]["eager"]["rows"])
    assert (tmp_path / "gpu_check.png").stat().st_size > 10_000
    # a lossy speculative decoder planted: the same pair decodes, and the check fails naming the part
    report = planted_bug_fails(tmp_path, "speculative", "--reuse-pair")
    assert all(report["parts"]["speculative"][w].get("reused") for w in ("train_target", "train_draft"))
