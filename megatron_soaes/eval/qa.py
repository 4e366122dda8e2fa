"""Held-out QA evaluation: greedy answers from a checkpoint, scored with Rouge-1/2/L and BLEU-4 (with
bootstrap intervals: `score_set`)."""

from __future__ import annotations

import json
import math

import torch

from megatron_soaes.data.sft import Template, read_records, to_messages
from megatron_soaes.eval.metrics import SENTENCE_END, first_sentence, generation_metrics


def load_qa(path, limit: int | None = None) -> list[list[dict]]:
    out = []
    for where, rec in read_records(path):
        out.append(to_messages(rec, where))
        if limit and len(out) >= limit:
            break
    return out


@torch.no_grad()
def answer(model, tokenizer, conversations: list[list[dict]], template: Template, max_new_tokens: int = 128,
           batch_size: int = 64, max_prompt_tokens: int | None = None, stop=None,
           repetition_penalty: float = 1.0) -> list[str]:
    """Greedy answers to the last user turn of each conversation (its reference answer is dropped);
    `stop(tokens)` ends an answer early (`generate`)."""
    from megatron_soaes.inference.generate import generate

    prompts = []
    for conv in conversations:
        ids, _ = template.render(conv, tokenizer, for_generation=True)
        prompts.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    out = []
    for i in range(0, len(prompts), batch_size):
        res = generate(model, prompts[i:i + batch_size], max_new_tokens, eos_id=tokenizer.stop_id, stop=stop,
                       repetition_penalty=repetition_penalty)
        for toks in res.tokens:
            if toks and toks[-1] == tokenizer.stop_id:
                toks = toks[:-1]
            # a byte-level answer cut at max_new_tokens can end inside a UTF-8 character: drop that half
            out.append(tokenizer.decode(toks).rstrip("\ufffd").strip())
    return out


def reference_budget(tokenizer, references: list[str], factor: float = 1.2, percentile: float = 90) -> int:
    """New tokens that cover the references: `factor` x their `percentile`-th length in tokens."""
    import numpy as np

    lens = [len(tokenizer.encode(r)) for r in references] or [1]
    return max(8, math.ceil(factor * float(np.percentile(lens, percentile))))


def score_set(model, tokenizer, conversations: list[list[dict]], template: Template, unit_chars: int = 100,
              max_new_tokens: int | None = None, resamples: int = 1000, batch_size: int = 64,
              repetition_penalty: float = 1.0) -> dict:
    """One model on one QA set: greedy answers and references both cut to their first sentence
    (`first_sentence`), Rouge-1/2/L and BLEU-4 with bootstrap 95% intervals, the per-item scores (for paired
    comparisons) and every question, reference and answer. The budget is `reference_budget` unless given;
    an answer stops once its first sentence is complete."""
    from megatron_soaes.eval.stats import intervals, item_scores, to_lists

    refs = [first_sentence(c[-1]["content"], unit_chars) for c in conversations]
    budget = max_new_tokens or reference_budget(tokenizer, refs)

    def unit_done(toks):
        text = tokenizer.decode(toks)
        return any(c in text for c in SENTENCE_END) or sum(not c.isspace() for c in text) >= unit_chars

    raw = answer(model, tokenizer, conversations, template, budget, batch_size=batch_size, stop=unit_done,
                 max_prompt_tokens=model.cfg.max_position_embeddings - budget, repetition_penalty=repetition_penalty)
    hyps = [first_sentence(h, unit_chars) for h in raw]
    scores = item_scores(hyps, refs)
    rule = "a fixed budget" if max_new_tokens else "1.2x the references' 90th percentile in tokens"
    return {"n": len(refs), "max_new_tokens": budget, "budget": rule,
            "unit": f"first sentence, at most {unit_chars} characters",
            "repetition_penalty": repetition_penalty,
            "metrics": intervals(scores, resamples), "scores": to_lists(scores),
            "items": [{"question": c[-2]["content"], "reference": r, "answer": h}
                      for c, r, h in zip(conversations, refs, hyps)]}


def evaluate_qa(checkpoint, tokenizer, qa_file, template: Template, limit: int | None = 100,
                max_new_tokens: int = 128, out_file=None) -> dict:
    from megatron_soaes.inference.model import load_inference_model

    model = load_inference_model(checkpoint)
    convs = load_qa(qa_file, limit)
    refs = [c[-1]["content"] for c in convs]
    hyps = answer(model, tokenizer, convs, template, max_new_tokens,
                  max_prompt_tokens=model.cfg.max_position_embeddings - max_new_tokens)
    metrics = generation_metrics(hyps, refs)
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for c, h, r in zip(convs, hyps, refs):
                f.write(json.dumps({"question": c[-2]["content"], "answer": h, "reference": r}, ensure_ascii=False) + "\n")
    return metrics
