"""Draft heads -- EAGLE-3's and megatron-core's MTP layer: trained in megatron beside a frozen target (the loss
falls), the megatron head equal to the inference engine's and TP2 equal to TP1, every draft kind lossless
(batch 1 and a ragged batch, the reduced vocabulary included), the decoder's feature bookkeeping against teacher
forcing, sampling that keeps the target's distribution, and the EAGLE-3 export read back bit-exact in the
layout vLLM loads."""

import json

import pytest
import torch
import yaml
from conftest import ROOT, torchrun

from megatron_soaes.inference import load_inference_model
from megatron_soaes.inference.generate import generate
from megatron_soaes.speculative.decode import HeadDrafter, SpecConfig, speculative_generate

SPECS = [SpecConfig("chain", gamma=3), SpecConfig.parse("2,2,1"), SpecConfig.parse("dynamic:2,3,6")]


@pytest.fixture(scope="module")
def sharp_target(tmp_path_factory):
    """A tiny random target with peaked next-token distributions (output layer scaled up), so a head's
    divergence and agreement have something to learn."""
    from safetensors.torch import load_file, save_file

    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("head-target")
    make_random_hf_model(d / "hf", "test", vocab_size=4096, seed=5)
    f = next((d / "hf").glob("*.safetensors"))
    sd = load_file(str(f))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 30
    save_file(sd, str(f), metadata={"format": "pt"})
    hf_to_megatron(d / "hf", d / "mc", progress=False)
    return d / "mc"


def head_config(small_sft, cpt_data, target, out, steps=12, tp=1, draft="eagle3", **head):
    cfg = {
        "kind": "distill",
        "model": {"preset": "test", "overrides": {"vocab_size": 4096}},
        "parallel": {"tensor_parallel": tp},
        "data": {"tokenizer": str(cpt_data / "spm.model"), "seq_length": 64},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 0},
        "train": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "dtype": "fp32", "log_interval": 1,
                  "eval_iters": 1, "output_dir": str(out), "save_interval": steps},
        "sft": {"default_system": None, "train": [{"path": str(small_sft / "soae_qa.train.jsonl")}],
                "valid": {"qa": [{"path": str(small_sft / "soae_qa.valid.jsonl")}]}},
        "distill": {"draft": draft, "teacher": {"preset": "test", "overrides": {"vocab_size": 4096},
                                                   "checkpoint": str(target)}, "head": head},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_head(small_sft, cpt_data, target, out, draft):
    from megatron_soaes.config import load_config
    from megatron_soaes.training import train

    train(load_config(head_config(small_sft, cpt_data, target, out, draft=draft, draft_vocab=1024)), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def head_run(small_sft, cpt_data, sharp_target, tmp_path_factory):
    return _train_head(small_sft, cpt_data, sharp_target, tmp_path_factory.mktemp("head") / "run", "eagle3")


@pytest.fixture(scope="module")
def mtp_run(small_sft, cpt_data, sharp_target, tmp_path_factory):
    return _train_head(small_sft, cpt_data, sharp_target, tmp_path_factory.mktemp("mtp") / "run", "mtp")


RUNS = ["head_run", "mtp_run"]


@pytest.mark.parametrize("run", RUNS)
def test_head_training_lowers_the_divergence(request, run):
    run = request.getfixturevalue(run)
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.meta import read_meta

    rec = read_meta(resolve_checkpoint(run))["draft_head"]
    assert rec["draft_vocab_size"] == 1024
    assert rec["feature_layers"] == ([4] if rec["kind"] == "mtp" else rec["feature_layers"]) and \
        len(rec["feature_layers"]) == (1 if rec["kind"] == "mtp" else 3)


def test_cached_teacher_outputs_give_the_same_training(small_sft, cpt_data, sharp_target, tmp_path):
    """distill.head.cache_teacher: the first epoch is the uncached run's exactly; later epochs, which read the
    teacher's outputs back (kept in bf16), stay within bf16's rounding of it."""
    from megatron_soaes.config import load_config
    from megatron_soaes.training import train

    losses = {}
    for cache in (False, True):
        out = tmp_path / f"cache{cache}"
        train(load_config(head_config(small_sft, cpt_data, sharp_target, out, steps=10, draft_vocab=1024,
                                      cache_teacher=cache)), log=lambda s: None)
        losses[cache] = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(losses[True]) == 10
    assert losses[True][:2] == pytest.approx(losses[False][:2], rel=1e-6)  # (24 rows: the first 6 steps are epoch 1)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[True] != losses[False]  # the later epochs did read the cache


@pytest.mark.parametrize("run", RUNS)
def test_megatron_head_tp2_equals_tp1_and_the_inference_head(request, run, sharp_target, tmp_path):
    """The head trained at TP1, loaded (resharded) at TP1 and TP2: the same logits for every
    training-time-test step and the same gradients; step 0 equals the inference engine's head fed the
    inference engine's target features."""
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.heads.inference import load_head

    head_run = request.getfixturevalue(run)
    ckpt = resolve_checkpoint(head_run)
    res = {}
    for n in (1, 2):
        torchrun(n, ROOT / "tests/workers/head_tp.py", ckpt, sharp_target, tmp_path / f"tp{n}.json")
        res[n] = {k: torch.tensor(v) for k, v in json.loads((tmp_path / f"tp{n}.json").read_text()).items()}
    for k in ("logits", "fc_grad", "qkv_grad"):
        scale = float(res[1][k].abs().max())
        torch.testing.assert_close(res[2][k], res[1][k], rtol=1e-4, atol=1e-5 * scale, msg=k)
    d = res[1]["init_proj"].shape[0]  # a head started from the target passes the hidden state through, at any TP
    for n in (1, 2):
        assert torch.equal(res[n]["init_proj"][:, -d:], torch.eye(d)) and not res[n]["init_proj"][:, :-d].any()
    target = load_inference_model(sharp_target)
    head = load_head(head_run, target)
    tokens = res[1]["tokens"][:1]  # the first row is one example
    n = tokens.shape[1]
    target.feature_layers = head.hcfg.feature_layers
    target.forward(tokens, torch.arange(n)[None], target.new_cache(1, n))
    head.hidden_in = head.fuse(target.features)[:, :n - 1]
    logits = head.forward(tokens[:, 1:], torch.arange(n - 1)[None], head.new_cache(1, n))[0][:, head.draft_ids]
    torch.testing.assert_close(logits, res[1]["logits"][0, 0, :n - 1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=RUNS)
def decoding(request, sharp_target):
    from megatron_soaes.heads.inference import load_head

    head_run = request.getfixturevalue(request.param)
    target = load_inference_model(sharp_target)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4000, (n,), generator=g).tolist() for n in (7, 12, 2, 9)]
    ref = [generate(target, [p], 20).tokens[0] for p in prompts]
    return target, load_head(head_run, target), prompts, ref


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.mode)
def test_every_draft_kind_is_lossless_greedy(decoding, sharp_target, spec):
    """The head, the separate draft model on a reduced vocabulary, batch 1 and a ragged batch of 4 (rows of
    2 to 12 prompt tokens finishing in different rounds): exactly target-only greedy."""
    target, head, prompts, ref = decoding
    reduced = load_inference_model(sharp_target)
    reduced.restrict_vocab(head.draft_ids)
    for draft in (head, reduced):
        assert [speculative_generate(target, draft, [p], 20, spec).tokens[0] for p in prompts] == ref
        assert speculative_generate(target, draft, prompts, 20, spec).tokens == ref
    # a reduced draft vocabulary that leaves out every token the target says still decodes losslessly
    missing = torch.tensor(sorted(set(range(4096)) - {t for r in ref for t in r}))[:512]
    reduced.restrict_vocab(missing)
    out = speculative_generate(target, reduced, prompts, 20, spec)
    assert out.tokens == ref and out.tau == 1.0


