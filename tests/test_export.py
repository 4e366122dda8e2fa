"""Export for inference: transformers' AutoTokenizer on the export gives our ids (byte-level BPE and
the real Qwen2.5 vocabulary), the config files agree on EOS/PAD, the chat template is training's,
a sentencepiece export is refused with the reason, and a draft that does not fit its target is
refused before any engine starts."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _docs(cpt_data, name, n):
    return [json.loads(x)["text"] for _, x in zip(range(n), open(cpt_data / "corpora" / f"{name}.jsonl", encoding="utf-8"))]


@pytest.fixture(scope="module")
def bpe(cpt_data, tmp_path_factory):
    from megatron_soaes.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("bpe")
    return train_bpe(_docs(cpt_data, "domain.train", 600) + _docs(cpt_data, "general.train", 600), d / "tokenizer.json",
                     vocab_size=2000)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random `test`-shaped models (2048-row embedding) in our format: a target and a shorter-context one."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.models.random_init import make_random_hf_model

    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, kw in (("target", {}), ("short", {"max_position_embeddings": 256})):
        make_random_hf_model(d / f"hf_{name}", "test", seed=1, vocab_size=2048, **kw)
        out[name] = hf_to_megatron(d / f"hf_{name}", d / name, progress=False)
    return out


def _conversations():
    return [[{"role": "user", "content": "企业国有资产属于谁所有？"}, {"role": "assistant", "content": "国家所有。"}],
            [{"role": "system", "content": "你是法律助手。"}, {"role": "user", "content": "What does 公司法 say? 第3条"}],
            [{"role": "user", "content": "多轮"}, {"role": "assistant", "content": "好"}, {"role": "user", "content": "继续"}]]


def test_bpe_export_tokenizes_like_us_in_transformers(cpt_data, bpe, checkpoints, tmp_path):
    from transformers import AutoTokenizer

    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.workflows.export import check_export, export_hf

    out = export_hf(checkpoints["target"], tmp_path / "target", str(bpe), dtype=None)
    res = check_export(out, texts=_docs(cpt_data, "domain.valid", 40) + _docs(cpt_data, "general.valid", 40),
                       conversations=_conversations())
    assert res["tokenizer_matches"] and res["tokenizer_class"] == "Qwen2Tokenizer" and res["tokenizer_texts"] >= 80
    assert res["max_abs_logit_diff_vs_source"] < 1e-4
    # the example: Chinese text is not dropped, and equals our ids
    hf, ours = AutoTokenizer.from_pretrained(str(out)), load_tokenizer(str(bpe))
    text = "企业国有资产属于国家所有。"
    assert hf(text).input_ids == ours.encode(text) and len(ours.encode(text)) > 3
    cfg, gen = (json.loads((out / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert cfg["eos_token_id"] == ours.stop_id and gen["eos_token_id"] == [ours.stop_id, ours.eod_id]
    assert cfg["pad_token_id"] == gen["pad_token_id"] == ours.eod_id and cfg["bos_token_id"] is gen["bos_token_id"] is None


def test_chat_template_carries_the_training_system_prompt(bpe, checkpoints, tmp_path):
    from transformers import AutoTokenizer

    from megatron_soaes.data.sft import Template
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.workflows.export import check_tokenizer, export_hf

    out = export_hf(checkpoints["target"], tmp_path / "t", str(bpe), dtype=None, default_system="You are a helpful assistant.")
    assert check_tokenizer(out, conversations=_conversations())["tokenizer_chat_prompts"] == 3
    conv = [{"role": "user", "content": "你好"}]
    text = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = Template("You are a helpful assistant.").render(conv, load_tokenizer(str(bpe)), for_generation=True)[0]
    assert load_tokenizer(str(bpe)).decode(ids) == text


def test_qwen_vocabulary_export_tokenizes_like_us(cpt_data, checkpoints, tmp_path):
    from megatron_soaes.workflows.export import check_tokenizer, export_hf

    out = export_hf(checkpoints["target"], tmp_path / "q", "qwen", dtype=None)
    res = check_tokenizer(out, texts=_docs(cpt_data, "domain.valid", 30) + ["e\u0301 composed later"],
                          conversations=_conversations())
    assert res["tokenizer_matches"] and res["tokenizer_class"] == "Qwen2Tokenizer"


@pytest.mark.parametrize("preset,vocab", [("test-llama3", "llama3"), ("test-qwen3", "qwen3")])
def test_family_vocabulary_exports(preset, vocab, tmp_path):
    """A Llama 3 / Qwen3 model with its published vocabulary: transformers loads the export as that
    family, gives our logits and our ids, renders training's chat format, and (Llama) adds BOS."""
    from transformers import AutoTokenizer

    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.workflows.export import check_export, export_hf

    tok = load_tokenizer(vocab)
    make_random_hf_model(tmp_path / "hf", preset, seed=1, vocab_size=tok.model_vocab_size, tie_word_embeddings=True)
    ckpt = hf_to_megatron(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    out = export_hf(ckpt, tmp_path / "out", vocab, dtype=None, default_system="你是法律助手。")
    res = check_export(out, conversations=_conversations())
    assert res["tokenizer_matches"] and res["max_abs_logit_diff_vs_source"] < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    hf = AutoTokenizer.from_pretrained(str(out))
    if vocab == "llama3":
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_scaling"]["rope_type"] == "llama3"
        assert hf("Hello world").input_ids == [128000, 9906, 1917]
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128009)
    else:
        assert cfg["architectures"] == ["Qwen3ForCausalLM"] and hf.convert_tokens_to_ids("<think>") == 151667
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (None, 151645)


