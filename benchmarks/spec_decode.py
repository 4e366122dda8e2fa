#!/usr/bin/env python
"""Speculative decoding benchmark: one run, same prompts, same target/draft pair, side by side.

  target-only greedy (our engine)          - the baseline, tokens/s
  chain speculative (gamma = 2, 4, ...)    - tokens/s, tau (tokens per target forward), alpha, speedup
  static and dynamic token trees           - same, by tree size
  HF transformers generate(assistant_model=draft) on the same pair in HF format, and HF greedy alone

Every speculative output is checked token-for-token against the target-only greedy output.
Writes <out>/spec_decode.json and <out>/spec_decode.png (speedup vs tree size).

  python benchmarks/spec_decode.py --target T --draft D [--tokenizer spm.model --prompts file.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from megatron_soaes.speculative import SpecConfig, generate, load_inference_model, speculative_generate


def load_prompts(args, vocab: int) -> list[list[int]]:
    if args.prompts:
        from megatron_soaes.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer or args.target)
        texts = []
        for line in Path(args.prompts).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                texts.append(rec.get("prompt") or rec.get("text") or rec["question"])
        return [tok.encode(t)[-args.prompt_len:] for t in texts[:args.num_prompts]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_prompts)]


def as_hf_dir(path: str, tmp: Path) -> Path:
    p = Path(path)
    if (p / "config.json").exists():
        return p
    from megatron_soaes.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(p, tmp / p.name, progress=False)


def hf_assisted(target_dir, draft_dir, prompts, n_new, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    tgt = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).to(device).eval()
    drf = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).to(device).eval()
    res = {}
    for name, kw in (("hf greedy", {}), ("hf assisted", {"assistant_model": drf})):
        outs, t0 = [], None
        for i, p in enumerate([prompts[0]] + prompts):  # first one warms up
            if i == 1:
                _sync(device)
                t0 = time.perf_counter()
            ids = torch.tensor([p], device=device)
            o = tgt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
            if i:
                outs.append(o[0, len(p):].tolist())
        _sync(device)
        res[name] = (time.perf_counter() - t0, outs)
    return res


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompts", default=None, help="jsonl with prompt/text/question (default: random tokens)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gammas", type=int, nargs="*", default=[2, 4, 6])
    ap.add_argument("--trees", nargs="*", default=["2,1,1", "2,2,1,1", "3,2,2,1,1", "4,3,2,1,1", "dynamic"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_inference_model(args.target, dtype, args.device)
    draft = load_inference_model(args.draft, dtype, args.device)
    prompts = load_prompts(args, target.vocab_size)
    n = args.max_new_tokens

    def run(fn):
        fn([prompts[0]])  # warm-up
        _sync(args.device)
        results = [fn([p]) for p in prompts]
        secs = sum(r.seconds for r in results)
        return results, secs

    rows = []
    base, base_s = run(lambda ps: generate(target, ps, n))
    ref_tokens = [r.tokens[0] for r in base]
    ntok = sum(len(t) for t in ref_tokens)
    rows.append(dict(method="target only (ours)", nodes=1, tokens_per_s=ntok / base_s, tau=1.0, alpha=None,
                     speedup=1.0, exact=True))
    specs = [(f"chain gamma={g}", SpecConfig("chain", gamma=g)) for g in args.gammas]
    specs += [(f"tree {t}", SpecConfig.parse(t)) for t in args.trees]
    for name, spec in specs:
        res, secs = run(lambda ps, spec=spec: speculative_generate(target, draft, ps, n, spec))
        exact = [r.tokens[0] for r in res] == ref_tokens
        taus = [r.tau for r in res]
        rows.append(dict(method=name, nodes=spec.max_nodes, tokens_per_s=ntok / secs, tau=sum(taus) / len(taus),
                         alpha=sum(r.alpha for r in res) / len(res), speedup=base_s / secs, exact=exact))
    if not args.no_hf:
        with tempfile.TemporaryDirectory() as tmp:
            td, dd = as_hf_dir(args.target, Path(tmp)), as_hf_dir(args.draft, Path(tmp))
            hf = hf_assisted(td, dd, prompts, n, args.device, dtype)
        g_s, g_out = hf["hf greedy"]
        a_s, a_out = hf["hf assisted"]
        rows.append(dict(method="HF greedy (transformers)", nodes=1, tokens_per_s=ntok / g_s, tau=1.0, alpha=None,
                         speedup=base_s / g_s, exact=g_out == ref_tokens))
        rows.append(dict(method="HF assisted generation", nodes=None, tokens_per_s=ntok / a_s, tau=None, alpha=None,
                         speedup=base_s / a_s, exact=a_out == ref_tokens, speedup_vs_hf_greedy=g_s / a_s))
    print(f"{len(prompts)} prompts x {n} new tokens, device {args.device}, {args.dtype}")
    print(f"{'method':<28} {'nodes':>5} {'tok/s':>9} {'tau':>6} {'alpha':>6} {'speedup':>8} exact")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['method']:<28} {fmt(r['nodes'], 'd'):>5} {r['tokens_per_s']:>9.1f} {fmt(r['tau'], '.2f'):>6} "
              f"{fmt(r['alpha'], '.2f'):>6} {r['speedup']:>7.2f}x {r['exact']}")
    (out / "spec_decode.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ours = [r for r in rows if r["method"].startswith(("chain", "tree"))]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r["nodes"] for r in ours], [r["speedup"] for r in ours])
        for r in ours:
            ax.annotate(r["method"], (r["nodes"], r["speedup"]), fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("tree nodes verified per target forward")
        ax.set_ylabel("speedup over target-only greedy")
        ax.set_title(f"speculative decoding ({args.device})")
        fig.tight_layout()
        fig.savefig(out / "spec_decode.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
