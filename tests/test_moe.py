"""Qwen3-MoE on megatron-core: the model description against the model cards, HF <-> megatron conversion
(the hub's per-expert layout and transformers 5's fused one), logits and a training step's gradients
equal to HF transformers' at TP / EP / PP layouts, the load-balancing loss against HF's, bad input, and LoRA
on the experts against peft (transformers 5's fused experts, peft's `target_parameters`)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_json, session_dir, torchrun

TOL = 1e-5


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Random HF Qwen3MoeForCausalLM models (4 experts, top-2, layer 1 dense, GQA): renormalised top-k and
    untied; softmax weights (norm_topk_prob false) and tied."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    d = session_dir(tmp_path_factory, "moe")
    out = {}
    for name, kw in {"renorm": dict(norm_topk_prob=True), "softmax_tied": dict(norm_topk_prob=False, tie_word_embeddings=True)}.items():
        make_random_hf_model(d / name / "hf", "test-moe", seed=len(out) + 3, **kw)
        hf_to_megatron(d / name / "hf", d / name / "mc", progress=False)
        out[name] = d / name
    return out


def test_presets_have_the_model_cards_parameter_counts():
    from megatron_soaes.models.config import preset

    for name, total, active in (("qwen3-30b-a3b", 30.5e9, 3.3e9), ("qwen3-235b-a22b", 235e9, 22e9)):
        cfg = preset(name)
        assert cfg.is_moe and all(cfg.moe_layers())
        assert abs(cfg.num_parameters(padded=False) / total - 1) < 0.005, name
        assert abs(cfg.num_parameters(active=True, padded=False) / active - 1) < 0.02, name


def test_sparse_layer_rule_and_bad_configs():
    from megatron_soaes.config.job import ParallelConfig, ParallelConfigError
    from megatron_soaes.models.config import ModelConfigError, Qwen2Config, preset

    cfg = preset("test-moe", num_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert cfg.moe_layers() == [False, True, False, False, False, True]  # (i + 1) % 2 == 0, not layer 3
    with pytest.raises(ModelConfigError, match="expert parallel size 3 does not divide num_experts 4"):
        cfg.check_parallel(1, 1, 3)
    with pytest.raises(ModelConfigError, match="dense model"):
        preset("test").check_parallel(1, 1, 2)
    with pytest.raises(ModelConfigError, match="pipeline parallel size 4 gives stage 1 no MoE layer"):
        preset("test-moe").check_parallel(1, 4)  # layer 1 is dense: megatron's MoE reductions would hang
    hf = cfg.to_hf("float32")
    assert Qwen2Config.from_hf(hf).moe_layers() == cfg.moe_layers()
    with pytest.raises(ModelConfigError, match="shared_expert_intermediate_size.*not supported"):
        Qwen2Config.from_hf({**hf, "shared_expert_intermediate_size": 512})
    with pytest.raises(ModelConfigError, match="unknown architecture"):
        Qwen2Config.from_hf({**hf, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"})
    with pytest.raises(ParallelConfigError, match="TP\\*PP\\*EP"):
        ParallelConfig(expert_parallel=4).validate(2)


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_round_trip_is_bit_exact_from_both_hf_layouts(moe_models, tmp_path):
    """HF (hub per-expert layout) -> megatron -> HF is bit-exact, and transformers 5's fused expert tensors
    convert to the same megatron checkpoint; transformers loads the export and gives the source's logits."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf

    src = moe_models["renorm"]
    megatron_to_hf(src / "mc", tmp_path / "back")
    a, b = _state(src / "hf"), _state(tmp_path / "back")
    assert set(a) == set(b) and any(".mlp.experts.3.down_proj" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    fused = tmp_path / "fused"  # the same weights with each layer's experts in one tensor pair
    fused.mkdir()
    (fused / "config.json").write_text((src / "hf" / "config.json").read_text())
    out = {k: v for k, v in a.items() if ".experts." not in k}
    for i in (0, 2, 3):
        p = f"model.layers.{i}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([a[p + f"{e}.gate_proj.weight"], a[p + f"{e}.up_proj.weight"]])
                                               for e in range(4)])
        out[p + "down_proj"] = torch.stack([a[p + f"{e}.down_proj.weight"] for e in range(4)])
    save_file(out, str(fused / "model.safetensors"), metadata={"format": "pt"})
    hf_to_megatron(fused, tmp_path / "mc_fused", progress=False)
    megatron_to_hf(tmp_path / "mc_fused", tmp_path / "back_fused")
    c = _state(tmp_path / "back_fused")
    assert all(torch.equal(a[k], c[k]) for k in a)

    x = torch.randint(0, 1024, (2, 12))
    ref = AutoModelForCausalLM.from_pretrained(src / "hf", dtype=torch.float32)(x).logits
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)(x).logits
    assert torch.equal(ref, got)


