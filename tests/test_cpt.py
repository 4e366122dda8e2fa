"""Continual pre-training on the real demo corpora: loss goes down, resume is exact, bad configs fail early."""

import json
import shutil

import pytest
import yaml

from megatron_soaes.config import ConfigError, load_config


def write_config(d, out, **train):
    cfg = {
        "kind": "cpt",
        "model": {"preset": "test", "overrides": {"vocab_size": 4096}},
        "data": {"tokenizer": str(d / "spm.model"), "seq_length": 64,
                 "train": [{"path": str(d / "domain.train"), "weight": 0.7},
                           {"path": str(d / "general.train"), "weight": 0.3}],
                 "valid": {"domain": [{"path": str(d / "domain.valid")}],
                           "general": [{"path": str(d / "general.valid")}]}},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        "train": {"steps": 24, "global_batch_size": 8, "micro_batch_size": 4, "dtype": "fp32",
                  "log_interval": 4, "save_interval": 8, "keep_last": 3, "output_dir": str(out), **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def losses(out):
    recs = {}
    for line in open(out / "metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r:
            recs[r["step"]] = r["loss"]
    return recs


def test_cpt_loss_decreases_and_resume_is_exact(cpt_data, tmp_path):
    from megatron_soaes.training.cpt import CPTTask
    from megatron_soaes.training import train

    run = tmp_path / "run"
    hist = train(load_config(write_config(cpt_data, run)), CPTTask(), log=lambda s: None)
    first = sum(h.loss for h in hist[:4]) / 4
    last = sum(h.loss for h in hist[-4:]) / 4
    assert last < first - 0.5, (first, last)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["iter_0000008", "iter_0000016", "iter_0000024"]
    full = losses(run)

    # Simulate a run killed after step 8's checkpoint: later checkpoints and metrics never happened.
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "iter_0000008", resumed / "checkpoints" / "iter_0000008")
    (resumed / "checkpoints" / "iter_0000016.tmp").mkdir()  # a save that was killed midway
    hist2 = train(load_config(write_config(cpt_data, resumed)), CPTTask(), log=lambda s: None)
    assert [h.step for h in hist2] == list(range(9, 25))
    assert [h.loss for h in hist2] == [full[s] for s in range(9, 25)]  # bit for bit
    last = [json.loads(x) for x in open(run / "metrics.jsonl") if '"source_tokens"' in x][-1]["source_tokens"]
    last2 = [json.loads(x) for x in open(resumed / "metrics.jsonl") if '"source_tokens"' in x][-1]["source_tokens"]
    assert last == last2 and sum(last.values()) == 24 * 8 * 64  # per-source accounting survives the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == list(range(1, 25))
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx([full[s] for s in range(1, 25)], rel=1e-6)
    assert "eval/domain" in ev.Tags()["scalars"]


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["train"].update(bogus=1), r"train.bogus: unknown key"),
    (lambda c: c["data"]["train"][0].update(path="/nope/x"), r"data.train\[0\].path: /nope/x.bin does not exist"),
    (lambda c: c["parallel"].update(tensor_parallel=2), r"world size 1 is not divisible by TP\*PP\*CP = 2"),
    (lambda c: c["train"].update(global_batch_size=6), r"global_batch_size 6 is not divisible by micro_batch_size 4"),
    (lambda c: c["optim"].update(lr=-1), r"optim.lr: Input should be greater than 0"),
    (lambda c: c["train"].update(transformer_impl="transformer_engine"), r"transformer_engine is not installed"),
    (lambda c: c["train"].update(fp8=True), r"train.fp8: FP8 needs Transformer Engine"),
    (lambda c: c["train"].update(dtype="bf16"), r"train.dtype: bf16 training needs a GPU"),
])
def test_bad_configs_fail_before_work(cpt_data, tmp_path, edit, msg):
    from megatron_soaes.training.cpt import CPTTask
    from megatron_soaes.training import train

    path = write_config(cpt_data, tmp_path / "run")
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("parallel", {})
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=msg):
        train(load_config(path), CPTTask(), log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_context_parallel_checks(cpt_data, tmp_path):
    """CP runs on the SDPA core attention without Transformer Engine; megatron's unfused local attention
    cannot split a sequence (a clear error, in the dry run too); 2*CP | seq_length (checked in dry runs)."""
    from megatron_soaes.training.cpt import CPTTask
    from megatron_soaes.training import dry_run, train

    path = write_config(cpt_data, tmp_path / "run")
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("parallel", {})["context_parallel"] = 2
    path.write_text(yaml.safe_dump(cfg))
    job = load_config(path)
    assert job.check_world(2) == 1  # a valid layout for 2 ranks
    with pytest.raises(ConfigError, match="world size 1 is not divisible by TP\\*PP\\*CP = 1\\*1\\*2 = 2"):
        train(job, CPTTask(), log=lambda s: None)
    from megatron_soaes.models import have_transformer_engine

    if not have_transformer_engine():
        assert "CP 2" in dry_run(job, 2, check_paths=False)
        local = load_config(path, ["train.attention=megatron_local"])
        with pytest.raises(ConfigError, match="megatron's unfused local attention cannot split a sequence"):
            dry_run(local, 2, check_paths=False)  # the dry run refuses what the run would
    cfg["data"]["seq_length"] = 66
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="seq_length 66 must be divisible by 2\\*CP = 4"):
        load_config(path).check_world(2)


