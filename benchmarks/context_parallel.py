#!/usr/bin/env python
"""Context parallelism on CPU: the tiny model's CPT at sequence 2k / 4k / 8k, CP 1 (one process) against
CP 2 (two gloo processes), same data and weights. On 2 cores this shows what splitting the sequence costs
in communication and saves in memory per rank, not a speedup: both layouts share the same two cores.

Tokens/s is the mean over the logged steps after the first; peak RSS is the largest single process's
(a rank). Losses must agree step by step (CP splits work, not math). Writes <out> (JSON).

  python benchmarks/context_parallel.py --out benchmarks/results/context_parallel_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from provenance import write_results
from train_throughput import run_variant

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, seq: int, cp: int, steps: int, out: Path) -> dict:
    """One layout as a `train_throughput` variant (the same command, thread split and rate reading)."""
    sets = [f"data.seq_length={seq}", f"model.overrides.max_position_embeddings={max(seq, 2048)}",
            "train.global_batch_size=1", "train.micro_batch_size=1", "optim.warmup_steps=1",
            f"parallel.context_parallel={cp}"]
    row = run_variant(SimpleNamespace(config=config, steps=steps, log_interval=1), f"seq{seq}-cp{cp}", cp, sets, out)
    if row.get("skipped"):
        raise SystemExit(f"seq {seq} CP {cp}: {row['skipped']}")
    return {"seq_length": seq, "cp": cp, "nproc": cp, "tokens_per_s": row["tokens_per_s"],
            "peak_rss_per_process_gb": row["peak_rss_per_process_gb"], "losses": row["losses"],
            "wall_s": round(row["wall_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/tiny/cpt.yaml")
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workdir", default="outputs/bench_context_parallel")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for seq in args.seqs:
        one = run(args.config, seq, 1, args.steps, ROOT / args.workdir)
        two = run(args.config, seq, 2, args.steps, ROOT / args.workdir)
        for r in (one, two):
            r["speed_vs_cp1"] = r["tokens_per_s"] / one["tokens_per_s"]
            r["memory_vs_cp1"] = r["peak_rss_per_process_gb"] / one["peak_rss_per_process_gb"]
            r["same_losses_as_cp1"] = all(abs(a - b) < 1e-3 for a, b in zip(r["losses"], one["losses"]))
            rows.append(r)
            print(f"seq {seq:>5} CP {r['cp']}: {r['tokens_per_s']:8,.0f} tok/s ({r['speed_vs_cp1']:.2f}x), peak RSS/rank "
                  f"{r['peak_rss_per_process_gb']:.2f} GB ({r['memory_vs_cp1']:.2f}x), same losses {r['same_losses_as_cp1']}",
                  flush=True)
    write_results(args.out, rows, settings={"config": args.config, "steps": args.steps},
                  note="2 cores shared by both layouts: CP 2's two ranks get one thread each, CP 1's one rank two")


if __name__ == "__main__":
    main()
