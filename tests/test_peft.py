"""LoRA on megatron-core (adapters/) against peft: logits of base + adapter at TP 1, TP 2 (with and without
sequence parallelism) and PP 2, exact adapter round trips, and the base frozen in training."""

import json

import pytest
import torch

from conftest import ROOT

TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama3": ["q_proj", "v_proj", "down_proj"],  # a subset: parts of the fused layers left out
           "qwen2-dora": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}  # DoRA, fused layers in part


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """Random HF Qwen2 and Llama models, each with a random peft LoRA adapter (B not zero), and a random DoRA
    adapter on the Qwen2 model (its magnitudes moved off the weight norms they start at, so m / ||W + s B A||
    is not 1 and the test sees DoRA's rescaling)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from megatron_soaes.models.random_init import make_random_hf_model

    out = {}
    base = tmp_path_factory.mktemp("peft")
    for family, preset in (("qwen2", "test"), ("llama3", "test-llama3"), ("qwen2-dora", None)):
        hf = base / family.removesuffix("-dora")
        if preset:
            make_random_hf_model(hf, preset, seed=3, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        torch.manual_seed(1)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                                              use_rslora=family == "llama3", use_dora=family.endswith("dora")))
        pm.save_pretrained(base / f"{family}-adapter")
        if family.endswith("dora"):
            f = base / f"{family}-adapter" / "adapter_model.safetensors"
            w = load_file(f)
            g = torch.Generator().manual_seed(2)
            w = {k: v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if "magnitude" in k else v for k, v in w.items()}
            save_file(w, str(f), metadata={"format": "pt"})
        out[family] = (hf, base / f"{family}-adapter")
    return out


# every layout once and both families (Llama: some projections, rsLoRA) -- not the full product, for CI time
@pytest.mark.parametrize("family,layout", [("qwen2", "tp1"), ("qwen2", "tp2-sp"), ("qwen2", "pp2"), ("llama3", "tp2"),
                                           ("qwen2-dora", "tp2-sp")])
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
        per_target = 3 if family.endswith("dora") else 2  # A, B (and DoRA's magnitude)
        assert set(a) == set(b) and len(a) == per_target * len(TARGETS[family]) * cfg.num_layers
        assert all(torch.equal(a[k], b[k]) for k in a)
        conf = json.loads((back / "adapter_config.json").read_text())
        assert sorted(conf["target_modules"]) == sorted(TARGETS[family]) and conf["r"] == 4
        assert conf["use_dora"] == family.endswith("dora")


def test_dora_merge_gives_base_plus_adapter_logits(peft_pair, tmp_path):
    """A DoRA adapter merged into its base (each adapted row scaled by m / ||W + s B A||, the rows of a fused
    layer's unadapted part left alone) gives peft's logits for base + adapter."""
    from megatron_soaes.adapters import base_identity
    from megatron_soaes.adapters.merge import merge_adapter
    from megatron_soaes.adapters.peft_io import from_peft
    from megatron_soaes.checkpoint.compare import hf_logits, logit_stats
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.models import Qwen2Config

    hf, adapter = peft_pair["qwen2-dora"]
    base = hf_to_megatron(hf, tmp_path / "base", progress=False)
    ours = from_peft(adapter, Qwen2Config.from_hf(hf), tmp_path / "ad", base=base_identity(base))
    megatron_to_hf(merge_adapter(base, ours, tmp_path / "merged", progress=False), tmp_path / "merged_hf", progress=False)
    tokens = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(5))
    stats = logit_stats(hf_logits(tmp_path / "merged_hf", tokens), hf_logits(hf, tokens, adapter))
    assert stats["max_abs_diff"] < 1e-5 and stats["top1_agreement"] == 1.0, stats


def test_lora_training_checkpoints_adapters_only_and_resumes_exactly(cpt_data, tmp_path):
    """A CPT job with a peft section: only the adapters train and are saved (with their optimizer state),
    a small fraction of a full checkpoint; a rerun from the step-8 adapter checkpoint continues the same
    losses bit for bit; resuming on another base is a one-line error."""
    import shutil
    import subprocess
    import sys

    from conftest import job_env
    from test_cpt import losses, write_config

    from megatron_soaes.checkpoint.manifest import read_manifest

    def run(cfg, *sets):
        cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(cfg)]
        for s in sets:
            cmd += ["--set", s]
        return subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)

    bases = {}
    for seed in (1, 2):
        out = tmp_path / f"base{seed}"
        assert run(write_config(cpt_data, out, steps=4, save_interval=0, seed=seed)).returncode == 0
        bases[seed] = out / "checkpoints" / "iter_0000004"
    peft = ["peft.rank=4", "peft.alpha=8"]
    lora = tmp_path / "lora"
    cfg = write_config(cpt_data, lora, steps=16)
    res = run(cfg, f"model.init_checkpoint={bases[1]}", *peft)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "peft: LoRA r=4" in res.stdout + res.stderr
    full = losses(lora)
    ck = lora / "checkpoints" / "iter_0000016"
    m_lora, m_base = read_manifest(ck), read_manifest(bases[1])
    assert set(m_lora["tensors"]) and all(".lora_" in k or k.startswith("optimizer.") for k in m_lora["tensors"])
    assert all(".lora_" in k for k in m_lora["tensors"] if not k.startswith("optimizer."))
    assert m_lora["total_bytes"] < 0.1 * m_base["total_bytes"], (m_lora["total_bytes"], m_base["total_bytes"])

    resumed = tmp_path / "resumed"
    shutil.copytree(lora / "checkpoints" / "iter_0000008", resumed / "checkpoints" / "iter_0000008")
    res = run(write_config(cpt_data, resumed, steps=16), f"model.init_checkpoint={bases[1]}", *peft)
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(resumed)
    assert [got[s] for s in range(9, 17)] == [full[s] for s in range(9, 17)]

    # the adapter checkpoint reshards: resumed at TP 2 with sequence parallelism (adapters and their
    # optimizer state split the other way), the same losses up to TP's summation order
    from conftest import torchrun

    tp = tmp_path / "tp2"
    shutil.copytree(lora / "checkpoints" / "iter_0000008", tp / "checkpoints" / "iter_0000008")
    torchrun(2, ROOT / "megatron_soaes" / "cli.py", "train", "--config", write_config(cpt_data, tp, steps=16),
             "--set", f"model.init_checkpoint={bases[1]}", *[a for kv in peft for a in ("--set", kv)],
             "--set", "parallel.tensor_parallel=2", "--set", "parallel.sequence_parallel=true")
    got = losses(tp)
    assert sorted(got) == list(range(9, 17)) and all(got[s] == pytest.approx(full[s], abs=2e-4) for s in got), got

    other = tmp_path / "other"
    shutil.copytree(lora / "checkpoints" / "iter_0000008", other / "checkpoints" / "iter_0000008")
    res = run(write_config(cpt_data, other, steps=16), f"model.init_checkpoint={bases[2]}", *peft)
    assert res.returncode == 2 and "was trained on the base" in res.stderr and str(bases[1]) in res.stderr, res.stderr[-2000:]


def test_dora_job_starts_as_its_base_and_trains(cpt_data, tmp_path):
    """A CPT job with peft.dora: the magnitudes start at the loaded base's row norms, so step 1's loss is plain
    LoRA's (both compute the base then); the magnitudes train, and the adapter exports as a peft DoRA adapter."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import job_env
    from test_cpt import losses, write_config

    from megatron_soaes.adapters.peft_io import to_peft
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "hf", "test", seed=4, vocab_size=4096)
    base = hf_to_megatron(tmp_path / "hf", tmp_path / "base", progress=False)
    runs = {}
    for name, dora in (("lora", "false"), ("dora", "true")):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(write_config(cpt_data, out, steps=4)),
               "--set", f"model.init_checkpoint={base}", "--set", "peft.rank=4", "--set", f"peft.dora={dora}"]
        res = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = losses(out)
    assert runs["dora"][1] == pytest.approx(runs["lora"][1], abs=1e-5) and runs["dora"][4] != runs["lora"][4], runs
    adapter = load_file(to_peft(tmp_path / "dora" / "checkpoints" / "iter_0000004", tmp_path / "peft") /
                        "adapter_model.safetensors")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj"
    m = adapter[f"base_model.model.{key}.lora_magnitude_vector"]
    assert m.shape == (64,) and not torch.allclose(m, hf[f"{key}.weight"].norm(dim=1), atol=1e-6)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    # continuing a plain LoRA adapter as DoRA: refused in one line before any step
    cmd += ["--set", f"model.init_adapter={tmp_path / 'lora' / 'checkpoints' / 'iter_0000004'}",
            "--set", f"train.output_dir={tmp_path / 'mixed'}"]
    res = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "this adapter has peft.dora=False, the job's peft section says True" in res.stderr, \
        res.stderr[-2000:]