def test_a_missing_expert_is_a_one_line_error_and_nothing_is_written(moe_models, tmp_path):
    from safetensors.torch import save_file

    from megatron_soaes.checkpoint.convert import ConversionError, hf_to_megatron

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((moe_models["renorm"] / "hf" / "config.json").read_text())
    w = _state(moe_models["renorm"] / "hf")
    del w["model.layers.2.mlp.experts.1.up_proj.weight"]
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing tensor model.layers.2.mlp.experts.1.up_proj.weight"):
        hf_to_megatron(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,tp,pp,ep,etp,n", [("softmax_tied", 1, 1, 1, 1, 1), ("renorm", 1, 1, 2, 1, 2),
                                                ("softmax_tied", 1, 2, 2, 1, 4), ("renorm", 2, 1, 2, 2, 4),
                                                ("renorm", 2, 1, 2, 1, 2)],
                         ids=["softmax-tied-tp1", "ep2", "softmax-tied-pp2-ep2", "tp2-sp-ep2", "tp2-sp-ep2-etp1"])
def test_logits_and_training_step_match_hf(moe_models, tmp_path, name, tp, pp, ep, etp, n):
    """Forward logits (fp32) within 1e-5 of HF's, and one training step's loss and every gradient shard --
    experts on their EP rank by global index (split over the expert-TP ranks), the router, the dense
    layer -- within 1e-5. The last layout keeps experts whole (expert TP 1) on the two ranks that split
    attention (TP 2): the experts go to EP instead, on 2 processes."""
    out = tmp_path / "r.json"
    torchrun(n, ROOT / "tests" / "workers" / "moe_vs_hf.py", moe_models[name] / "hf", moe_models[name] / "mc",
             tp, pp, ep, etp, out)
    ranks = read_json(out)
    last = [r for r in ranks if r["last_stage"]]
    assert last and all(r["logits_compared"] == 4 and r["max_logit_diff"] < TOL for r in last), ranks
    assert all(abs(r["loss"] - r["ref_loss"]) < TOL for r in last), ranks
    assert all(r["compared"] > 0 and r["max_grad_diff"] < TOL for r in ranks), ranks
    # every expert of every sparse layer was compared, on exactly one EP rank (per TP rank)
    seen = [tuple(e) for r in ranks for e in r["experts"]]
    assert sorted(set(seen)) == [(i, e) for i in (0, 2, 3) for e in range(4)]
    assert len(seen) == 12 * etp


