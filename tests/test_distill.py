"""Distillation: divergences vs plain PyTorch (value, gradient, TP=2), frozen teacher, offline top-k
logits equal online, on-policy rollouts, config errors."""

import json

import pytest
import torch
import yaml

from megatron_soaes.distill import losses
from megatron_soaes.config import ConfigError, load_config


def reference(kind, s, t, beta, T, vocab=None, top_k=None):
    """Plain single-process formulas on full (or top-k restricted) distributions."""
    if vocab is not None:
        s, t = s[..., :vocab], t[..., :vocab]
    if top_k is not None:
        idx = t.topk(top_k, -1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if kind == "forward_kl":
        return (pt * (pt.log() - ps.log())).sum(-1)
    if kind == "reverse_kl":
        return (ps * (ps.log() - pt.log())).sum(-1)
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    return 0.5 * (pt - ps).abs().sum(-1)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("T,top_k,vocab", [(1.0, None, None), (2.0, None, 90), (0.7, 5, None), (1.0, 12, 90)])
def test_divergence_matches_reference(kind, T, top_k, vocab):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(3, 7, 96, generator=g, dtype=torch.float64) * 2).float().requires_grad_(True)
    t = torch.randn(3, 7, 96, generator=g) * 2
    ours = losses.divergence(s, t, kind=kind, beta=0.3, temperature=T, vocab_size=vocab, top_k=top_k)
    s2 = s.detach().clone().requires_grad_(True)
    ref = reference(kind, s2, t, 0.3, T, vocab, top_k)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6, rtol=1e-5)
    if vocab is not None:
        assert (s.grad[..., vocab:] == 0).all()  # padded vocabulary gets no gradient


def test_divergences_are_zero_for_identical_distributions():
    x = torch.randn(2, 4, 50)
    for kind in losses.DIVERGENCES:
        assert losses.divergence(x.clone(), x, kind=kind).abs().max() < 1e-6


def test_distill_loss_sees_the_student_logits_not_a_clobbered_copy():
    """megatron's vocab-parallel CE rewrites its input in place; the KD term must not see that."""
    from types import SimpleNamespace

    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.runtime import ParallelConfig, initialize
    from megatron_soaes.config import DistillSection

    initialize(ParallelConfig(), seed=0)
    task = DistillTask()
    task.d = DistillSection(offline_logits="x", top_k=4, kd_weight=0.5)
    task.d.offline_logits, task.d.top_k = None, None
    task.vocab = 50
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 50, generator=g).requires_grad_(True)
    t = torch.randn(2, 6, 50, generator=g)
    b = {"labels": torch.randint(0, 50, (2, 6), generator=g), "loss_mask": torch.ones(2, 6)}
    s0 = s.detach().clone()
    total, n, rep = task._loss(b, {"teacher_logits": t}, s)
    assert torch.equal(s.detach(), s0)
    kd = losses.divergence(s0, t).sum()
    ce = torch.nn.functional.cross_entropy(s0.reshape(-1, 50), b["labels"].reshape(-1), reduction="sum")
    assert rep["kd loss"][0] == pytest.approx(kd.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.5 * kd.item() + 0.5 * ce.item(), rel=1e-5)
    total.backward()
    ref = s0.clone().requires_grad_(True)
    (0.5 * losses.divergence(ref, t).sum() + 0.5 * torch.nn.functional.cross_entropy(
        ref.reshape(-1, 50), b["labels"].reshape(-1), reduction="sum")).backward()
    assert torch.allclose(s.grad, ref.grad, atol=1e-6)


def test_tp2_vocab_parallel_equals_tp1(tmp_path):
    from conftest import ROOT, read_json, torchrun

    torchrun(2, ROOT / "tests" / "workers" / "distill_tp.py", tmp_path / "out.json")
    res = read_json(tmp_path / "out.json")
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(2, 5, 64, generator=g) * 2
    t_full = torch.randn(2, 5, 64, generator=g) * 2
    for kind in losses.DIVERGENCES:
        for top_k in (None, 7):
            s = s_full.clone().requires_grad_(True)
            d = losses.divergence(s, t_full, kind=kind, beta=0.3, temperature=1.5, vocab_size=60, top_k=top_k)
            d.sum().backward()
            got = res[f"{kind}/{top_k}"]
            assert torch.allclose(torch.tensor(got["value"]), d.detach(), atol=1e-6), (kind, top_k)
            assert torch.allclose(torch.tensor(got["grad"]), s.grad, atol=1e-6), (kind, top_k)
    a, top1 = losses.agreement(s_full, t_full, 60)
    assert torch.allclose(torch.tensor(res["agreement"]["value"]), a, atol=1e-6)
    assert torch.equal(torch.tensor(res["agreement"]["top1"]), top1)


# ---------------- training with a frozen teacher ----------------

@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("teacher")
    make_random_hf_model(d / "hf", "test", vocab_size=4096, seed=5)
    hf_to_megatron(d / "hf", d / "mc", progress=False)
    return d / "mc"


