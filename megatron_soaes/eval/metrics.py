"""Generation metrics for Chinese: Rouge-1/2/L and BLEU-4.

Rouge follows `rouge-chinese` (the package Chinese papers report with): n-gram *sets* for Rouge-N,
the longest common subsequence over the whole token list for Rouge-L, F = 2PR / (P + R + 1e-8),
averaged over pairs. Tokens are characters by default (whitespace dropped) or jieba words.
BLEU-4 is `sacrebleu.corpus_bleu(..., tokenize="zh")` itself. Rouge is computed here rather than by
`rouge-chinese` at run time: that package raises on an empty hypothesis (a model that answers
nothing would abort an evaluation), re-tokenises by spaces only, and pulls no weight the 40 lines
below do not; parity with it is tested on many pairs (tests/test_metrics.py).
"""

from __future__ import annotations


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """BLEU-4 (0-100) of hypotheses against one reference each: sacrebleu's corpus BLEU with its
    Chinese tokenizer (every CJK character a token), the score Chinese papers report."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score


def rouge_tokens(text: str, level: str = "char") -> list[str]:
    if level == "char":
        return [c for c in text if not c.isspace()]
    if level == "word":
        import jieba

        return [w for w in (t.strip() for t in jieba.cut(text)) if w]
    raise ValueError(f"rouge level must be 'char' or 'word', got {level!r}")


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    p = overlap / n_hyp if n_hyp else 0.0
    r = overlap / n_ref if n_ref else 0.0
    return 2.0 * (p * r) / (p + r + 1e-8)


def rouge_pair(hyp: str, ref: str, level: str = "char") -> dict[str, float]:
    """Rouge-1/2/L F-scores of one pair (0 when either side is empty)."""
    h, r = rouge_tokens(hyp, level), rouge_tokens(ref, level)
    out = {}
    for n in (1, 2):
        hs = {tuple(h[i:i + n]) for i in range(len(h) - n + 1)}
        rs = {tuple(r[i:i + n]) for i in range(len(r) - n + 1)}
        out[f"rouge-{n}"] = _f(len(hs & rs), len(hs), len(rs))
    out["rouge-l"] = _f(_lcs(r, h), len(h), len(r))
    return out


def rouge(hypotheses: list[str], references: list[str], level: str = "char", ignore_empty: bool = False) -> dict:
    """Mean Rouge-1/2/L F-scores (0-1). Empty pairs score 0, or are dropped with ignore_empty
    (what rouge-chinese's `ignore_empty=True` does; without it, rouge-chinese raises on them)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    pairs = list(zip(hypotheses, references))
    if ignore_empty:
        pairs = [(h, r) for h, r in pairs if rouge_tokens(h, level) and rouge_tokens(r, level)]
    if not pairs:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = [rouge_pair(h, r, level) for h, r in pairs]
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def generation_metrics(hypotheses: list[str], references: list[str], level: str = "char") -> dict:
    """Rouge-1/2/L (x100) and BLEU-4, the table the reference system reports."""
    r = rouge(hypotheses, references, level)
    return {"rouge-1": 100 * r["rouge-1"], "rouge-2": 100 * r["rouge-2"], "rouge-l": 100 * r["rouge-l"],
            "bleu-4": corpus_bleu(hypotheses, references), "n": len(hypotheses)}


def is_loop(text: str, max_period: int = 40, min_repeats: int = 2, min_share: float = 0.5) -> bool:
    """Whether `text` is mostly one unit repeated (``证券）证券）证券）...``, or a whole clause over and over:
    ``不得按照法律的规定，不得按照法律的规定，...``): some period p <= max_period whose back-to-back repetition
    spans at least `min_repeats` periods and at least `min_share` of the characters. Periods up to 40
    characters: a 135M model's greedy loops are often a clause of 10-30 characters, which a short bound misses."""
    s = [c for c in text if not c.isspace()]
    n = len(s)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        run = best = 0
        for i in range(p, n):
            run = run + 1 if s[i] == s[i - p] else 0
            best = max(best, run)
        if best + p >= max(min_repeats * p, min_share * n):
            return True
    return False


def rep_n(text: str, n: int = 4) -> float:
    """rep-n: the share of an answer's character n-grams (whitespace dropped) that repeat an earlier one
    (0: none repeated; near 1: a loop). Welleck et al.'s within-sequence repetition measure."""
    s = "".join(c for c in text if not c.isspace())
    grams = [s[i:i + n] for i in range(len(s) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


SENTENCE_END = "。！？；"


def first_sentence(text: str, max_chars: int = 100) -> str:
    """The answer unit knowledge QA scores: text up to and including its first sentence end (。！？；),
    at most `max_chars` characters. A statute's first sentence states its rule; whole articles run to
    hundreds of characters, more than a CPU evaluation can generate for every question."""
    t = text.strip()
    ends = [i for i in (t.find(c) for c in SENTENCE_END) if i >= 0]
    return t[:min(min(ends) + 1 if ends else len(t), max_chars)]


# the bounds `degenerate` applies: a model whose answers cross one is not answering the questions
DEGENERACY_BOUNDS = {"identical_share": 0.5, "loop_share": 0.5, "distinct_2": 0.1}


def degeneracy(answers: list[str]) -> dict:
    """How far a model's answers to different prompts are real answers: distinct-1/2 (unique character
    unigrams/bigrams over all answers, whitespace dropped), the share of answers that are a repeated
    loop (`is_loop`), the share equal to the most common answer, the share that are empty, and the mean
    rep-4 (`rep_n`)."""
    chars = [[c for c in a if not c.isspace()] for a in answers]
    uni = [c for s in chars for c in s]
    bi = [tuple(s[i:i + 2]) for s in chars for i in range(len(s) - 1)]
    n = max(1, len(answers))
    most = max((answers.count(a) for a in set(answers)), default=0)
    return {"answers": len(answers), "distinct_1": len(set(uni)) / max(1, len(uni)),
            "distinct_2": len(set(bi)) / max(1, len(bi)), "loop_share": sum(map(is_loop, answers)) / n,
            "identical_share": most / n, "empty_share": sum(not s for s in chars) / n,
            "rep_4": sum(map(rep_n, answers)) / n}


def degenerate(d: dict) -> list[str]:
    """Which of `DEGENERACY_BOUNDS` the `degeneracy` figures break (empty: the answers look like answers)."""
    b = DEGENERACY_BOUNDS
    out = []
    if d["identical_share"] >= b["identical_share"]:
        out.append(f"{d['identical_share']:.0%} of the answers are the same text")
    if d["loop_share"] >= b["loop_share"]:
        out.append(f"{d['loop_share']:.0%} of the answers are a repeated loop")
    if d["distinct_2"] < b["distinct_2"]:
        out.append(f"distinct-2 {d['distinct_2']:.3f} < {b['distinct_2']}")
    return out
