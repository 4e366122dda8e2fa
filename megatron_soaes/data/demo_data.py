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


CURATED = "curated"  # <data dir>/curated: the curated CPT corpora; curated/sft: the curated SFT training sets
SFT_SETS = ("consultation", "recitation", "soae_qa")


KNOWLEDGE_SETS = ("soae_qa",)  # QA sets whose answers are knowledge that CPT teaches (data.sft_demo.soae_qa_split)


def evaluation_items(out_dir, mcq_files=(), knowledge_pairs: int | None = None):
    """(id, text) of everything the pipeline evaluates on: held-out and validation documents of both
    corpora, every turn of the held-out and validation SFT sets, the MCQ questions, the never-trained
    general text. No training set may overlap them.

    With `knowledge_pairs` (the decontamination n-gram length; for the CPT corpora) a knowledge QA item
    is its question joined to the start of its reference, `knowledge_pairs` characters in all: a corpus
    that copies the question -> answer pair matches it, while the article the answer quotes -- the
    knowledge the question tests -- does not, and stays in CPT. SFT sets are checked against every
    question and every reference: an SFT example answering with a test article is leakage."""
    from megatron_soaes.curation.decontam import jsonl_items
    from megatron_soaes.data.mcq import mcq_items

    out = Path(out_dir)
    for n in ("domain.valid", "domain.test", "general.valid", "general.test", "heldout.test"):
        if (out / "corpora" / f"{n}.jsonl").exists():
            yield from jsonl_items(out / "corpora" / f"{n}.jsonl")
    for n in SFT_SETS:  # held-out QA, and the validation sets SFT evaluates (and keep_best selects) on
        for split in ("valid", "test"):
            path = out / "sft" / f"{n}.{split}.jsonl"
            if knowledge_pairs and n in KNOWLEDGE_SETS:
                yield from knowledge_pair_items(path, knowledge_pairs)
            else:
                yield from jsonl_items(path)
    for f in mcq_files:
        yield from mcq_items(f)


def knowledge_pair_items(path, n: int):
    """(id, question + the first characters of its reference) of a chat jsonl, `n` normalised characters."""
    from megatron_soaes.curation.rules import content

    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            rec = json.loads(line)
            turns = [m for m in rec["messages"] if m.get("role") != "system"]
            q, a = content(turns[-2]["content"]), content(turns[-1]["content"])
            yield f"{Path(path).name}#{rec.get('id', k)}/pair", (q + a)[:max(n, len(q) + 1)]


def train_file(out_dir, part: str, curated: bool) -> Path:
    """The jsonl a training part is read from: `corpora/domain.train.jsonl`, or its curated copy."""
    out = Path(out_dir)
    name = part.removesuffix(".train")
    if name in SFT_SETS:
        return out / CURATED / "sft" / f"{name}.jsonl" if curated else out / "sft" / f"{name}.train.jsonl"
    return out / CURATED / f"{name}.jsonl" if curated else out / "corpora" / f"{part}.jsonl"


def curate_demo_data(out_dir, cfg, mcq_files=(), log=print) -> dict:
    """Curate the CPT training corpora (quality rules, dedup across both, decontamination) and the SFT
    training sets (dedup within them, decontamination) against `evaluation_items` (for CPT, knowledge QA
    as question -> answer pairs: the articles it asks about stay)."""
    from megatron_soaes.curation import curate

    out = Path(out_dir)
    cpt = curate({n: out / "corpora" / f"{n}.train.jsonl" for n in ("domain", "general")}, out / CURATED, cfg,
                 list(evaluation_items(out, mcq_files, knowledge_pairs=cfg.decontam_ngram)),
                 quality_sources=("domain", "general"), log=log)
    sft = curate({n: out / "sft" / f"{n}.train.jsonl" for n in SFT_SETS}, out / CURATED / "sft", cfg,
                 list(evaluation_items(out, mcq_files)), log=log)
    return {"cpt": cpt, "sft": sft}


def prepare_demo_data(out_dir, vocab_size: int = 8000, tokenizer_docs: int = 4000, workers: int = 2,
                      tokenizer: str = "bpe", general: str = "peoples_daily", curation=None, mcq_files=(),
                      heldout: str | None = None, log=print) -> Path:
    """Idempotent: parts that already exist are kept. tokenizer "bpe" trains the demo byte-level BPE
    (`tokenizer.json`, Qwen2's format), "spm" a sentencepiece model (`spm.model`); any other spec
    (e.g. "qwen", an HF tokenizer directory) tokenizes the corpora with it instead. `general` picks the
    general corpus (`corpora.GENERAL`); corpora built from another one are rebuilt. With `curation`
    (config.curation.CurationConfig, enabled) the training parts are curated first and the tokenizer
    and training data come from the curated files (`train_file`). `heldout` adds general text no phase
    trains on (`corpora.HELDOUT_GENERAL`)."""
    out = Path(out_dir)
    corpora = out / "corpora"
    built = json.loads((corpora / "corpora.json").read_text()) if (corpora / "corpora.json").exists() else None
    if built is None or built["general"].get("source", "peoples_daily") != general:
        for n in PARTS:  # tokenized from the corpora about to be replaced (first: a kill leaves no stale match)
            (out / f"{n}.stats.json").unlink(missing_ok=True)
        if built is not None and tokenizer in DEMO_TOKENIZERS:  # trained on them
            Path(demo_tokenizer(out, tokenizer)).unlink(missing_ok=True)
        build_demo_corpora(corpora, general=general, heldout=heldout)
    elif heldout is not None and not (corpora / "heldout.test.jsonl").exists():
        from megatron_soaes.data.corpora import HELDOUT_GENERAL

        HELDOUT_GENERAL[heldout](corpora)
    if not (out / "sft" / "sft_stats.json").exists():
        from megatron_soaes.data.sft_demo import build_sft_demo

        build_sft_demo(out / "sft")
    curated = bool(curation and curation.enabled)
    if curated:
        curate_demo_data(out, curation, mcq_files, log=log)
    spec = demo_tokenizer(out, tokenizer)
    if tokenizer in DEMO_TOKENIZERS and not Path(spec).exists():
        texts = []
        for n in ("domain.train", "general.train"):
            with open(train_file(out, n, curated), encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for _, line in zip(range(tokenizer_docs // 2), f)]
        if tokenizer == "bpe":
            train_bpe(texts, spec, vocab_size=vocab_size)
        else:
            train_sentencepiece(texts, out / "spm", vocab_size=vocab_size)
    name = load_tokenizer(spec).name  # parts tokenized with another tokenizer (an older demo) are redone
    for n in PARTS:
        stats, src = out / f"{n}.stats.json", train_file(out, n, curated) if n.endswith(".train") else corpora / f"{n}.jsonl"
        rec = json.loads(stats.read_text()) if stats.exists() else {}
        if (not (out / f"{n}.idx").exists() or rec.get("tokenizer") != name or rec.get("inputs") != [str(src)]
                or (out / f"{n}.idx").stat().st_mtime_ns < src.stat().st_mtime_ns):  # a curated file redone since
            preprocess(src, out / n, spec, workers=workers)
    return out
