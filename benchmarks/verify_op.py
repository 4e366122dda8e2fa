#!/usr/bin/env python
"""Tree-verify op speed: native (C++ on CPU, CUDA on GPU) vs the PyTorch reference, side by side.

Random 64-node trees (as a dynamic tree drafts them), deterministic drafts (greedy / top-k: no
draft distributions) and sampled drafts (full draft distributions), for the demo vocabulary and
Qwen2.5's. Prints microseconds per call and the speedup over the reference; checks the outputs agree.

  python benchmarks/verify_op.py [--device cuda] [--nodes 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import write_results

from megatron_soaes.speculative.verify import native_available, tree_verify, tree_verify_reference


def _time(fn, repeat: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8064, 151936])
    ap.add_argument("--repeat", type=int, default=50, help="timed calls of the native op")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plant-bug", action="store_true", help="corrupt the op's accepted lengths (the check must fail)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if not native_available(dev.type):
        raise SystemExit(f"native op not built for {dev.type}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    B, N = args.batch, args.nodes
    rows = []
    for V in args.vocab:
        parents = torch.zeros(B, N, dtype=torch.long)
        parents[:, 0] = -1
        for i in range(1, N):  # a bushy tree: parents among the first half
            parents[:, i] = torch.randint(0, max(1, i // 2 + 1), (B,), generator=g).clamp(max=i - 1)
        tokens = torch.randint(0, V, (B, N), generator=g)
        p = torch.softmax(torch.randn(B, N, V, generator=g) * 3, -1)
        for i in range(1, N):  # make acceptance likely along some paths
            tokens[:, i] = p[torch.arange(B), parents[:, i]].argmax(-1) if i % 3 else tokens[:, i]
        q = torch.softmax(torch.randn(B, N, V, generator=g) * 3, -1)
        u = torch.rand(B, N, 2, generator=g)
        for kind, qq in (("deterministic draft", None), ("sampled draft", q)):
            cpu_args = (parents, tokens, p, qq, u)
            dev_args = [a.to(dev) if a is not None else None for a in cpu_args]
            ref_out = tree_verify_reference(*cpu_args)
            nat_out = tree_verify(*dev_args, implementation="native")
            if args.plant_bug:  # one token too many accepted wherever the path could be longer
                nat_out = (nat_out[0], (nat_out[1] + 1).clamp(max=N), nat_out[2])
            same = all(torch.equal(a.cpu(), b) for a, b in zip(nat_out, ref_out))
            t_ref = _time(lambda: tree_verify_reference(*cpu_args), 5, lambda: None)
            t_nat = _time(lambda: tree_verify(*dev_args, implementation="native"), args.repeat, sync)
            rows.append(dict(vocab=V, nodes=N, batch=B, draft=kind, device=dev.type, reference_us=round(t_ref, 1),
                             native_us=round(t_nat, 1), speedup=round(t_ref / t_nat, 1), same_output=same,
                             accepted=float(ref_out[1].float().mean())))
    print(f"{'vocab':>7} {'draft':>20} {'reference us':>13} {'native (' + dev.type + ') us':>16} {'speedup':>8} same  mean path")
    for r in rows:
        print(f"{r['vocab']:>7} {r['draft']:>20} {r['reference_us']:>13} {r['native_us']:>16} {r['speedup']:>7}x {str(r['same_output']):>5} {r['accepted']:.1f}")
    if args.json:
        write_results(args.json, rows)
    if not all(r["same_output"] for r in rows):
        raise SystemExit("error: the native op's output differs from the PyTorch reference")


if __name__ == "__main__":
    main()