def test_context_parallel_slices_are_load_balanced_and_complete():
    import torch

    from megatron_soaes.data.gpt_data import cp_slice

    b = {"tokens": torch.arange(2 * 16).view(2, 16), "labels": torch.arange(32).view(2, 16) + 100,
         "source": torch.tensor([0, 1])}
    parts = [cp_slice(b, 2, r) for r in range(2)]
    assert parts[0]["tokens"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]  # chunks 0 and 3
    assert parts[1]["tokens"][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # chunks 1 and 2
    assert torch.equal(parts[1]["source"], b["source"])
    for key in ("tokens", "labels"):
        got = sorted(torch.cat([p[key] for p in parts], 1)[1].tolist())
        assert got == sorted(b[key][1].tolist())


def test_all_field_errors_reported_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"preset": "test"}, "data": {"tokenizer": "x"}, "train": {"steps": 0}, "extra": 1}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    for frag in ("data.seq_length: Field required", "train.steps: Input should be greater",
                 "train.output_dir: Field required", "extra: unknown key"):
        assert f"{p}: {frag}" in text


def test_cpt_needs_training_data(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"preset": "test"}, "data": {"tokenizer": "x", "seq_length": 16},
                                 "train": {"steps": 2, "global_batch_size": 1, "output_dir": "o"}}))
    with pytest.raises(ConfigError, match="data.train: kind cpt needs at least one indexed dataset"):
        load_config(p)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_process_loss_curve_matches_single_process(cpt_data, tmp_path, tp, pp):
    from conftest import ROOT, torchrun

    from megatron_soaes.training.cpt import CPTTask
    from megatron_soaes.training import train

    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    # CPT starts from a base checkpoint: the same weights whatever the layout (random init per PP stage differs).
    make_random_hf_model(tmp_path / "hf", "test", vocab_size=4096)
    hf_to_megatron(tmp_path / "hf", tmp_path / "base", tp, pp, progress=False)
    ref = tmp_path / "ref"
    cfg = write_config(cpt_data, ref, steps=10, save_interval=0)
    init = f"model.init_checkpoint={tmp_path / 'base'}"
    hist = train(load_config(cfg, [init]), CPTTask(), log=lambda s: None)
    par = tmp_path / "par"
    cfg = write_config(cpt_data, par, steps=10, save_interval=0)
    torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg, "--set", init,
             "--set", f"parallel.tensor_parallel={tp}", "--set", f"parallel.pipeline_parallel={pp}")
    got = losses(par)
    for h in hist:
        assert got[h.step] == pytest.approx(h.loss, abs=1e-4), h.step


@pytest.mark.parametrize("fault", ["before_rename:16", pytest.param("save_start:16", marks=pytest.mark.slow),
                                   pytest.param("after_step:12", marks=pytest.mark.slow)])