def test_load_balancing_loss_matches_hf_per_layer(moe_models):
    """megatron-core's aux loss of each MoE layer (E * sum_i f_i P_i over the k * T routed slots) times k is
    HF's load_balancing_loss_func of that layer's router logits; its router z-loss (when on) is the mean
    squared log-sum-exp of those logits."""
    import dataclasses

    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models import Qwen2Config, build_model
    from megatron_soaes.runtime import ParallelConfig, initialize
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    d = moe_models["renorm"]
    initialize(ParallelConfig())
    cfg = dataclasses.replace(Qwen2Config.from_hf(d / "hf"), router_z_loss_coef=1e-3)
    model = build_model(cfg)
    load_model_weights(model, d / "mc")
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    clear_aux_losses_tracker()
    model.train()
    model(x, torch.arange(16).expand(2, 16), None, labels=x).sum().backward()
    tracker = get_moe_layer_wise_logging_tracker()
    ours, z = (tracker[k]["values"].tolist() for k in ("load_balancing_loss", "z_loss"))
    clear_aux_losses_tracker()

    hf = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32)
    logits = hf(x, output_router_logits=True).router_logits
    sparse = [i for i, s in enumerate(cfg.moe_layers()) if s]
    assert len(logits) == len(sparse) == 3 and ours[1] == 0.0  # the dense layer has none
    for layer, lg in zip(sparse, logits):
        ref = load_balancing_loss_func((lg,), cfg.num_experts, cfg.num_experts_per_tok).item()
        assert ours[layer] * cfg.num_experts_per_tok == pytest.approx(ref, rel=1e-5), (layer, ours, ref)
        assert z[layer] == pytest.approx(torch.logsumexp(lg.float(), -1).square().mean().item(), rel=1e-5), layer


def test_training_at_ep2_logs_moe_metrics_and_resumes_at_ep1(cpt_data, tmp_path):
    """CPT of an MoE model at EP=2 (2 processes; DP=2 for the dense weights) with the distributed optimizer:
    the log and metrics carry the load-balancing loss and the expert load per layer; its step-8 checkpoint
    (experts saved by global index, optimizer state in model space) resumes on one process at EP=1 with the
    same losses."""
    import shutil

    import yaml

    from test_cpt import losses, write_config

    def cfg(out, **parallel):
        path = write_config(cpt_data, out, steps=16)
        c = yaml.safe_load(path.read_text())
        c["model"] = {"preset": "test-moe",
                      "overrides": {"vocab_size": 4096, "router_aux_loss_coef": 0.01, "router_z_loss_coef": 1e-3}}
        c["parallel"] = parallel
        path.write_text(yaml.safe_dump(c))
        return path

    ref = tmp_path / "ep2"
    res = torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config",
                   cfg(ref, expert_parallel=2, use_distributed_optimizer=True))
    log = res.stdout + res.stderr
    assert "moe aux" in log and "router z" in log and "expert load max/mean" in log
    rows = [json.loads(x) for x in open(ref / "metrics.jsonl") if '"moe_aux_loss"' in x]
    assert len(rows) == 16
    for r in rows:  # three sparse layers; balanced load is 1.0, all tokens on the same 2 of 4 experts is 2.0
        assert len(r["moe_aux_loss_per_layer"]) == 3 and all(1.0 <= x <= 2.0 + 1e-6 for x in r["moe_load_max_over_mean"])
        assert 0.9 < r["moe_aux_loss"] < 2.0  # E * sum f_i P_i: 1 when balanced
        assert len(r["moe_z_loss_per_layer"]) == 3 and r["moe_z_loss"] > 0
    run = tmp_path / "ep1"
    shutil.copytree(ref / "checkpoints" / "iter_0000008", run / "checkpoints" / "iter_0000008")
    (run / "checkpoints" / "latest").write_text("iter_0000008")
    torchrun(1, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg(run, use_distributed_optimizer=True))
    full, got = losses(ref), losses(run)
    assert sorted(got) == list(range(9, 17))
    for s in range(9, 17):
        assert got[s] == pytest.approx(full[s], abs=2e-4), s


@pytest.mark.parametrize("name", ["renorm", "softmax_tied"])
def test_inference_model_matches_hf(moe_models, name):
    """The decoding model's MoE layers (experts batched by expert): HF's logits from the HF directory and
    from the converted checkpoint, for a prefill and then token by token through the KV cache."""
    from megatron_soaes.checkpoint.compare import hf_logits
    from megatron_soaes.inference.model import load_inference_model

    toks = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(moe_models[name] / "hf", toks)
    for src in ("hf", "mc"):
        m = load_inference_model(moe_models[name] / src)
        assert (m.forward(toks, torch.arange(16).expand(2, 16), m.new_cache(2, 32)) - ref).abs().max() < TOL
        cache = m.new_cache(2, 32)
        outs = [m.forward(toks[:, :9], torch.arange(9).expand(2, 9), cache)]
        cache.lengths += 9
        for j in range(9, 16):
            outs.append(m.forward(toks[:, j:j + 1], torch.full((2, 1), j), cache))
            cache.lengths += 1
        assert (torch.cat(outs, 1) - ref).abs().max() < TOL