def test_sentencepiece_export_is_exact_but_refused_for_engines(cpt_data, checkpoints, tmp_path):
    """The tokenizer.json is exactly the sentencepiece model (PreTrainedTokenizerFast), but transformers'
    AutoTokenizer loads every qwen2 tokenizer as a byte-level BPE: the check says so, with the fix."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    from megatron_soaes.workflows.export import ExportError, check_export, export_hf

    model = cpt_data / "spm.model"
    out = export_hf(checkpoints["target"], tmp_path / "s", str(model), dtype=None)
    sp, fast = spm.SentencePieceProcessor(model_file=str(model)), PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    for t in _docs(cpt_data, "domain.valid", 60) + ["Hello, 2024年 3.5% 😀\t x  y", "<|im_start|>user\n你好<|im_end|>"]:
        assert fast(t, add_special_tokens=False).input_ids == sp.encode(t)
    with pytest.raises(ExportError, match="sentencepiece model cannot be served that way: train with the byte-level BPE"):
        check_export(out)


def test_mismatched_draft_is_refused_before_any_engine(cpt_data, bpe, checkpoints, tmp_path):
    from megatron_soaes.data.tokenizer import train_bpe
    from megatron_soaes.workflows.export import export_hf

    other = train_bpe(_docs(cpt_data, "general.train", 300), tmp_path / "other.json", vocab_size=1500)
    target = export_hf(checkpoints["target"], tmp_path / "target", str(bpe), dtype=None)
    good = export_hf(checkpoints["target"], tmp_path / "good", str(bpe), dtype=None)
    bad_vocab = export_hf(checkpoints["target"], tmp_path / "bad_vocab", str(other), dtype=None)
    short = export_hf(checkpoints["short"], tmp_path / "short", str(bpe), dtype=None)

    def serve_check(draft, *extra):
        return subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "serve-check", "--target", str(target),
                               "--draft", str(draft), *extra], capture_output=True, text=True, cwd=ROOT)

    ok = serve_check(good, "--tp", "2", "--num-speculative-tokens", "4")
    assert ok.returncode == 0 and "serving OK" in ok.stdout and "vllm serve" in ok.stdout, ok.stderr
    assert '"num_speculative_tokens": 4' in ok.stdout and "--speculative-algorithm STANDALONE" in ok.stdout
    lora, dora = tmp_path / "lora", tmp_path / "dora"
    for d, extra in ((lora, {}), (dora, {"use_dora": True})):
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                           "target_modules": ["q_proj", "v_proj"], **extra}))
    ok = serve_check(good, "--adapter", str(lora))
    assert ok.returncode == 0 and f"--lora-modules soaes={lora} --max-lora-rank 8" in ok.stdout, ok.stderr
    assert f"--lora-paths soaes={lora}" in ok.stdout
    for draft, extra, msg in ((good, ("--adapter", str(dora)), "vLLM and SGLang do not serve DoRA adapters"),
                              (bad_vocab, (), "its vocabulary differs from the target's"),
                              (short, (), "max_position_embeddings 256 < the target's 512"),
                              (good, ("--tp", "3"), "tensor parallel 3 does not divide num_attention_heads 8")):
        res = serve_check(draft, *extra)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and msg in lines[0], res.stderr
