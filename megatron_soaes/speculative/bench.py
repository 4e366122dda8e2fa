"""Side-by-side speculative decoding benchmark (library part of benchmarks/spec_decode.py and the
pipeline): target-only greedy, chain and tree speculative decoding, and optionally HF transformers'
assisted generation on the same pair; every output is checked against target-only greedy."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_soaes.inference.generate import generate
from megatron_soaes.speculative.decode import SpecConfig, speculative_generate


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, prompts, device, batch: int = 1):
    """Run `fn` over `prompts` in batches (after one warm-up batch): per-prompt tokens, seconds, results."""
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    fn(groups[0])  # warm-up
    _sync(device)
    results = [fn(g) for g in groups]
    return [t for r in results for t in r.tokens], sum(r.seconds for r in results), results


def _mean(results, attr) -> float:
    return sum(getattr(r, attr) for r in results) / len(results)


@dataclass
class Baseline:
    """Target-only greedy on a prompt set: the outputs every setting must reproduce (batch 1), and its
    time at the benchmark's batch size -- measured once per target, shared by every draft compared on it."""
    outputs: list[list[int]]
    seconds: float
    batch_size: int
    row: dict


def target_baseline(target, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
                    batch_size: int = 1) -> Baseline:
    dev, n = target.device, max_new_tokens
    ref, base_s, _ = _timed(lambda ps: generate(target, ps, n, eos_id=eos_id), prompts, dev)
    base_tokens = ref
    if batch_size > 1:
        base_tokens, base_s, _ = _timed(lambda ps: generate(target, ps, n, eos_id=eos_id), prompts, dev, batch_size)
    row = dict(method="target only (ours)", batch=batch_size, nodes=1, tokens_per_s=sum(map(len, ref)) / base_s,
               tau=1.0, alpha=None, speedup=1.0, exact=base_tokens == ref,
               outputs_sha1=hashlib.sha1(json.dumps(ref).encode()).hexdigest())  # to compare runs (CUDA graphs)
    return Baseline(ref, base_s, batch_size, row)


def run_benchmark(target, draft, prompts: list[list[int]], max_new_tokens: int, gammas=(2, 4), trees=("2,2,1", "dynamic"),
                  hf_dirs: tuple | None = None, eos_id: int | None = None, log=print, batch_size: int = 1,
                  baseline: Baseline | None = None) -> list[dict]:
    """Target-only vs speculative settings on the same prompts, decoded `batch_size` at a time;
    every output is compared with target-only greedy at batch 1 (so batching is checked too).
    `baseline`: the target's, already measured on these prompts (`target_baseline`)."""
    dev, n = target.device, max_new_tokens
    if baseline is None or baseline.batch_size != batch_size:
        baseline = target_baseline(target, prompts, n, eos_id, batch_size)
    ref, base_s = baseline.outputs, baseline.seconds
    ntok = sum(len(t) for t in ref)
    rows = [dict(baseline.row)]
    matches = draft_agreement(draft, prompts, ref, target)
    agreement = sum(map(sum, matches)) / max(1, sum(map(len, matches)))
    specs = [(f"chain gamma={g}", SpecConfig("chain", gamma=g)) for g in gammas]
    specs += [(f"tree {t}", SpecConfig.parse(t)) for t in trees]
    for name, spec in specs:
        toks, secs, res = _timed(lambda ps, spec=spec: speculative_generate(target, draft, ps, n, spec, eos_id=eos_id),
                                 prompts, dev, batch_size)
        rows.append(dict(method=name, batch=batch_size, nodes=spec.max_nodes, tokens_per_s=ntok / secs,
                         tau=_mean(res, "tau"), alpha=_mean(res, "alpha"), speedup=base_s / secs, exact=toks == ref,
                         draft_agreement=agreement))
        log(f"spec-decode (batch {batch_size}): {name}: tau {rows[-1]['tau']:.2f}, speedup {rows[-1]['speedup']:.2f}x")
    if hf_dirs and batch_size == 1:
        rows += hf_rows(hf_dirs, prompts, n, dev, target.dtype, ref, ntok, base_s, eos_id)
    return rows


