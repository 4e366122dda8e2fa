"""Model families beyond Qwen2.5: Qwen3 (dense: no q/k/v bias, per-head q/k RMSNorm, explicit head_dim)
through conversion, the megatron model (TP/PP), the inference model and speculative decoding, each
against random-initialised `transformers` Qwen3ForCausalLM models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, read_json, torchrun

TOL = 1e-5


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("qwen3")
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        make_random_hf_model(d / name, "test-qwen3", seed=3 + tied, tie_word_embeddings=tied)
        out[name] = d / name
    cfg = json.loads((out["tied"] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    return out


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_qwen3_megatron_and_inference_logits_equal_hf(qwen3, name):
    from megatron_soaes.checkpoint.compare import compare_logits, hf_logits
    from megatron_soaes.inference import load_inference_model

    stats = compare_logits(qwen3[name], 1, 1)
    assert stats["max_abs_diff"] < TOL and stats["top1_agreement"] == 1.0
    m = load_inference_model(qwen3[name])
    toks = torch.randint(0, m.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = m.forward(toks, torch.arange(20).expand(2, 20), m.new_cache(2, 24))
    assert (ours - hf_logits(qwen3[name], toks)).abs().max() < TOL


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_qwen3_logits_two_processes(qwen3, tmp_path, tp, pp):
    out = tmp_path / "stats.json"
    torchrun(2, ROOT / "tools" / "compare_logits.py", "--hf", qwen3["untied"], "--tp", tp, "--pp", pp, "--json", out)
    stats = read_json(out)
    assert stats["max_abs_diff"] < TOL and stats["top1_agreement"] == 1.0


def test_qwen3_train_step_gradients_at_tp2_equal_hf(qwen3, tmp_path):
    """q/k norm weights are shared by every head: their gradients are summed over the TP ranks' heads."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron

    hf_to_megatron(qwen3["tied"], tmp_path / "mc", 2, 1, progress=False)
    out = tmp_path / "r.json"
    torchrun(2, ROOT / "tests" / "workers" / "train_step_vs_hf.py", qwen3["tied"], tmp_path / "mc", 2, 1, out)
    for r in read_json(out):
        assert r["compared"] > 0 and r["max_grad_diff"] < 1e-6, r
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5, r


def test_qwen3_round_trip_at_tp2_pp2_is_bit_exact(qwen3, tmp_path):
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.checkpoint.meta import read_meta

    hf_to_megatron(qwen3["untied"], tmp_path / "mc", 2, 2, progress=False)
    assert read_meta(tmp_path / "mc")["architecture"] == "Qwen3ForCausalLM"
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    a, b = load_file(qwen3["untied"] / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and any("q_norm" in k for k in a) and not any(k.endswith("q_proj.bias") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["Qwen3ForCausalLM"] and back["attention_bias"] is False


def test_qwen3_speculative_greedy_equals_target_greedy(qwen3):
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.speculative import SpecConfig, speculative_generate

    target, draft = load_inference_model(qwen3["untied"]), load_inference_model(qwen3["tied"])
    prompts = [[5, 9, 200, 7], [1], list(range(30, 52))]
    ref = generate(target, prompts, 16).tokens
    for spec in (SpecConfig("chain", gamma=3), SpecConfig("tree", branching=(2, 2, 1)), SpecConfig("dynamic", topk=2, depth=3, budget=6)):
        assert speculative_generate(target, draft, prompts, 16, spec).tokens == ref
        assert speculative_generate(target, target, prompts, 16, spec).tokens == ref


def test_qwen3_bad_input_is_a_one_line_error(qwen3, tmp_path):
    import shutil

    from megatron_soaes.checkpoint.convert import ConversionError, hf_to_megatron
    from megatron_soaes.models import ModelConfigError, Qwen2Config

    bad = tmp_path / "no_qnorm"
    shutil.copytree(qwen3["tied"], bad)
    w = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in w.items() if "q_norm" not in k}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor model\.layers\.\d\.self_attn\.q_norm\.weight"):
        hf_to_megatron(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    cfg = json.loads((qwen3["tied"] / "config.json").read_text())
    with pytest.raises(ModelConfigError, match="unknown architecture"):
        Qwen2Config.from_hf({**cfg, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"})
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        Qwen2Config.from_hf({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert Path(bad).exists()