def test_sigkill_during_save_then_resume_is_exact(cpt_data, cpt_ref16, tmp_path, fault):
    """A real SIGKILL at the start of a save, after its data is written but before it is published, or in
    the middle of training: an unpublished save is never used, and the rerun continues from the previous
    checkpoint with the same losses, bit for bit."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, job_env

    env = job_env()
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config"]
    run = tmp_path / "run"
    cfg = write_config(cpt_data, run, steps=16)
    # its own session, output to a file: save workers it spawned may outlive it and must not hold our pipes
    with open(tmp_path / "killed.log", "w") as f:
        killed = subprocess.Popen(cmd + [str(cfg)], env={**env, "SOAES_FAULT": fault}, cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        rc = killed.wait(timeout=600)
    try:
        os.killpg(killed.pid, 9)  # orphaned workers of the killed run, as a scheduler would
    except ProcessLookupError:
        pass
    assert rc == -9
    ck = run / "checkpoints"
    assert not (ck / "iter_0000016").exists()
    assert (ck / "iter_0000016.tmp").exists() == fault.endswith(":16")
    assert (ck / "latest").read_text().strip() == "iter_0000008"
    res = subprocess.run(cmd + [str(cfg)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr
    full, got = cpt_ref16[1], losses(run)
    assert [got[s] for s in range(9, 17)] == [full[s] for s in range(9, 17)]
    assert not (ck / "iter_0000016.tmp").exists() and (ck / "iter_0000016").exists()


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2",
                                    "parallel.tensor_parallel=2;parallel.sequence_parallel=true",
                                    pytest.param("parallel.pipeline_parallel=2", marks=pytest.mark.slow),
                                    pytest.param("parallel.use_distributed_optimizer=true", marks=pytest.mark.slow)],
                         ids=["tp2", "tp2-sp", "pp2", "dp2-distributed-optimizer"])
def test_resume_at_a_different_layout(cpt_data, cpt_ref16, tmp_path, layout):
    """Save on 1 process, resume on 2 at TP=2 (also with sequence parallelism and no TE: our norm's
    weights are replicated, so the checkpoint is the same), PP=2 or DP=2 (megatron dist_checkpointing
    reshards model and optimizer; the data position is global, so DP ranks continue the same sample order),
    the last with the distributed optimizer (one rank's gives the plain optimizer's losses; its state
    resharded over two continues them)."""
    from conftest import ROOT, torchrun

    from megatron_soaes.training.cpt import CPTTask
    from megatron_soaes.training import train

    ref, full = cpt_ref16
    if "use_distributed_optimizer" in layout:  # its own checkpoint (another state structure), same losses
        ref = tmp_path / "ref-distributed"
        train(load_config(write_config(cpt_data, ref, steps=16), ["parallel.use_distributed_optimizer=true"]),
              CPTTask(), log=lambda s: None)
        assert losses(ref) == pytest.approx(full, abs=1e-5)
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "iter_0000008", run / "checkpoints" / "iter_0000008")
    (run / "checkpoints" / "latest").write_text("iter_0000008")
    cfg = write_config(cpt_data, run, steps=16)
    torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg,
             *[a for kv in layout.split(";") for a in ("--set", kv)])
    got = losses(run)
    assert sorted(got) == list(range(9, 17))
    for s in range(9, 17):
        assert got[s] == pytest.approx(full[s], abs=2e-4), s
    if "use_distributed_optimizer" in layout:  # the plain optimizer's checkpoint is not for it: one line, before work
        from megatron_soaes.config import ConfigError

        plain = tmp_path / "plain" / "checkpoints"
        shutil.copytree(cpt_ref16[0] / "checkpoints" / "iter_0000008", plain / "iter_0000008")
        (plain / "latest").write_text("iter_0000008")
        with pytest.raises(ConfigError, match="saved without the distributed optimizer; resume with "
                                              "parallel.use_distributed_optimizer=false"):
            train(load_config(write_config(cpt_data, tmp_path / "plain", steps=16),
                              ["parallel.use_distributed_optimizer=true"]), CPTTask(), log=lambda s: None)
        assert not (tmp_path / "plain" / "metrics.jsonl").exists()


def test_pipeline_stages_draw_their_own_initial_weights(cpt_data, tmp_path):
    """From random init at PP=3 (one layer per stage), the middle and the last stage's layers differ: each stage
    seeds from seed + 100 x its pipeline rank (Megatron-LM's rule), where one seed for all stages gives both the
    same weights (they build the same shapes in the same order; only the first stage draws embeddings first)."""
    from conftest import ROOT, torchrun

    from megatron_soaes.checkpoint.dcp_io import DcpReader

    run = tmp_path / "pp3"
    cfg = write_config(cpt_data, run, steps=1, save_interval=1, eval_interval=0)
    torchrun(3, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg, "--set", "parallel.pipeline_parallel=3",
             "--set", "model.overrides.num_layers=3", "--set", "optim.lr=1e-9", "--set", "optim.min_lr=0",
             "--set", "optim.warmup_steps=0")
    r = DcpReader(run / "checkpoints" / "iter_0000001")
    key = next(k for k in r.keys() if k.endswith("mlp.linear_fc2.weight"))
    w = [r.read(key, i) for i in range(3)]
    assert w[1].shape == w[2].shape
    assert (w[1] - w[2]).abs().max() > 0.5 * w[1].std(), "stages 2 and 3 started from the same weights"
    assert (w[0] - w[1]).abs().max() > 0.5 * w[0].std()


@pytest.mark.slow
def test_rng_state_is_restored_only_onto_its_own_layout(cpt_data, tmp_path):
    """A checkpoint saved on 2 processes at TP=2 and resumed on 2 at DP=2: the same world size, another layout,
    so rank k's saved RNG belongs to another part of the model; it is not restored (the run says so) and the
    run continues from the checkpoint. Resumed at its own layout, the RNG is restored silently."""
    from conftest import ROOT, torchrun

    run = tmp_path / "run"
    cfg = write_config(cpt_data, run, steps=4, save_interval=4)
    torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg, "--set", "parallel.tensor_parallel=2")
    same = torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg, "--set", "train.steps=5",
                    "--set", "parallel.tensor_parallel=2")
    assert "resumed from" in same.stdout and "RNG state not restored" not in same.stdout
    other = torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg, "--set", "train.steps=6")
    assert "RNG state not restored" in other.stdout and "resumed from" in other.stdout, other.stdout[-2000:]
    assert sorted(losses(run)) == list(range(1, 7))
