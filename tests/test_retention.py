"""The general-ability gate (train.retention) on a real forgetting run: a model pre-trained on general
text, then trained on domain text only, loses general ability while its domain loss falls. warn logs it,
stop saves and ends the run (exit 3, saying so), keep_best publishes the best domain step above the bound."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, job_env
from test_cpt import write_config


def _cfg(cpt_data, out, init=None, train_on=("general",), **retention):
    path = write_config(cpt_data, out, steps=24, eval_interval=4, save_interval=0, keep_last=1,
                        **({"retention": retention} if retention else {}))
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["train"] = [{"path": str(cpt_data / f"{n}.train"), "weight": 1.0} for n in train_on]
    cfg["optim"]["lr"] = 1e-2 if init else 3e-3
    if init:
        cfg["model"]["init_checkpoint"] = str(init)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def _soaes(*args):
    return subprocess.run([sys.executable, "-m", "megatron_soaes.cli", *map(str, args)], env=job_env(), cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def forgetting(cpt_data, tmp_path_factory):
    """A general-pretrained start, and the domain-only run from it with the gate warning at every evaluation."""
    d = tmp_path_factory.mktemp("retention")
    res = _soaes("train", "--config", _cfg(cpt_data, d / "general"))
    assert res.returncode == 0, res.stderr[-3000:]
    start = d / "general" / "checkpoints" / "iter_0000024"
    res = _soaes("train", "--config", _cfg(cpt_data, d / "warn", start, ("domain",), min_ratio=1.0, action="warn"))
    assert res.returncode == 0, res.stderr[-3000:]
    gate = json.loads((d / "warn" / "retention.json").read_text())
    return {"dir": d, "start": start, "gate": gate, "log": res.stdout + res.stderr}


def test_warn_measures_forgetting_against_the_phase_start(forgetting):
    h = forgetting["gate"]["history"]
    assert [r["step"] for r in h] == [4, 8, 12, 16, 20, 24]
    assert h[-1]["ratio"] < 0.95, h  # general ability fell ...
    assert h[-1]["select_loss"] < h[0]["select_loss"]  # ... while the domain loss fell
    assert "WARNING: below the bound" in forgetting["log"] and "published" not in forgetting["gate"]


def test_stop_saves_and_ends_the_run_saying_so(cpt_data, forgetting):
    h = forgetting["gate"]["history"]
    bound = (h[0]["ratio"] + h[-1]["ratio"]) / 2
    first_below = next(r["step"] for r in h if r["ratio"] < bound)
    out = forgetting["dir"] / "stop"
    res = _soaes("train", "--config", _cfg(cpt_data, out, forgetting["start"], ("domain",), min_ratio=bound, action="stop"))
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"retention {h[[r['step'] for r in h].index(first_below)]['ratio']:.4f} < train.retention.min_ratio" in res.stderr
    assert (out / "checkpoints" / f"iter_{first_below:07d}").is_dir()
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert max(steps) == first_below < 24


def test_keep_best_publishes_the_best_domain_step_above_the_bound(cpt_data, forgetting):
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.manifest import verify

    h = forgetting["gate"]["history"]
    bound = (h[0]["ratio"] + h[-1]["ratio"]) / 2
    ok = [r for r in h if r["ratio"] >= bound]
    want = min(ok, key=lambda r: r["select_loss"])["step"]
    out = forgetting["dir"] / "best"
    res = _soaes("train", "--config", _cfg(cpt_data, out, forgetting["start"], ("domain",), min_ratio=bound,
                                           action="keep_best", select="domain"))
    assert res.returncode == 0, res.stderr[-3000:]
    gate = json.loads((out / "retention.json").read_text())
    assert [r["ratio"] for r in gate["history"]] == [r["ratio"] for r in h]  # the same run as the warn one
    assert gate["best"]["step"] == want < 24 and gate["best"]["ratio"] >= bound
    published = resolve_checkpoint(out)
    assert published == out / "best" / f"iter_{want:07d}" and verify(published)
    assert resolve_checkpoint(out / "checkpoints").name == "iter_0000024"  # the last step is still there, not published
