"""Build the tiny example's data: demo corpora, a tokenizer trained on them, indexed datasets, SFT stages."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_soaes.data.corpora import build_demo_corpora
from megatron_soaes.data.preprocess import preprocess
from megatron_soaes.data.tokenizer import load_tokenizer, train_bpe, train_sentencepiece

PARTS = ("domain.train", "general.train", "domain.valid", "general.valid", "domain.test", "general.test")


DEMO_TOKENIZERS = {"bpe": "tokenizer.json", "spm": "spm.model"}  # trained on the demo corpora


def demo_tokenizer(out_dir, tokenizer: str = "bpe") -> str:
    """The tokenizer spec the demo data in `out_dir` is tokenized with."""
    return str(Path(out_dir) / DEMO_TOKENIZERS[tokenizer]) if tokenizer in DEMO_TOKENIZERS else tokenizer


def prepare_demo_data(out_dir, vocab_size: int = 8000, tokenizer_docs: int = 4000, workers: int = 2,
                      tokenizer: str = "bpe", general: str = "peoples_daily") -> Path:
    """Idempotent: parts that already exist are kept. tokenizer "bpe" trains the demo byte-level BPE
    (`tokenizer.json`, Qwen2's format), "spm" a sentencepiece model (`spm.model`); any other spec
    (e.g. "qwen", an HF tokenizer directory) tokenizes the corpora with it instead. `general` picks the
    general corpus (`corpora.GENERAL`); corpora built from another one are rebuilt."""
    out = Path(out_dir)
    corpora = out / "corpora"
    built = json.loads((corpora / "corpora.json").read_text()) if (corpora / "corpora.json").exists() else None
    if built is None or built["general"].get("source", "peoples_daily") != general:
        for n in PARTS:  # tokenized from the corpora about to be replaced (first: a kill leaves no stale match)
            (out / f"{n}.stats.json").unlink(missing_ok=True)
        if built is not None and tokenizer in DEMO_TOKENIZERS:  # trained on them
            Path(demo_tokenizer(out, tokenizer)).unlink(missing_ok=True)
        build_demo_corpora(corpora, general=general)
    spec = demo_tokenizer(out, tokenizer)
    if tokenizer in DEMO_TOKENIZERS and not Path(spec).exists():
        texts = []
        for n in ("domain.train", "general.train"):
            with open(corpora / f"{n}.jsonl", encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for _, line in zip(range(tokenizer_docs // 2), f)]
        if tokenizer == "bpe":
            train_bpe(texts, spec, vocab_size=vocab_size)
        else:
            train_sentencepiece(texts, out / "spm", vocab_size=vocab_size)
    name = load_tokenizer(spec).name  # parts tokenized with another tokenizer (an older demo) are redone
    for n in PARTS:
        stats = out / f"{n}.stats.json"
        if not (out / f"{n}.idx").exists() or not stats.exists() or json.loads(stats.read_text()).get("tokenizer") != name:
            preprocess(corpora / f"{n}.jsonl", out / n, spec, workers=workers)
    if not (out / "sft" / "sft_stats.json").exists():
        from megatron_soaes.data.sft_demo import build_sft_demo

        build_sft_demo(out / "sft")
    return out
