"""LoRA on megatron-core (adapters/) against peft: logits of base + adapter at TP 1, TP 2 (with and without
sequence parallelism) and PP 2, exact adapter round trips, and the base frozen in training."""

import json

import pytest
import torch

from conftest import ROOT

TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama3": ["q_proj", "v_proj", "down_proj"]}  # a subset: parts of the fused layers left out


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """Random HF Qwen2 and Llama models, each with a random peft LoRA adapter (B not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_soaes.models.random_init import make_random_hf_model

    out = {}
    base = tmp_path_factory.mktemp("peft")
    for family, preset in (("qwen2", "test"), ("llama3", "test-llama3")):
        hf = base / family
        make_random_hf_model(hf, preset, seed=3, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        torch.manual_seed(1)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                                              init_lora_weights=False, use_rslora=family == "llama3"))
        pm.save_pretrained(base / f"{family}-adapter")
        out[family] = (hf, base / f"{family}-adapter")
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2-sp", "pp2"])
def test_lora_logits_equal_peft(peft_pair, tmp_path, family, layout):
    from conftest import torchrun

    hf, adapter = peft_pair[family]
    args = {"tp1": ["--tp", "1"], "tp2": ["--tp", "2"], "tp2-sp": ["--tp", "2", "--sp"], "pp2": ["--pp", "2"]}[layout]
    world = 1 if layout == "tp1" else 2
    torchrun(world, ROOT / "megatron_soaes" / "cli.py", "compare-logits", "--hf", hf, "--adapter", adapter,
             "--json", tmp_path / "stats.json", *args)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["max_abs_diff"] < 1e-5 and stats["top1_agreement"] == 1.0, stats


def test_adapter_round_trip_is_exact(peft_pair, tmp_path):
    """peft -> megatron-soaes adapter checkpoint -> peft, bit for bit (fused q/k/v and gate/up included)."""
    from safetensors.torch import load_file

    from megatron_soaes.adapters.peft_io import from_peft, to_peft
    from megatron_soaes.models import Qwen2Config

    for family, (hf, adapter) in peft_pair.items():
        cfg = Qwen2Config.from_hf(hf)
        ours = from_peft(adapter, cfg, tmp_path / family / "ours")
        back = to_peft(ours, tmp_path / family / "back")
        a, b = load_file(adapter / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
        assert set(a) == set(b) and len(a) == 2 * len(TARGETS[family]) * cfg.num_layers
        assert all(torch.equal(a[k], b[k]) for k in a)
        conf = json.loads((back / "adapter_config.json").read_text())
        assert sorted(conf["target_modules"]) == sorted(TARGETS[family]) and conf["r"] == 4
