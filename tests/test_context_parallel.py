"""Context parallelism on megatron's local layers (no Transformer Engine): the sequence split over CP ranks
in megatron's load-balanced layout, K and V all-gathered for attention (`models.context_parallel`). Each
test trains the same job from the same weights at CP=1 and CP>1 on gloo and compares losses and gradient
norms step by step: they can only agree if attention masks causally across chunks, keeps packed examples
apart across chunks, and the gather's backward returns each rank its gradients."""

import json

import pytest
import torch
import yaml
from conftest import ROOT, torchrun
from test_cpt import losses, write_config
from test_distill import distill_config

from megatron_soaes.config import load_config

CLI = ROOT / "megatron_soaes" / "cli.py"


def metrics(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}


def assert_same_steps(ref, got, loss_abs=1e-4, grad_rel=1e-3):
    a, b = metrics(ref), metrics(got)
    assert sorted(a) == sorted(b) and a
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=loss_abs), s
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=grad_rel), s


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One set of starting weights for every layout (random init per stage would differ)."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("cp-base")
    make_random_hf_model(d / "hf", "test", vocab_size=4096)
    hf_to_megatron(d / "hf", d / "mc", progress=False)
    return d / "mc"


def cpt(cpt_data, out, base, *sets, nproc=1):
    cfg = write_config(cpt_data, out, steps=6, save_interval=0, log_interval=1, eval_interval=0)
    args = ["--set", f"model.init_checkpoint={base}", *[a for s in sets for a in ("--set", s)]]
    torchrun(nproc, CLI, "train", "--config", cfg, *args)
    return out


def test_cp2_trains_like_cp1(cpt_data, base, tmp_path):
    ref = cpt(cpt_data, tmp_path / "cp1", base)
    got = cpt(cpt_data, tmp_path / "cp2", base, "parallel.context_parallel=2", nproc=2)
    assert_same_steps(ref, got)


@pytest.mark.slow
def test_cp2_by_tp2_trains_like_tp2(cpt_data, base, tmp_path):
    ref = cpt(cpt_data, tmp_path / "tp2", base, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", nproc=2)
    got = cpt(cpt_data, tmp_path / "cp2tp2", base, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
              "parallel.context_parallel=2", nproc=4)
    assert_same_steps(ref, got)


def test_cp2_resumes_a_cp1_checkpoint(cpt_data, cpt_ref16, tmp_path):
    """CP shards no weight: a CP=1 checkpoint continues at CP=2 with the same losses."""
    import shutil

    ref, full = cpt_ref16
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "iter_0000008", run / "checkpoints" / "iter_0000008")
    (run / "checkpoints" / "latest").write_text("iter_0000008")
    cfg = write_config(cpt_data, run, steps=16)
    res = torchrun(2, CLI, "train", "--config", cfg, "--set", "parallel.context_parallel=2")
    assert "resumed from" in res.stdout + res.stderr
    got = losses(run)
    assert sorted(got) == list(range(9, 17))
    for s in range(9, 17):
        assert got[s] == pytest.approx(full[s], abs=2e-4), s


def sft_job(small_sft, spm, out, base) -> str:
    """Packed SFT rows of 256 tokens: several examples per row, so at CP=2 (chunks of 64) examples cross
    chunk boundaries and ranks."""
    cfg = {"kind": "sft", "model": {"preset": "test", "overrides": {"vocab_size": 4096}, "init_checkpoint": str(base)},
           "data": {"tokenizer": str(spm), "seq_length": 256},
           "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 0},
           "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "dtype": "fp32", "log_interval": 1,
                     "eval_interval": 0, "save_interval": 0, "output_dir": str(out)},
           "sft": {"default_system": None, "train": [{"path": str(small_sft / f"{n}.train.jsonl")}
                                                     for n in ("consultation", "recitation", "soae_qa")]}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def test_packed_sft_at_cp2_trains_like_cp1(small_sft, cpt_data, tmp_path):
    spm = cpt_data / "spm.model"
    ref, got = tmp_path / "cp1", tmp_path / "cp2"
    torchrun(1, CLI, "train", "--config", sft_job(small_sft, spm, ref, small_sft / "base"))
    torchrun(2, CLI, "train", "--config", sft_job(small_sft, spm, got, small_sft / "base"),
             "--set", "parallel.context_parallel=2")
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.sft.task import train_rows

    job = load_config(ref.parent / "cp1.yaml")
    rows, stats = train_rows(job, load_tokenizer(job.data.tokenizer), progress=False)
    assert stats["examples"] > stats["rows"] + 16  # many rows hold several examples: the document mask is tested
    assert_same_steps(ref, got)


def test_distillation_at_cp2_trains_like_cp1(cpt_data, tmp_path):
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "hf", "test", vocab_size=4096, seed=5)
    hf_to_megatron(tmp_path / "hf", tmp_path / "teacher", progress=False)
    ref, got = tmp_path / "cp1", tmp_path / "cp2"
    for out, n in ((ref, 1), (got, 2)):
        cfg = distill_config(cpt_data, out, tmp_path / "teacher", divergence="forward_kl", kd_weight=0.8)
        torchrun(n, CLI, "distill", "--config", cfg, "--set", f"parallel.context_parallel={n}",
                 "--set", "train.eval_interval=0", "--set", "train.save_interval=0", "--set", "train.seed=3")
    assert_same_steps(ref, got)
    a, b = metrics(ref), metrics(got)
    for s in a:
        assert b[s]["kd loss"] == pytest.approx(a[s]["kd loss"], abs=1e-4)


def test_attention_gathers_and_masks_by_global_position():
    """The mask a CP rank builds equals the rows of the global causal (and document) mask for its chunks."""
    from megatron_soaes.models.context_parallel import chunk_positions, gathered_positions

    s, cp = 16, 2
    q = [chunk_positions(s // cp, cp, r) for r in range(cp)]
    assert q[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15] and q[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(gathered_positions(s // cp, cp).tolist()) == list(range(s))
    assert torch.equal(gathered_positions(s // cp, cp), torch.cat(q))
