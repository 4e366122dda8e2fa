"""Model families beyond Qwen2.5: Qwen3 (dense: no q/k/v bias, per-head q/k RMSNorm, explicit head_dim)
and Llama 3.x (no biases, Llama 3 RoPE scaling) through conversion, the megatron model (TP/PP), the
inference model and speculative decoding, each against random-initialised `transformers` models."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, read_json, torchrun

TOL = 1e-5


FAMILIES = {"qwen3": ("test-qwen3", "Qwen3ForCausalLM"), "llama3": ("test-llama3", "LlamaForCausalLM")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """{"tied": dir, "untied": dir, "arch": ...}: random HF models of the family (transformers builds them)."""
    from megatron_soaes.models.random_init import make_random_hf_model

    preset_name, arch = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    out = {"arch": arch, "name": request.param}
    for name, tied in (("tied", True), ("untied", False)):
        make_random_hf_model(d / name, preset_name, seed=3 + tied, tie_word_embeddings=tied)
        out[name] = d / name
    cfg = json.loads((out["tied"] / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    if arch == "Qwen3ForCausalLM":  # head_dim is not hidden / heads
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    return out


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("qwen3")
    make_random_hf_model(d / "tied", "test-qwen3", seed=4, tie_word_embeddings=True)
    return {"tied": d / "tied"}


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_megatron_and_inference_logits_equal_hf(family, name):
    from megatron_soaes.checkpoint.compare import compare_logits, hf_logits
    from megatron_soaes.inference import load_inference_model

    stats = compare_logits(family[name], 1, 1, seq_len=96)  # beyond the test Llama's original 64 positions
    assert stats["max_abs_diff"] < TOL and stats["top1_agreement"] == 1.0
    m = load_inference_model(family[name])
    toks = torch.randint(0, m.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    ours = m.forward(toks, torch.arange(96).expand(2, 96), m.new_cache(2, 100))
    assert (ours - hf_logits(family[name], toks)).abs().max() < TOL


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_two_processes(family, tmp_path, tp, pp):
    out = tmp_path / "stats.json"
    torchrun(2, ROOT / "tools" / "compare_logits.py", "--hf", family["untied"], "--tp", tp, "--pp", pp, "--seq-len", 96,
             "--json", out)
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


def test_round_trip_at_tp2_pp2_is_bit_exact(family, tmp_path):
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.checkpoint.meta import read_meta
    from megatron_soaes.models import Qwen2Config

    hf_to_megatron(family["untied"], tmp_path / "mc", 2, 2, progress=False)
    assert read_meta(tmp_path / "mc")["architecture"] == family["arch"]
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    a, b = load_file(family["untied"] / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and not any(k.endswith("q_proj.bias") for k in a)
    assert any("q_norm" in k for k in a) == (family["arch"] == "Qwen3ForCausalLM")
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == [family["arch"]] and back["attention_bias"] is False
    same = lambda c: dataclasses.replace(c, extra_hf={})  # noqa: E731  (the model, not the file's dtype)
    assert same(Qwen2Config.from_hf(tmp_path / "back")) == same(Qwen2Config.from_hf(family["untied"]))


def test_speculative_greedy_equals_target_greedy(family):
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.speculative import SpecConfig, speculative_generate

    target, draft = load_inference_model(family["untied"]), load_inference_model(family["tied"])
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
        Qwen2Config.from_hf({**cfg, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"})
    with pytest.raises(ModelConfigError, match="missing field 'num_experts'"):  # MoE: test_moe.py
        Qwen2Config.from_hf({**cfg, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"})
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        Qwen2Config.from_hf({**cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert Path(bad).exists()


def test_llama3_rope_scaling_is_read_from_either_format_and_matters(tmp_path):
    """Released Llama 3.1 configs write `rope_scaling` + `rope_theta`; transformers 5 writes `rope_parameters`.
    The scaling changes the model (so the logit tests above exercise it)."""
    from megatron_soaes.checkpoint.compare import hf_logits
    from megatron_soaes.models import ModelConfigError, Qwen2Config, preset
    from megatron_soaes.models.random_init import make_random_hf_model

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    released = {**preset("llama3.1-8b").to_hf(), "rope_scaling": scaling, "rope_theta": 500000.0}
    released.pop("rope_parameters", None)
    assert dataclasses.replace(Qwen2Config.from_hf(released), extra_hf={}) == preset("llama3.1-8b")
    with pytest.raises(ModelConfigError, match="supported rope types are llama3 and yarn"):
        Qwen2Config.from_hf({**released, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(ModelConfigError, match=r"rope_scaling yarn needs \['original_max_position_embeddings'\]"):
        Qwen2Config.from_hf({**released, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelConfigError, match=r"rope_scaling yarn: keys \['mscale'\] are not supported"):
        Qwen2Config.from_hf({**released, "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 0.7,
                                                          "original_max_position_embeddings": 8192}})
    make_random_hf_model(tmp_path / "scaled", "test-llama3", seed=0)
    make_random_hf_model(tmp_path / "plain", "test-llama3", seed=0, rope_scaling=None)
    toks = torch.randint(0, 1024, (1, 96), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(tmp_path / "scaled", toks) - hf_logits(tmp_path / "plain", toks)).abs().max() > 1e-3



# Total parameters on the model cards (Qwen2.5, Qwen3 dense, Llama 3.1 / 3.2), in billions.
PUBLISHED = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.61, "qwen2.5-72b": 72.7,
             "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8,
             "llama3.1-8b": 8.03, "llama3.1-70b": 70.6, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_parameter_counts(name):
    from megatron_soaes.models import preset

    cfg = preset(name)
    assert cfg.num_parameters() / 1e9 == pytest.approx(PUBLISHED[name], rel=0.02)  # cards round to 2-3 digits
    assert cfg.to_hf()["architectures"] == [cfg.architecture]


def test_mixed_family_draft_and_target_are_refused(cpt_data, tmp_path, capsys):
    """A Llama draft for a Qwen3 target: refused by the decoder, by `soaes distill` (the student is the
    future draft) before any model is built, and by the export pair check -- one line each."""
    import yaml

    from megatron_soaes.cli import main
    from megatron_soaes.inference import load_inference_model
    from megatron_soaes.models.config import ModelConfigError
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.speculative import speculative_generate
    from megatron_soaes.workflows.export import ExportError, check_pair

    for name in ("test-qwen3", "test-llama3"):
        make_random_hf_model(tmp_path / name, name, seed=0)
        (tmp_path / name / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="draft is a llama model .* but the target is qwen3"):
        speculative_generate(load_inference_model(tmp_path / "test-qwen3"), load_inference_model(tmp_path / "test-llama3"),
                             [[1, 2, 3]], 4)
    with pytest.raises(ExportError, match="is a llama model .* but the target is qwen3 .*: draft and target must be one family"):
        check_pair(tmp_path / "test-qwen3", tmp_path / "test-llama3")
    v = {"overrides": {"vocab_size": 4096}}
    job = {"kind": "distill", "model": {"preset": "test-llama3", **v},
           "data": {"tokenizer": str(cpt_data / "spm.model"), "seq_length": 64,
                    "train": [{"path": str(cpt_data / "domain.train")}]},
           "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "output_dir": str(tmp_path / "o")},
           "distill": {"teacher": {"preset": "test-qwen3", **v, "checkpoint": str(tmp_path / "nowhere")}}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert main(["distill", "--config", str(tmp_path / "d.yaml"), "--dry-run", "--skip-path-check"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "the student) is a llama model" in err[0] and "the target is qwen3" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["test", "test-qwen3"])
def test_yarn_long_context_matches_hf(name, tmp_path):
    """YaRN as Qwen documents it (`{"type": "yarn", "factor": 4, "original_max_position_embeddings"}`):
    interpolated low frequencies and the 0.1 ln(factor) + 1 attention factor, in megatron (RoPE
    frequencies + megatron's own YaRN cos/sin scale) and the inference model, equal to HF beyond the
    original context; the scaling changes the model, and survives conversion both ways."""
    from megatron_soaes.checkpoint.compare import compare_logits, hf_logits
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.inference import load_inference_model
    from megatron_soaes.models import Qwen2Config
    from megatron_soaes.models.random_init import make_random_hf_model

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    make_random_hf_model(tmp_path / "yarn", name, seed=0, rope_scaling=yarn)
    make_random_hf_model(tmp_path / "plain", name, seed=0)
    toks = torch.randint(0, 1024, (1, 96), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(tmp_path / "yarn", toks)
    assert (ref - hf_logits(tmp_path / "plain", toks)).abs().max() > 1e-3
    assert compare_logits(tmp_path / "yarn", 1, 1, seq_len=96)["max_abs_diff"] < TOL
    m = load_inference_model(tmp_path / "yarn")
    assert (m.forward(toks, torch.arange(96)[None], m.new_cache(1, 96)) - ref).abs().max() < TOL
    hf_to_megatron(tmp_path / "yarn", tmp_path / "mc", progress=False)
    megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    back = Qwen2Config.from_hf(tmp_path / "back")
    assert back.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "beta_fast": 32.0, "beta_slow": 1.0}