@pytest.fixture(scope="module")
def moe_pair(moe_models, tmp_path_factory):
    """An MoE target with a dense Qwen3 draft of the same vocabulary, and an MoE draft close to the target."""
    from megatron_soaes.inference.model import Qwen2ForInference, load_inference_model, load_weights
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("dense-draft")
    make_random_hf_model(d, "test-qwen3", seed=7, num_layers=2)
    cfg, w = load_weights(moe_models["renorm"] / "hf")
    g = torch.Generator().manual_seed(3)
    near = Qwen2ForInference(cfg, {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) for k, v in w.items()})
    return load_inference_model(moe_models["renorm"] / "hf"), load_inference_model(d), near


def test_speculative_decoding_with_an_moe_target_is_lossless(moe_pair):
    """Greedy speculative output equals target-only greedy for an MoE target: chain, static tree and dynamic
    tree, with a dense draft (rejects nearly everything) and an MoE draft (accepted often), ragged batch."""
    from megatron_soaes.inference import generate
    from megatron_soaes.speculative.decode import SpecConfig, speculative_generate

    target, dense, near = moe_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1024, (int(n),), generator=g).tolist() for n in (30, 1, 3, 9, 17)]
    ref = generate(target, prompts, 24)
    for spec in (SpecConfig("chain", gamma=4), SpecConfig("tree", branching=(3, 2, 1)),
                 SpecConfig("dynamic", topk=3, depth=4, budget=12)):
        assert speculative_generate(target, dense, prompts, 24, spec).tokens == ref.tokens, spec
        out = speculative_generate(target, near, prompts, 24, spec)
        assert out.tokens == ref.tokens and out.tau > 1.5, spec


def test_tensor_parallel_moe_inference_equals_one_process(moe_models, tmp_path):
    """TP=2 (each expert's intermediate units split, the router replicated, one all-reduce per MLP) gives
    the TP=1 logits and tokens: greedy, sampling, chain and tree speculation with a dense draft."""
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "draft", "test-qwen3", seed=9, num_layers=2)
    out = tmp_path / "tp.json"
    torchrun(2, ROOT / "tests" / "workers" / "tp_generate.py", moe_models["renorm"] / "hf", tmp_path / "draft", out)
    for r in read_json(out):
        assert r["tp"] == 2 and r["logit_diff"] < TOL, r
        assert all(r[k] for k in ("greedy", "sampled", "chain", "tree", "chain_sampled", "tree_sampled")), r


@pytest.mark.parametrize("sets,error", [
    (["parallel.expert_parallel=3"], "expert parallel size 3 does not divide num_experts 128"),
    (["parallel.sequence_parallel=false"], "parallel.sequence_parallel: megatron-core's MoE layers need it"),
    (["model.preset=qwen3-8b"], "expert parallel size 8 given for a dense model"),
    (["parallel.expert_tensor_parallel=5"], "world size 96 is not divisible by expert TP*PP*EP = 5*1*8 = 40")])
def test_moe_layout_errors_are_one_line_before_any_work(sets, error):
    """The 30B-A3B CPT config with a broken layout: `--dry-run` refuses it naming the field."""
    from conftest import cli_in_process

    res = cli_in_process("train", "--config", ROOT / "examples" / "slurm" / "configs" / "cpt_qwen3_30b_a3b.yaml",
                         "--dry-run", "--world-size", "96", "--skip-path-check", "--set", "train.global_batch_size=384",
                         *[a for kv in sets for a in ("--set", kv)])
    assert res.returncode == 2 and error in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