@pytest.mark.parametrize("family,layout", [("qwen2", "tp1"), ("qwen2", "tp2-sp"), ("qwen2-dora", "tp2-sp")])
def test_lora_training_step_equals_peft(peft_pair, tmp_path, family, layout):
    """Loss and every adapter gradient (DoRA: and every magnitude's) of one step equal peft's (1e-6); the base
    gets no gradient."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import torchrun
    from megatron_soaes.adapters.peft_io import to_peft

    hf, adapter = peft_pair[family]
    args = ["--tp", "1"] if layout == "tp1" else ["--tp", "2", "--sp"]
    torchrun(1 if layout == "tp1" else 2, ROOT / "tests" / "lora_step.py", "--hf", hf, "--adapter", adapter,
             "--out", tmp_path, *args)
    ours = json.loads((tmp_path / "loss.json").read_text())
    assert ours["frozen_with_grad"] == [] and all(".lora_" in n for n in ours["trainable"])
    grads = load_file(to_peft(tmp_path / "grads", tmp_path / "grads_peft") / "adapter_model.safetensors")

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), adapter,
                                      is_trainable=True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert abs(loss.item() - ours["loss"]) < 1e-6, (loss.item(), ours["loss"])
    ref = {n.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector"): p.grad
           for n, p in model.named_parameters() if p.requires_grad}  # peft's saved names
    assert set(ref) == set(grads)
    worst = max((ref[k] - grads[k]).abs().max().item() for k in ref)
    assert worst < 1e-6, worst


def test_merge_gives_base_plus_adapter_logits(peft_pair, tmp_path):
    """`soaes peft from-hf` then `soaes peft merge`: the merged full checkpoint, converted to HF, gives
    peft's base + adapter logits; an adapter checkpoint made for one base is refused on another."""
    import subprocess
    import sys

    from conftest import job_env
    from megatron_soaes.checkpoint.compare import hf_logits, logit_stats

    hf, adapter = peft_pair["qwen2"]
    soaes = lambda *a: subprocess.run([sys.executable, "-m", "megatron_soaes.cli", *map(str, a)], env=job_env(),  # noqa: E731
                                      cwd=ROOT, capture_output=True, text=True)
    for args in (("convert", "hf-to-megatron", hf, tmp_path / "base", "--tp", "2"),
                 ("peft", "from-hf", "--adapter", adapter, "--base", tmp_path / "base", "--out", tmp_path / "ad"),
                 ("peft", "merge", "--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "merged"),
                 ("convert", "megatron-to-hf", tmp_path / "merged", tmp_path / "merged_hf")):
        res = soaes(*args)
        assert res.returncode == 0, (args, res.stderr[-2000:])
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (hf / f).exists():
            shutil.copy(hf / f, tmp_path / "merged_hf" / f)
    tokens = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(5))
    stats = logit_stats(hf_logits(tmp_path / "merged_hf", tokens), hf_logits(hf, tokens, adapter))
    assert stats["max_abs_diff"] < 1e-5 and stats["top1_agreement"] == 1.0, stats
    other_hf = peft_pair["llama3"][0]
    res = soaes("convert", "hf-to-megatron", other_hf, tmp_path / "other")
    assert res.returncode == 0
    res = soaes("peft", "merge", "--base", tmp_path / "other", "--adapter", tmp_path / "ad", "--out", tmp_path / "bad")
    assert res.returncode == 2 and "was trained on the base" in res.stderr and not (tmp_path / "bad").exists()


