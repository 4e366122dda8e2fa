"""Export for inference: a megatron-soaes checkpoint -> an HF directory (safetensors, config,
generation config, tokenizer and the chat template training used) that transformers, vLLM and
SGLang load as the model's family (Qwen2, Qwen3, Llama) and tokenize exactly as we do.

The tokenizer is the part engines get wrong silently: transformers >= 5 (and so vLLM) loads every
qwen2 model's tokenizer as `Qwen2Tokenizer`, which rebuilds a byte-level BPE pipeline (NFC, Qwen2's
pre-tokenisation) from the vocabulary and merges in tokenizer.json. The real Qwen vocabulary and our
demo BPE (`data.tokenizer.train_bpe`) are exactly that; a sentencepiece model is not, and
`check_export` says so instead of letting an engine feed the model garbage ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_soaes.models.config import ModelConfigError, Qwen2Config, check_same_family
from megatron_soaes.utils.files import atomic_write_json, read_json


class ExportError(ValueError):
    """An export that an engine would not run as we do; the message says what differs."""


def _tokenizer_files(tok, spec: str, out: Path) -> dict:
    """Write the tokenizer file(s) into `out`; returns the tokenizer_config fields they need."""
    from megatron_soaes.data.tokenizer import (BPETokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                                               sentencepiece_to_tokenizer_json)

    if isinstance(tok, TiktokenTokenizer):
        tok.save_tokenizer_json(out)  # the byte-level BPE with its specials, as the family's releases ship it
        return {"tokenizer_class": tok.vocab.tokenizer_class}
    if isinstance(tok, BPETokenizer):
        shutil.copy2(tok.path, out / "tokenizer.json")
        return {"tokenizer_class": "Qwen2Tokenizer"}
    if isinstance(tok, SentencePieceTokenizer):  # exact for PreTrainedTokenizerFast; AutoTokenizer will not use it
        sentencepiece_to_tokenizer_json(Path(spec), out / "tokenizer.json")
        return {"tokenizer_class": "PreTrainedTokenizerFast"}
    src = Path(spec)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") and f.name != "tokenizer_config.json" or f.name in ("vocab.json", "merges.txt"):
            shutil.copy2(f, out / f.name)
    theirs = src / "tokenizer_config.json"
    keep = ("tokenizer_class", "added_tokens_decoder", "errors", "add_prefix_space", "split_special_tokens")
    return {k: v for k, v in read_json(theirs).items() if k in keep} if theirs.exists() else {}


def export_hf(checkpoint, out_dir, tokenizer_spec: str, dtype: str | None = "bf16", overwrite: bool = True,
              default_system: str | None = None, max_model_len: int | None = None) -> Path:
    """Write the export to a temporary sibling and rename it into place when complete."""
    from megatron_soaes.checkpoint.convert import megatron_to_hf
    from megatron_soaes.checkpoint.meta import atomic_directory
    from megatron_soaes.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        megatron_to_hf(checkpoint, tmp, dtype=dtype, overwrite=True, progress=False)
        cfg = read_json(tmp / "config.json")
        # generation stops at the chat format's turn end (what SFT taught), or at the end of a document
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_id, "pad_token_id": tok.eod_id}
        atomic_write_json(tmp / "config.json", {**cfg, **ids})
        atomic_write_json(tmp / "generation_config.json", {
            **ids, "eos_token_id": [tok.stop_id, tok.eod_id], "do_sample": False})
        atomic_write_json(tmp / "tokenizer_config.json", {
            "errors": "replace", "add_prefix_space": False, "split_special_tokens": False,
            **_tokenizer_files(tok, tokenizer_spec, tmp),
            "chat_template": tok.chat.jinja(default_system),
            "model_max_length": max_model_len or cfg.get("max_position_embeddings", 32768),
            "clean_up_tokenization_spaces": False, "bos_token": tok.chat.bos, "unk_token": None,
            # a model's own template renders with its eos_token (stopping is config/generation_config's)
            "eos_token": getattr(tok.chat, "special", {}).get("eos_token", tok.chat.turn_end), "pad_token": tok.eod_token})
        atomic_write_json(tmp / "soaes_export.json", {"source": str(checkpoint), "tokenizer": tokenizer_spec,
                                                      "default_system": default_system})
    return Path(out_dir)


# ---- checks ----
SAMPLE_TEXTS = [
    "企业国有资产属于国家所有。国务院代表国家行使企业国有资产所有权。",
    "第七十七条　本法自2009年5月1日起施行。", "公司股东依法享有资产收益、参与重大决策和选择管理者等权利；",
    "Hello, world! It's 3.5% of 2024's GDP -- ｆｕｌｌ-width ＡＢＣ１２３, e\u0301, 😀.", "  leading\tand trailing  \n\n",
    "a literal <|im_end|> and <|endoftext|> in text",
]


def _ids(x) -> list[int]:
    """apply_chat_template returns a list or (transformers 5) a BatchEncoding."""
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def check_tokenizer(hf_dir, texts=(), conversations=()) -> dict:
    """transformers' AutoTokenizer on the export vs our tokenizer: ids on `texts` (plus built-in samples),
    the chat template on `conversations` (prompts as generation starts them), decoding, special-token
    ids, and the config files' BOS/EOS/PAD. Raises ExportError naming the first difference."""
    from transformers import AutoTokenizer

    from megatron_soaes.data.sft import Template
    from megatron_soaes.data.tokenizer import load_tokenizer

    hf_dir = Path(hf_dir)
    meta = read_json(hf_dir / "soaes_export.json")
    ours = load_tokenizer(meta["tokenizer"])
    theirs = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    where = f"{hf_dir}: transformers' {type(theirs).__name__}"
    for t in (*SAMPLE_TEXTS, *texts):
        a, b = ours.encode(t, allow_special=True), theirs(t, add_special_tokens=False)["input_ids"]
        if a != b:
            hint = (" (transformers loads a qwen2 model's tokenizer as a byte-level BPE; a sentencepiece model cannot "
                    "be served that way: train with the byte-level BPE, data.tokenizer: bpe)"
                    if meta["tokenizer"].endswith(".model") else "")
            raise ExportError(f"{where} tokenizes {t[:40]!r} as {b[:12]}..., ours as {a[:12]}...{hint}")
        if theirs.decode(a) != ours.decode(a):
            raise ExportError(f"{where} decodes {t[:40]!r} differently: {theirs.decode(a)[:40]!r}")
    template = Template(meta.get("default_system"))
    for conv in conversations:
        a = template.render(conv, ours, for_generation=True)[0]
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        b = _ids(theirs.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        if a != b:
            raise ExportError(f"{where}: the chat template renders {prompt[-1]['content'][:30]!r} as {b[:16]}..., "
                              f"training as {a[:16]}...")
        if conv[-1]["role"] == "assistant":  # and whole conversations as training rendered them
            full = template.render(conv, ours)[0]
            if full != _ids(theirs.apply_chat_template(conv, tokenize=True)):
                raise ExportError(f"{where}: the chat template renders a whole conversation differently from training")
    for name in filter(None, (ours.eod_token, ours.chat.turn_start, ours.chat.turn_end, ours.chat.bos)):
        if theirs.convert_tokens_to_ids(name) != ours.token_id(name):
            raise ExportError(f"{where}: {name} is {theirs.convert_tokens_to_ids(name)}, ours {ours.token_id(name)}")
    cfg, gen = read_json(hf_dir / "config.json"), read_json(hf_dir / "generation_config.json")
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    if cfg["eos_token_id"] not in stops or theirs.eos_token_id not in stops:
        raise ExportError(f"{hf_dir}: EOS differs: config.json {cfg['eos_token_id']}, generation_config {stops}, "
                          f"tokenizer {theirs.eos_token_id}")
    if (not cfg["pad_token_id"] == gen["pad_token_id"] == theirs.pad_token_id
            or not cfg["bos_token_id"] == gen["bos_token_id"] == theirs.bos_token_id):
        raise ExportError(f"{hf_dir}: BOS/PAD differ between config.json, generation_config.json and the tokenizer")
    return {"tokenizer_class": type(theirs).__name__, "tokenizer_texts": len(SAMPLE_TEXTS) + len(texts),
            "tokenizer_chat_prompts": len(conversations), "tokenizer_matches": True}


def check_export(hf_dir, source_checkpoint=None, seq_len: int = 24, texts=(), conversations=()) -> dict:
    """Load the export with transformers: its logits against our engine on the source checkpoint (held
    to `checkpoint.compare.PARITY`: relative to the logits' size, at the export's precision; an
    ExportError beyond it), and its tokenizer against ours (`check_tokenizer`)."""
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint.compare import logit_stats, parity_failure
    from megatron_soaes.inference.model import load_inference_model

    hf_dir = Path(hf_dir)
    src = source_checkpoint or read_json(hf_dir / "soaes_export.json")["source"]
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours = load_inference_model(src)
    toks = torch.randint(0, ours.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hf(toks).logits.float()
    b = ours.forward(toks, torch.arange(seq_len)[None], ours.new_cache(1, seq_len))
    stats = logit_stats(b, a)
    saved = read_json(hf_dir / "config.json")
    half = str(saved.get("dtype") or saved.get("torch_dtype")) in ("bfloat16", "float16") or ours.dtype != torch.float32
    why = parity_failure(stats, "half" if half else "fp32")
    if why:
        raise ExportError(f"{hf_dir}: transformers' logits differ from the source checkpoint {src}: {why}")
    return {"loads_in_transformers": True, "max_abs_logit_diff_vs_source": stats["max_abs_diff"],
            "max_rel_logit_diff_vs_source": stats["max_rel_diff"], "top1_agreement": stats["top1_agreement"],
            **check_tokenizer(hf_dir, texts, conversations)}


def export_adapter(adapter_checkpoint, base_checkpoint, out_dir, tokenizer_spec: str, dtype: str | None = None) -> dict:
    """A LoRA-trained model as engines serve it: `out_dir/base` (the adapter's base, an HF export) and
    `out_dir/adapter` (an HF PEFT directory naming that base). Returns both paths."""
    from megatron_soaes.adapters.peft_io import to_peft

    out = Path(out_dir)
    base = export_hf(base_checkpoint, out / "base", tokenizer_spec, dtype=dtype)
    adapter = to_peft(adapter_checkpoint, out / "adapter", base_model_name_or_path=str(base.resolve()))
    return {"base": str(base), "adapter": str(adapter)}


def check_adapter_export(base_dir, adapter_dir, merged_dir, seq_len: int = 24) -> dict:
    """peft's logits for the exported base + adapter against transformers' on the exported merged model
    (itself checked against our engine by `check_export`): what a PEFT or vLLM user loads is what we
    trained. ExportError beyond `checkpoint.compare.PARITY`; without peft installed, says so."""
    from transformers import AutoModelForCausalLM

    from megatron_soaes.checkpoint.compare import logit_stats, parity_failure

    try:
        from peft import PeftModel
    except ImportError:
        raise ExportError(f"{adapter_dir}: checking the adapter export needs peft (pip install peft)") from None
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    toks = torch.randint(0, merged.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stats = logit_stats(lora(toks).logits, merged(toks).logits)
    saved = read_json(Path(merged_dir) / "config.json")
    half = str(saved.get("dtype") or saved.get("torch_dtype")) in ("bfloat16", "float16")
    why = parity_failure(stats, "half" if half else "fp32")
    if why:
        raise ExportError(f"{adapter_dir}: peft's logits (base {base_dir} + adapter) differ from the merged export "
                          f"{merged_dir}: {why}")
    return {"base": str(base_dir), "adapter": str(adapter_dir), "max_abs_logit_diff_vs_merged": stats["max_abs_diff"],
            "max_rel_logit_diff_vs_merged": stats["max_rel_diff"], "top1_agreement": stats["top1_agreement"]}


def check_pair(target_dir, draft_dir) -> None:
    """A draft an engine can speculate with for this target: the same vocabulary (every token, the
    same id), the same special tokens, and at least the target's context length. One-line errors."""
    t, d = Path(target_dir), Path(draft_dir)
    for p in (t, d):
        if not (p / "config.json").exists() or not (p / "tokenizer.json").exists():
            raise ExportError(f"{p}: not an exported model directory (config.json and tokenizer.json expected)")
    tc, dc = read_json(t / "config.json"), read_json(d / "config.json")
    try:
        check_same_family(Qwen2Config.from_hf(tc), Qwen2Config.from_hf(dc), f"draft {d}")
    except ModelConfigError as e:
        raise ExportError(str(e)) from None
    tt, dt = read_json(t / "tokenizer.json"), read_json(d / "tokenizer.json")
    if tt["model"].get("vocab") != dt["model"].get("vocab") or tt["model"].get("merges") != dt["model"].get("merges"):
        raise ExportError(f"draft {d}: its vocabulary differs from the target's ({t}); speculative decoding needs one tokenizer")
    specials = lambda tj: sorted((a["id"], a["content"]) for a in tj.get("added_tokens", []))  # noqa: E731
    if specials(tt) != specials(dt):
        raise ExportError(f"draft {d}: special tokens differ from the target's: {sorted(set(specials(dt)) ^ set(specials(tt)))[:4]}")
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if tc.get(key) != dc.get(key):
            raise ExportError(f"draft {d}: {key} {dc.get(key)} differs from the target's {tc.get(key)}")
    if dc["vocab_size"] < tc["vocab_size"] and dc["vocab_size"] < len(tt["model"]["vocab"]):
        raise ExportError(f"draft {d}: vocab_size {dc['vocab_size']} is smaller than the tokenizer's")
    if dc["max_position_embeddings"] < tc["max_position_embeddings"]:
        raise ExportError(f"draft {d}: max_position_embeddings {dc['max_position_embeddings']} < the target's "
                          f"{tc['max_position_embeddings']}")


def load_json_lines(path, limit: int) -> list[str]:
    """The first `limit` texts of a jsonl corpus (held-out documents for the tokenizer check)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) >= limit:
                break
    return out