# LoRA on the experts -------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def moe_adapter(moe_models, tmp_path_factory):
    """A random peft LoRA adapter (B not zero, rsLoRA) on the renorm MoE model, every projection targeted:
    peft turns gate_proj + up_proj + down_proj into adapters of transformers 5's fused expert tensors
    (`target_parameters`; gate_up_proj at rank 2r, alpha 2*alpha) and leaves the dense layer's MLP alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_models["renorm"] / "hf", dtype=torch.float32)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("moe_lora") / "adapter"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False,
                                     use_rslora=True)).save_pretrained(out)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert sorted(conf["target_parameters"]) == ["down_proj", "gate_up_proj"]  # what the test is about
    return out


def test_lora_on_experts_matches_peft(moe_models, moe_adapter, tmp_path):
    """Base + adapter (attention and every expert) on megatron-core against peft on transformers: logits and
    one training step's loss and every adapter gradient within 1e-5, as the base's above (experts split over EP ranks and
    over the expert-TP ranks, whose whole factor's gradient is summed across them), no gradient on the base.
    One layout, TP 2 with SP x EP 2 x expert-TP 2 on 4 processes: every sharding the adapters have at once."""
    out = tmp_path / "r.json"
    torchrun(4, ROOT / "tests" / "workers" / "moe_vs_hf.py", moe_models["renorm"] / "hf", moe_models["renorm"] / "mc",
             2, 1, 2, 2, out, moe_adapter)
    ranks = read_json(out)
    last = [r for r in ranks if r["last_stage"]]
    assert last and all(r["logits_compared"] == 4 and r["max_logit_diff"] < TOL for r in last), ranks
    assert all(abs(r["loss"] - r["ref_loss"]) < TOL for r in last), ranks
    assert all(r["frozen_with_grad"] == [] and r["trainable"] > 0 for r in ranks), ranks
    # 4 layers x 4 attention projections + 3 sparse layers x 2 expert tensors, A and B each
    r = ranks[0]
    assert r["adapter_tensors"] == 2 * (4 * 4 + 3 * 2) and r["max_adapter_grad_diff"] < TOL * max(1.0, r["max_adapter_grad"]), r


def test_expert_adapter_round_trip_and_merge(moe_models, moe_adapter, tmp_path):
    """peft -> our adapter checkpoint -> peft is bit-exact (names, config, values); merged into the base, it
    gives peft's base + adapter logits, and only the adapted tensors changed (the dense layer's MLP did not)."""
    from safetensors.torch import load_file

    from megatron_soaes.adapters import base_identity
    from megatron_soaes.adapters.merge import merge_adapter
    from megatron_soaes.adapters.peft_io import adapter_max_rank, from_peft, to_peft
    from megatron_soaes.checkpoint.compare import hf_logits, logit_stats
    from megatron_soaes.checkpoint.convert import megatron_to_hf
    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.models import Qwen2Config

    hf, mc = moe_models["renorm"] / "hf", moe_models["renorm"] / "mc"
    ours = from_peft(moe_adapter, Qwen2Config.from_hf(hf), tmp_path / "ours", base=base_identity(mc))
    back = to_peft(ours, tmp_path / "back")
    a, b = load_file(moe_adapter / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    c0, c1 = (json.loads((d / "adapter_config.json").read_text()) for d in (moe_adapter, back))
    for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert c0[k] == c1[k], k
    assert sorted(c0["target_modules"]) == sorted(c1["target_modules"])
    assert sorted(t.split(".")[-1] for t in c1["target_parameters"]) == sorted(c0["target_parameters"])
    assert adapter_max_rank(back) == 2 * c1["r"]  # the engines' max LoRA rank (serve-check): the experts' gate_up
    # what cannot be converted is one line, nothing written: a tensor the model has no adapter for (here the
    # dense layer's MLP, which peft leaves alone too), transformers 4's per-expert layout
    import shutil

    from safetensors.torch import save_file

    from megatron_soaes.adapters.peft_io import AdapterError

    cfg = Qwen2Config.from_hf(hf)
    for extra, msg in (("model.layers.1.mlp.down_proj", "tensors this model has no adapter for"),
                       ("model.layers.0.mlp.experts.3.down_proj", "transformers 4's layout")):
        bad = tmp_path / "bad"
        shutil.copytree(moe_adapter, bad, dirs_exist_ok=True)
        save_file({**a, f"base_model.model.{extra}.lora_A.weight": torch.zeros(4, 48)}, str(bad / "adapter_model.safetensors"))
        with pytest.raises(AdapterError, match=msg):
            from_peft(bad, cfg, tmp_path / "not_written")
        assert not (tmp_path / "not_written").exists()

    merged = merge_adapter(mc, ours, tmp_path / "merged", progress=False)
    megatron_to_hf(merged, tmp_path / "merged_hf", progress=False)
    toks = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = logit_stats(hf_logits(tmp_path / "merged_hf", toks), hf_logits(hf, toks, moe_adapter))
    assert stats["max_abs_diff"] < TOL and stats["top1_agreement"] == 1.0, stats
    base, m = DcpReader(mc), DcpReader(merged)
    changed = {k for k in base.keys() if not torch.equal(base.read(k), m.read(k))}
    want = {f"decoder.layers.{i}.self_attention.{n}.weight" for i in range(4) for n in ("linear_qkv", "linear_proj")}
    want |= {f"decoder.layers.{i}.mlp.experts.experts.linear_fc{j}.weight" for i in (0, 2, 3) for j in (1, 2)}
    assert changed == want, sorted(changed ^ want)


def test_lora_training_on_moe_at_ep2_resumes_at_ep1_and_exports(cpt_data, tmp_path):
    """A LoRA CPT job on an MoE base at EP=2: only adapters train and are saved (expert adapters by global
    index); its step-8 adapter checkpoint resumes on one process at EP=1 with the same losses; the trained
    adapter exports as base + HF PEFT adapter that peft loads to the merged model's logits."""
    import shutil

    import yaml

    from test_cpt import losses, write_config

    from megatron_soaes.adapters.merge import merge_adapter
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.checkpoint.manifest import read_manifest
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.workflows.export import check_adapter_export, export_adapter, export_hf

    make_random_hf_model(tmp_path / "hf", "test-moe", seed=5, vocab_size=4096)
    base = hf_to_megatron(tmp_path / "hf", tmp_path / "base", progress=False)

    def cfg(out, **parallel):
        path = write_config(cpt_data, out, steps=16)
        c = yaml.safe_load(path.read_text())
        c["model"] = {"preset": "test-moe", "overrides": {"vocab_size": 4096}, "init_checkpoint": str(base)}
        c["peft"] = {"rank": 4, "alpha": 8}
        c["optim"]["lr"] = 1e-2
        c["parallel"] = parallel
        path.write_text(yaml.safe_dump(c))
        return path

    ref = tmp_path / "ep2"
    res = torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg(ref, expert_parallel=2))
    assert "peft: LoRA r=4" in res.stdout + res.stderr
    full = losses(ref)
    assert full[16] < full[1]
    ck = ref / "checkpoints" / "iter_0000016"
    tensors = read_manifest(ck)["tensors"]
    assert all(".lora_" in k for k in tensors if not k.startswith("optimizer."))
    assert {"decoder.layers.0.mlp.experts.experts.linear_fc1.lora_A",
            "decoder.layers.3.mlp.experts.experts.linear_fc2.lora_B"} <= set(tensors)
    run = tmp_path / "ep1"
    shutil.copytree(ref / "checkpoints" / "iter_0000008", run / "checkpoints" / "iter_0000008")
    torchrun(1, ROOT / "megatron_soaes" / "cli.py", "train", "--config", cfg(run))
    got = losses(run)
    assert sorted(got) == list(range(9, 17)) and all(got[s] == pytest.approx(full[s], abs=2e-4) for s in got), got

    tok = str(cpt_data / "spm.model")
    paths = export_adapter(ck, base, tmp_path / "export" / "lora", tok)
    merged = export_hf(merge_adapter(base, ck, tmp_path / "merged", progress=False), tmp_path / "export" / "merged",
                       tok, dtype=None)
    res = check_adapter_export(paths["base"], paths["adapter"], merged)
    assert res["max_rel_logit_diff_vs_merged"] < 1e-5 and res["top1_agreement"] == 1.0, res