class Recording(HeadDrafter):
    """Keeps the root logits of every round and the position of the root."""

    def root(self, root):
        logits = super().root(root)
        self.seen.append((int(self.cache.lengths[0]) + 1, logits[0, 0].clone()))  # root at target position lengths + 1
        return logits


def test_head_decoding_sees_what_teacher_forcing_sees(decoding):
    """Each round's root logits (the head's cache built from verified tokens re-run with the target's features)
    equal the teacher-forced head on the final sequence at that position: the bookkeeping of features,
    pending tokens and cache slots is right whatever was accepted."""
    target, head, prompts, ref = decoding
    for spec in SPECS:
        for p, r in zip(prompts, ref):
            rec = Recording(head)
            rec.seen = []
            speculative_generate(target, rec, [p], 20, spec)
            seq = p + r
            n = len(seq)
            target.feature_layers = head.hcfg.feature_layers
            target.forward(torch.tensor([seq]), torch.arange(n)[None], target.new_cache(1, n))
            target.feature_layers = ()
            head.hidden_in = head.fuse(target.features)[:, :n - 1]
            tf = head.forward(torch.tensor([seq[1:]]), torch.arange(n - 1)[None], head.new_cache(1, n))[0]
            assert len(rec.seen) > 1
            for pos, logits in rec.seen:  # the root at position pos: the teacher-forced slot pos - 1
                torch.testing.assert_close(logits, tf[pos - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["eagle3", "mtp"])
def test_sampling_with_a_head_keeps_the_target_distribution(tmp_path, kind):
    """A random head on a target with 8 tokens: the first sampled token follows the target's distribution
    (chi-square), with chain and tree drafts."""
    from megatron_soaes.heads.config import HeadConfig
    from megatron_soaes.heads.inference import HEAD_CLASSES
    from megatron_soaes.heads.layout import random_eagle3
    from megatron_soaes.models.random_init import make_random_hf_model
    from test_speculative import assert_first_token_follows_the_target

    make_random_hf_model(tmp_path / "t", "test", seed=3, vocab_size=8, make_vocab_size_divisible_by=8)
    target = load_inference_model(tmp_path / "t")
    hcfg = HeadConfig(target=target.cfg.to_dict(), draft_vocab_size=6, kind=kind)
    assert_first_token_follows_the_target(target, HEAD_CLASSES[kind](hcfg, random_eagle3(hcfg, seed=4), target.embed))


def test_mtp_head_is_megatron_cores_layer_and_reads_back(mtp_run, tmp_path):
    """The MTP head's checkpoint holds megatron-core's MultiTokenPredictionLayer (enorm, hnorm, eh_proj, one
    transformer layer, final norm) and maps to the inference layout and back bit-exact; it is not exported as
    an EAGLE-3 head (no engine loads a bare MTP layer): a one-line refusal."""
    from conftest import cli_in_process

    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.heads.inference import load_head_weights
    from megatron_soaes.heads.layout import eagle_to_megatron, megatron_names

    hcfg, sd = load_head_weights(mtp_run)
    reader = DcpReader(resolve_checkpoint(mtp_run))
    assert {"mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight", "mtp.final_layernorm.weight"} <= set(reader.keys())
    mega = eagle_to_megatron(hcfg, sd)
    assert set(mega) == set(megatron_names(hcfg))
    for k, v in mega.items():
        assert torch.equal(v, reader.read(k).to(v.dtype)), k
    res = cli_in_process("convert", "head-to-eagle3", str(mtp_run), str(tmp_path / "x"))
    assert res.returncode == 2 and "a mtp head, not an EAGLE-3 one" in res.stderr and not (tmp_path / "x").exists()


def test_eagle3_export_reads_back_bit_exact(head_run, tmp_path):
    """Checkpoint -> EAGLE-3 directory -> the same tensors and config; megatron names <-> EAGLE-3 names both
    ways; the layout vLLM's LlamaForCausalLMEagle3 reads (no embedding table, d2t as offsets)."""
    from safetensors import safe_open

    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.heads.export import export_eagle3, read_eagle3
    from megatron_soaes.heads.inference import load_head_weights
    from megatron_soaes.heads.layout import MEGATRON_NAMES, eagle_to_megatron

    hcfg, sd = load_head_weights(head_run)
    out = export_eagle3(head_run, tmp_path / "eagle3", dtype=None)
    back_cfg, back = read_eagle3(out)
    assert back_cfg == hcfg and back.keys() == sd.keys() and all(torch.equal(sd[k], back[k]) for k in sd)
    reader = DcpReader(resolve_checkpoint(head_run))
    mega = eagle_to_megatron(hcfg, back)
    assert set(mega) == set(MEGATRON_NAMES)
    for k, v in mega.items():
        assert torch.equal(v, reader.read(k).to(v.dtype)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 1024 and cfg["vocab_size"] == 4096
    assert cfg["eagle_aux_hidden_state_layer_ids"] == list(hcfg.feature_layers)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").sum() == 1024
        assert f.get_tensor("midlayer.self_attn.q_proj.weight").shape[1] == 2 * cfg["hidden_size"]
        assert f.get_tensor("fc.weight").shape == (cfg["hidden_size"], 3 * cfg["target_hidden_size"])
    assert not any("embed_tokens" in n for n in names) and "lm_head.weight" in names


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["distill"].update(teacher=None, offline_logits="/x", top_k=4), "online"),
    (lambda c: c["parallel"].update(pipeline_parallel=2), "pipeline_parallel 1"),
    (lambda c: c["model"].update(init_checkpoint=c["distill"]["teacher"]["checkpoint"]), "random weights"),
    (lambda c: c["distill"]["head"].update(draft_vocab=1023), "divisible by parallel.tensor_parallel"),
    (lambda c: c.update(peft={"rank": 4}), "peft:"),
    (lambda c: c["distill"]["head"].update(feature_layers=[0, 0, 1]), "three distinct layer indices"),
])
def test_bad_head_configs_are_refused_before_training(small_sft, cpt_data, sharp_target, tmp_path, edit, msg):
    from conftest import cli_in_process

    path = head_config(small_sft, cpt_data, sharp_target, tmp_path / "run", tp=2, draft_vocab=1024)
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    res = cli_in_process("train", "--config", str(path), "--dry-run", "--world-size", "4")
    assert res.returncode != 0 and msg in res.stderr + res.stdout, res.stderr + res.stdout


def test_serve_check_prints_eagle3_commands(head_run, sharp_target, tmp_path):
    """`soaes convert head-to-eagle3` then `soaes serve-check`: the head is checked against the target and the
    engines are given EAGLE-3 speculation; a head for another target is refused."""
    from conftest import cli_in_process

    out = tmp_path / "eagle3"
    res = cli_in_process("convert", "head-to-eagle3", str(head_run), str(out), "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    res = cli_in_process("serve-check", "--target", str(sharp_target.parent / "hf"), "--draft", str(out))
    assert res.returncode == 0, res.stderr
    assert '"method": "eagle3"' in res.stdout and "--speculative-algorithm EAGLE3" in res.stdout
    cfg = json.loads((out / "config.json").read_text())
    cfg["target_hidden_size"] += 8
    (out / "config.json").write_text(json.dumps(cfg))
    res = cli_in_process("serve-check", "--target", str(sharp_target.parent / "hf"), "--draft", str(out))
    assert res.returncode != 0 and "target_hidden_size" in res.stderr