def hf_rows(hf_dirs, prompts, n, device, dtype, ref, ntok, base_s, eos_id) -> list[dict]:
    from transformers import AutoModelForCausalLM

    tgt = AutoModelForCausalLM.from_pretrained(str(hf_dirs[0]), dtype=dtype).to(device).eval()
    drf = AutoModelForCausalLM.from_pretrained(str(hf_dirs[1]), dtype=dtype).to(device).eval()
    out = {}
    for name, kw in (("hf greedy", {}), ("hf assisted", {"assistant_model": drf})):
        toks, t0 = [], None
        for i, p in enumerate([prompts[0]] + prompts):
            if i == 1:
                _sync(device)
                t0 = time.perf_counter()
            ids = torch.tensor([p], device=device)
            o = tgt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=eos_id, **kw)
            if i:
                toks.append(o[0, len(p):].tolist())
        _sync(device)
        out[name] = (time.perf_counter() - t0, toks)
    g_s, g_out = out["hf greedy"]
    a_s, a_out = out["hf assisted"]
    return [dict(method="HF greedy (transformers)", batch=1, nodes=1, tokens_per_s=ntok / g_s, tau=1.0, alpha=None,
                 speedup=base_s / g_s, exact=g_out == ref),
            dict(method="HF assisted generation", batch=1, nodes=None, tokens_per_s=ntok / a_s, tau=None, alpha=None,
                 speedup=base_s / a_s, exact=a_out == ref, speedup_vs_hf_greedy=g_s / a_s)]


@torch.no_grad()
def draft_agreement(draft, prompts: list[list[int]], outputs: list[list[int]], target=None) -> list[list[bool]]:
    """Teacher-forced on the target's own outputs: at each output position, whether the draft's greedy
    token (given the prompt and the target's tokens so far) is the target's. Greedy speculation accepts
    exactly these (`chain_rounds`), so this -- not agreement on reference answers -- is what a draft's
    acceptance rate must be compared with. A draft head needs the `target` (it reads its hidden states)."""
    from megatron_soaes.speculative.decode import drafter_for

    drafter = drafter_for(draft)
    out = []
    for p, o in zip(prompts, outputs):
        if not o:
            out.append([])
            continue
        pred = drafter.predictions(target, p + o[:-1])[len(p) - 1:]
        out.append([a == b for a, b in zip(pred, o)])
    return out


def chain_rounds(matches: list[bool], gamma: int) -> int:
    """Target forwards greedy chain speculation takes for one sequence whose draft matches are
    `matches` (`draft_agreement`): each round accepts the run of matches (at most gamma) plus one token."""
    p = rounds = 0
    while p < len(matches):
        k = 0
        while k < gamma and p + k < len(matches) and matches[p + k]:
            k += 1
        p, rounds = p + k + 1, rounds + 1
    return rounds


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<28} {'batch':>5} {'nodes':>5} {'tok/s':>9} {'tau':>6} {'alpha':>6} {'speedup':>8} exact"]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"{r['method']:<28} {r.get('batch', 1):>5} {fmt(r['nodes'], 'd'):>5} {r['tokens_per_s']:>9.1f} "
                     f"{fmt(r['tau'], '.2f'):>6} {fmt(r['alpha'], '.2f'):>6} {r['speedup']:>7.2f}x {r['exact']}")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "speculative decoding") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["method"].startswith(("chain", "tree"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["nodes"] for r in ours], [r["speedup"] for r in ours])
    for r in ours:
        ax.annotate(f"{r['method']} (tau {r['tau']:.2f})", (r["nodes"], r["speedup"]), fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tree nodes verified per target forward")
    ax.set_ylabel("speedup over target-only greedy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
