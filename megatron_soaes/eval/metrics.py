"""Generation metrics for Chinese: Rouge-1/2/L and BLEU-4.

Rouge follows `rouge-chinese` (the package Chinese papers report with): n-gram *sets* for Rouge-N,
the longest common subsequence over the whole token list for Rouge-L, F = 2PR / (P + R + 1e-8),
averaged over pairs. Tokens are characters by default (whitespace dropped) or jieba words.
BLEU-4 follows `sacrebleu.corpus_bleu(..., tokenize="zh")`: every CJK character is a token, the rest
is split like mteval-13a; corpus-level clipped n-gram counts, brevity penalty, 'exp' smoothing.
Parity with both packages is tested on many pairs (tests/test_metrics.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

# sacrebleu's table, compared as strings exactly as it does (its supplementary-plane entries are
# written as two-character strings, so a single character never falls inside them; kept for parity).
_ZH_RANGES = [
    ("\u3400", "\u4db5"), ("\u4e00", "\u9fa5"), ("\u9fa6", "\u9fbb"), ("\uf900", "\ufa2d"), ("\ufa30", "\ufa6a"),
    ("\ufa70", "\ufad9"), ("\u20000", "\u2a6d6"), ("\u2f800", "\u2fa1d"), ("\uff00", "\uffef"), ("\u2e80", "\u2eff"),
    ("\u3000", "\u303f"), ("\u31c0", "\u31ef"), ("\u2f00", "\u2fdf"), ("\u2ff0", "\u2fff"), ("\u3100", "\u312f"),
    ("\u31a0", "\u31bf"), ("\ufe10", "\ufe1f"), ("\ufe30", "\ufe4f"), ("\u2600", "\u26ff"), ("\u2700", "\u27bf"),
    ("\u3200", "\u32ff"), ("\u3300", "\u33ff"),
]
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


@lru_cache(maxsize=1 << 16)
def _is_zh(ch: str) -> bool:
    return any(a <= ch <= b for a, b in _ZH_RANGES)


def bleu_tokenize_zh(line: str) -> list[str]:
    spaced = "".join(f" {c} " if _is_zh(c) else c for c in line.strip())
    for pattern, repl in _13A:
        spaced = pattern.sub(repl, spaced)
    return spaced.split()


def corpus_bleu(hypotheses: list[str], references: list[str], max_order: int = 4) -> float:
    """BLEU-4 (0-100) of hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = bleu_tokenize_zh(hyp), bleu_tokenize_zh(ref)
        sys_len += len(h)
        ref_len += len(r)
        for n in range(1, max_order + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions, smooth = [0.0] * max_order, 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log = sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / max_order
    return bp * math.exp(log)


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