def distill_config(data, out, teacher, **distill):
    cfg = {
        "kind": "distill",
        "model": {"preset": "test", "overrides": {"vocab_size": 4096, "num_layers": 2, "hidden_size": 32,
                                                  "intermediate_size": 64}},
        "data": {"tokenizer": str(data / "spm.model"), "seq_length": 64,
                 "train": [{"path": str(data / "domain.train"), "weight": 0.7},
                           {"path": str(data / "general.train"), "weight": 0.3}],
                 "valid": {"domain": [{"path": str(data / "domain.valid")}]}},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 0},
        "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "dtype": "fp32", "log_interval": 1,
                  "eval_iters": 1, "output_dir": str(out)},
        "distill": {"teacher": {"preset": "test", "overrides": {"vocab_size": 4096}, "checkpoint": str(teacher)},
                    **distill},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_teacher_is_frozen_and_has_no_optimizer_state(cpt_data, teacher_ckpt, tmp_path):
    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.training import train

    task = DistillTask()
    hist = train(load_config(distill_config(cpt_data, tmp_path / "run", teacher_ckpt, divergence="jsd", kd_weight=0.8)),
                 task, log=lambda s: None)
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in hist)
    teacher = task.teacher.model
    fresh = {k: v.clone() for k, v in teacher.state_dict().items() if not k.endswith("_extra_state")}
    load_model_weights(teacher, teacher_ckpt)
    for k, v in teacher.state_dict().items():
        if k in fresh:
            assert torch.equal(fresh[k], v), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for group in task.optimizer.param_groups for p in group["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    state_tensors = sum(len(s) for s in task.optimizer.optimizer.state.values())
    assert state_tensors > 0 and len(task.optimizer.optimizer.state) <= sum(1 for _ in task.student.parameters())
    rec = metrics(tmp_path / "run")
    assert "kd loss" in rec[0] and "ce loss" in rec[0] and 0 < rec[0]["1-tvd"] <= 1
    assert any("domain/top1 agree" in r.get("eval", {}) for r in rec)


def test_offline_topk_logits_give_the_online_loss(cpt_data, teacher_ckpt, tmp_path):
    from megatron_soaes.distill.offline import dump_topk
    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.training import train

    online = load_config(distill_config(cpt_data, tmp_path / "online", teacher_ckpt, top_k=8, kd_weight=0.7))
    dump_topk(online, tmp_path / "logits", top_k=8, value_dtype="fp32", samples_per_shard=12, log=lambda s: None)
    shards = sorted(p.name for p in (tmp_path / "logits").glob("shard_*.pt"))
    assert shards == [f"shard_{i:06d}.pt" for i in range(3)]  # 32 samples, 12 per shard
    # resume: a missing shard is redone, the others are kept
    (tmp_path / "logits" / shards[1]).unlink()
    before = (tmp_path / "logits" / shards[0]).stat().st_mtime_ns
    dump_topk(online, tmp_path / "logits", top_k=8, value_dtype="fp32", samples_per_shard=12, log=lambda s: None)
    assert (tmp_path / "logits" / shards[1]).exists() and (tmp_path / "logits" / shards[0]).stat().st_mtime_ns == before

    h_on = train(online, DistillTask(), log=lambda s: None)
    cfg = yaml.safe_load((tmp_path / "online.yaml").read_text())
    cfg["distill"].pop("teacher")
    cfg["distill"]["offline_logits"] = str(tmp_path / "logits")
    cfg["train"]["output_dir"] = str(tmp_path / "offline")
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump(cfg))
    h_off = train(load_config(tmp_path / "offline.yaml"), DistillTask(), log=lambda s: None)
    assert [h.loss for h in h_off] == pytest.approx([h.loss for h in h_on], abs=1e-5)
    # other data than the dump -> clear error
    cfg["train"]["seed"] = 7
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="was dumped for other data"):
        train(load_config(tmp_path / "offline.yaml"), DistillTask(), log=lambda s: None)


def test_on_policy_rollouts_are_deterministic(cpt_data, teacher_ckpt, tmp_path):
    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.training import train

    runs = []
    for name in ("a", "b"):
        cfg = distill_config(cpt_data, tmp_path / name, teacher_ckpt, divergence="reverse_kl",
                             on_policy={"fraction": 0.5, "prompt_tokens": 56, "temperature": 1.0})
        runs.append([h.loss for h in train(load_config(cfg, ["train.steps=2"]), DistillTask(), log=lambda s: None)])
    assert runs[0] == runs[1] and all(torch.isfinite(torch.tensor(runs[0])))


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["distill"]["teacher"].update(tensor_parallel=2), "co-located teacher runs at the student's TP"),
    (lambda c: c["distill"].update(divergence="kl"), "distill.divergence"),
    (lambda c: c["distill"].update(offline_logits="/x"), "exactly one of distill.teacher"),
    (lambda c: c.pop("distill"), "kind: distill needs a distill section"),
    (lambda c: c["distill"]["teacher"].update(overrides={"vocab_size": 8192}), "padded vocabulary 8192"),
])
def test_bad_distill_configs(cpt_data, teacher_ckpt, tmp_path, edit, msg):
    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.training import train

    path = distill_config(cpt_data, tmp_path / "run", teacher_ckpt)
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=msg):
        train(load_config(path), DistillTask(), log=lambda s: None)


def test_distillation_trains_a_lora_student(cpt_data, teacher_ckpt, tmp_path):
    """A distill job with a peft section: the student is the teacher's own weights plus LoRA adapters, so
    its first KD loss is ~0 (B starts at zero); only the adapters are in the optimizer."""
    from megatron_soaes.distill.task import DistillTask
    from megatron_soaes.training import train

    path = distill_config(cpt_data, tmp_path / "run", teacher_ckpt, kd_weight=1.0)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"preset": "test", "overrides": {"vocab_size": 4096}, "init_checkpoint": str(teacher_ckpt)}
    cfg["peft"] = {"rank": 4, "alpha": 8}
    path.write_text(yaml.safe_dump(cfg))
    task = DistillTask()
    hist = train(load_config(path), task, log=lambda s: None)
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in hist)
    names = {id(p): n for n, p in task.student.named_parameters()}
    in_opt = [names.get(id(p), "?") for group in task.optimizer.param_groups for p in group["params"]]
    assert in_opt and all(".lora_" in n for n in in_opt), in_opt
    assert metrics(tmp_path / "run")[0]["kd loss"] < 1e-3