def test_lora_curriculum_continues_the_adapter(small_sft, cpt_data, tmp_path):
    """The SFT curriculum with a peft section: every stage trains an adapter on the same frozen base, stage
    k starting from stage k-1's adapter; each stage publishes the base with its adapter merged (what its QA
    evaluation and later phases read), and that merge differs from the base only in the adapted linears."""
    from test_sft import write_recipe

    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.meta import read_meta
    from megatron_soaes.config.curriculum import load_recipe
    from megatron_soaes.workflows.curriculum import run_curriculum

    out = tmp_path / "lora"
    path = write_recipe(small_sft, cpt_data / "spm.model", out)
    import yaml

    recipe = yaml.safe_load(path.read_text())
    recipe["job"]["peft"] = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    logs = []
    recs = run_curriculum(load_recipe(path), log=logs.append)
    assert [r.stage for r in recs] == [1, 2, 3] and all(r.qa for r in recs)
    assert any("with the adapter" in line and "stage1_consultation" in line for line in logs)
    assert all(r.init_checkpoint == str(small_sft / "base") for r in recs)
    for r in recs:
        meta = read_meta(r.adapter)
        assert meta["adapter"]["rank"] == 4 and meta["base"]["path"] == str(small_sft / "base")
    base, merged = DcpReader(small_sft / "base"), DcpReader(recs[-1].checkpoint)
    for key in base.keys():
        same = torch.equal(base.read(key), merged.read(key))
        assert same != (key.endswith(("linear_qkv.weight", "linear_fc2.weight"))), key
    a1, a3 = DcpReader(recs[0].adapter), DcpReader(recs[2].adapter)
    k = "decoder.layers.self_attention.linear_qkv.lora_B"
    assert not torch.equal(a1.read(k), a3.read(k))  # stage 3 went on training stage 1's adapter
    # export: the last stage as its base + an HF PEFT adapter; peft gives the merged export's logits, and
    # an adapter that is not what was trained (one B scaled) is refused
    from safetensors.torch import load_file, save_file

    from megatron_soaes.workflows.export import ExportError, check_adapter_export, export_adapter, export_hf

    tok = str(cpt_data / "spm.model")
    paths = export_adapter(recs[-1].adapter, recs[-1].init_checkpoint, tmp_path / "export" / "lora", tok)
    merged_hf = export_hf(recs[-1].checkpoint, tmp_path / "export" / "merged", tok, dtype=None)
    res = check_adapter_export(paths["base"], paths["adapter"], merged_hf)
    assert res["max_rel_logit_diff_vs_merged"] < 1e-5 and res["top1_agreement"] == 1.0, res
    f = tmp_path / "export" / "lora" / "adapter" / "adapter_model.safetensors"
    w = load_file(f)
    key = next(k for k in w if k.endswith("v_proj.lora_B.weight"))
    w[key] = w[key] * 3
    save_file(w, str(f))
    with pytest.raises(ExportError, match="differ from the merged export"):
        check_adapter_export(paths["base"], paths["adapter"], merged_hf)
