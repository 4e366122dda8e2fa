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
    # next-token accuracy is measured beside perplexity, against the same start
    g = forgetting["gate"]
    assert 0 < g["base_accuracy"] < 1 and all(0 <= r["accuracy"] <= 1 for r in h)
    assert all(r["accuracy_ratio"] == pytest.approx(r["accuracy"] / g["base_accuracy"]) for r in h)
    assert h[-1]["accuracy_ratio"] <= 1, h  # (a model this small predicts its most frequent tokens: accuracy barely moves)
    metrics = [json.loads(x) for x in open(forgetting["dir"] / "warn" / "metrics.jsonl") if '"eval"' in x]
    assert all(0 < m["eval"]["general/accuracy"] < 1 for m in metrics)


def test_the_bound_applies_to_the_chosen_metric():
    from megatron_soaes.training.retention import RetentionGate

    ppl, acc = RetentionGate(0.9, "stop", 2.0, base_accuracy=0.5), RetentionGate(0.9, "stop", 2.0, base_accuracy=0.5,
                                                                                   metric="accuracy")
    # perplexity kept (loss lower), accuracy down to 0.4 / 0.5 = 0.8
    assert ppl.judge(4, 1.9, 0.4, None)["decision"] == "ok"
    rec = acc.judge(4, 1.9, 0.4, None)
    assert rec["decision"] == "stop" and rec["ratio"] == pytest.approx(0.8) and rec["ppl_ratio"] > 1


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
    # a rerun (a requeue, a pipeline rerun) resumes the stopped checkpoint and stops again, training nothing
    again = _soaes("train", "--config", out.parent / f"{out.name}.yaml")
    assert again.returncode == 3 and "retention gate" in again.stderr
    assert max(json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x) == first_below


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


def _source_counts(out) -> dict[int, list[int]]:
    """Cumulative sequences per source after each step (metrics' source_tokens / seq_length)."""
    recs = {}
    for line in open(out / "metrics.jsonl"):
        r = json.loads(line)
        if "source_tokens" in r:
            recs[r["step"]] = {int(k): v // 64 for k, v in r["source_tokens"].items()}
    return recs


def test_replay_schedule_follows_its_curve_and_resumes_exactly_after_kill(cpt_data, tmp_path):
    """Replay share 0.5 -> 0 linearly over 24 steps of 8 sequences: the early batches are half general text,
    the late ones domain only; a run SIGKILLed at step 13 resumes from step 8 with the same losses and the
    same per-source counts."""
    import os

    from test_cpt import losses

    def cfg(out):
        path = write_config(cpt_data, out, save_interval=8)
        c = yaml.safe_load(path.read_text())
        c["data"]["train"] = [{"path": str(cpt_data / "domain.train"), "weight": 1.0, "name": "domain"},
                              {"path": str(cpt_data / "general.train"), "weight": 1.0, "name": "general"}]
        c["data"]["replay_schedule"] = {"source": "general", "start": 0.5, "end": 0.0, "style": "linear"}
        path.write_text(yaml.safe_dump(c, allow_unicode=True))
        return path

    res = _soaes("train", "--config", cfg(tmp_path / "ref"))
    assert res.returncode == 0, res.stderr[-3000:]
    counts = _source_counts(tmp_path / "ref")
    general = [counts[s].get(1, 0) - (counts[s - 1].get(1, 0) if s > 1 else 0) for s in range(1, 25)]
    # expected general sequences: 8 x (0.50 + 0.48 + 0.46 + 0.43) = 15 in the first 4 steps, 8 x 0.13 = 1 in the last 4
    assert sum(general[:4]) in range(14, 17) and sum(general[8:12]) in range(9, 12) and sum(general[-4:]) <= 2, general
    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as f:
        killed = subprocess.Popen([sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(cfg(run))],
                                  env={**job_env(), "SOAES_FAULT": "after_step:13"}, cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        assert killed.wait(timeout=600) == -9
    try:
        os.killpg(killed.pid, 9)
    except ProcessLookupError:
        pass
    res = _soaes("train", "--config", cfg(run))
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr and "iter_0000008" in res.stdout + res.stderr
    ref, got = losses(tmp_path / "ref"), losses(run)
    assert [got[s] for s in range(9, 25)] == [ref[s] for s in range(9, 25)]
    assert _source_counts(run)[24] == counts[24]
