"""Confidence intervals for generation scores: a bootstrap over the test items.

Every score here is an average over items (Rouge) or a corpus statistic built from per-item counts
(BLEU-4), so resampling items with replacement and recomputing gives its sampling distribution; the
2.5th and 97.5th percentiles are the 95% interval. A comparison of two models on the same items
resamples the same indices for both (a paired bootstrap, as `sacrebleu --paired-bs` does): the
interval of the difference, which is what says whether one model is better than the other.
"""

from __future__ import annotations

import numpy as np

from megatron_soaes.eval.metrics import rouge_pair

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
RESAMPLES = 1000


def item_scores(hypotheses: list[str], references: list[str]) -> dict:
    """What resampling needs, per item: Rouge-1/2/L F (x100) and sacrebleu's BLEU sufficient statistics
    (n-gram matches and totals, hypothesis and reference lengths, with its Chinese tokenizer)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    pairs = [rouge_pair(h, r) for h, r in zip(hypotheses, references)]
    out = {k: np.array([100 * p[k] for p in pairs]) for k in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = BLEU(tokenize="zh")
    out["bleu_stats"] = np.array(bleu._extract_corpus_statistics(hypotheses, [references]), dtype=np.int64)
    return out


def _bleu(stats: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="zh")._compute_score_from_stats(stats.sum(0).tolist()).score


def _value(scores: dict, metric: str, idx=None) -> float:
    if metric == "bleu-4":
        s = scores["bleu_stats"]
        return _bleu(s if idx is None else s[idx])
    v = scores[metric]
    return float(v.mean() if idx is None else v[idx].mean())


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def intervals(scores: dict, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{metric: {"mean", "lo", "hi"}}: each metric on all items, and its bootstrap 95% interval."""
    n = len(scores["rouge-1"])
    if n == 0:
        return {m: {"mean": 0.0, "lo": 0.0, "hi": 0.0} for m in METRICS}
    idx = _indices(n, resamples, seed)
    out = {}
    for m in METRICS:
        boot = np.array([_value(scores, m, i) for i in idx])
        out[m] = {"mean": _value(scores, m), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}
    return out


def paired_difference(a: dict, b: dict, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{metric: {"diff", "lo", "hi", "p_le_0"}}: a's score minus b's on the same items, its paired bootstrap
    95% interval, and the share of resamples in which a did not beat b (a one-sided bootstrap p-value)."""
    n = len(a["rouge-1"])
    if n != len(b["rouge-1"]):
        raise ValueError(f"paired comparison needs the same items: {n} vs {len(b['rouge-1'])}")
    if n == 0:
        return {m: {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_le_0": 1.0} for m in METRICS}
    idx = _indices(n, resamples, seed)
    out = {}
    for m in METRICS:
        boot = np.array([_value(a, m, i) - _value(b, m, i) for i in idx])
        out[m] = {"diff": _value(a, m) - _value(b, m), "lo": float(np.percentile(boot, 2.5)),
                  "hi": float(np.percentile(boot, 97.5)), "p_le_0": float((boot <= 0).mean())}
    return out


def to_lists(scores: dict) -> dict:
    """JSON-ready per-item scores (kept in the evaluation result so comparisons can be recomputed)."""
    return {k: v.tolist() for k, v in scores.items()}


def from_lists(d: dict) -> dict:
    return {k: np.array(v, dtype=np.int64 if k == "bleu_stats" else float) for k, v in d.items()}
