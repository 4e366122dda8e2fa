#!/usr/bin/env python
"""Training throughput of one config under several variants, side by side (tokens/s, model TFLOP/s, MFU).

Each variant is the same `soaes train` job with a few `--set` overrides (and a process count), run
in turn; tokens/s is the mean over the logged intervals after the first (warm-up), read back from
the run's metrics.jsonl, and peak RSS is the largest single process's (a rank). Ratios are against the first variant. Writes <out>/train_throughput.json/.png.

  CPU (default variants: fp32 1 process, TP=2 and DP=2 on 2 gloo processes), the tiny model:
    python benchmarks/train_throughput.py --config examples/tiny/cpt.yaml --steps 30
  GPU (bf16 with megatron's local layers, bf16 with Transformer Engine, FP8 with Transformer Engine):
    python benchmarks/train_throughput.py --config examples/gpu/cpt_throughput.yaml --gpu
  Own variants:  --variant "tp2=2:parallel.tensor_parallel=2" --variant "mbs4=1:train.micro_batch_size=4"
  MoE (the tiny MoE preset: dense-equivalent compute per token; 1 process, DP=2, EP=2 on 2 processes), with
  each variant's expert load (max / mean tokens per expert, worst layer) and load-balancing loss:
    python benchmarks/train_throughput.py --config examples/tiny/cpt.yaml --moe --steps 30

A variant that cannot run here (Transformer Engine missing, a GPU variant on CPU) is reported as
skipped with the reason, not silently dropped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import run_measured
from provenance import write_results

from megatron_soaes.training.metrics import read_metrics

CPU_VARIANTS = ["fp32 1 proc=1:", "fp32 TP=2=2:parallel.tensor_parallel=2", "fp32 DP=2=2:"]
MOE_VARIANTS = ["dense 1 proc=1:", "MoE EP=1=1:model.preset=tiny-moe", "MoE EP=1 DP=2=2:model.preset=tiny-moe",
                "MoE EP=2=2:model.preset=tiny-moe,parallel.expert_parallel=2"]
GPU_VARIANTS = ["bf16 local=1:train.dtype=bf16,train.transformer_impl=local",
                "bf16 TE=1:train.dtype=bf16,train.transformer_impl=transformer_engine",
                "fp8 TE=1:train.dtype=bf16,train.transformer_impl=transformer_engine,train.fp8=true"]


def parse_variant(spec: str) -> tuple[str, int, list[str]]:
    """"name=NPROC:key=value,key=value" (the name may itself contain '=')."""
    head, _, sets = spec.rpartition(":")
    name, _, nproc = head.rpartition("=")
    if not name or not nproc.isdigit():
        raise SystemExit(f"error: --variant {spec!r}: expected NAME=NPROC:key=value,...")
    return name, int(nproc), [s for s in sets.split(",") if s]


def why_not(sets: list[str], nproc: int) -> str | None:
    joined = " ".join(sets)
    if "transformer_engine" in joined or "fp8=true" in joined:
        try:
            import transformer_engine  # noqa: F401
        except Exception:
            return "Transformer Engine is not installed"
    if "bf16" in joined or "fp16" in joined:
        import torch

        if not torch.cuda.is_available():
            return "needs a GPU"
        if torch.cuda.device_count() < nproc and os.environ.get("SOAES_DIST_BACKEND") != "gloo":
            return f"needs {nproc} GPUs (or SOAES_DIST_BACKEND=gloo: ranks sharing a GPU)"
    return None


def run_variant(args, name: str, nproc: int, sets: list[str], out: Path) -> dict:
    run_dir = out / name.replace(" ", "_").replace("=", "")
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", args.config,
           "--set", f"train.steps={args.steps}", "--set", f"train.log_interval={args.log_interval}",
           "--set", "train.save_interval=0", "--set", "train.eval_interval=0", "--set", "train.eval_iters=1",
           "--set", f"train.output_dir={run_dir}", "--set", "train.tensorboard=false"]
    for s in sets:
        cmd += ["--set", s]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] + cmd[2:]
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    with tempfile.TemporaryFile("w+") as log:
        rc, wall, peak = run_measured(cmd, per_process=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc:
            log.seek(0)
            return dict(variant=name, nproc=nproc, skipped=f"failed ({rc}): {log.read().strip()[-500:]}")
    every = read_metrics(run_dir)
    recs = [r for r in every if "tokens_per_s" in r]
    losses = [r["loss"] for r in recs]
    recs = recs[1:] or recs  # the first interval includes warm-up
    mean = lambda k: sum(r[k] for r in recs) / len(recs) if recs and recs[0].get(k) is not None else None  # noqa: E731
    moe = [r for r in every if "moe_load_worst" in r]
    moe_mean = lambda k: sum(r[k] for r in moe) / len(moe) if moe else None  # noqa: E731
    return dict(variant=name, nproc=nproc, tokens_per_s=mean("tokens_per_s"), model_tflops=mean("model_tflops"),
                mfu=mean("mfu"), final_loss=recs[-1]["loss"] if recs else None, wall_s=wall,
                peak_rss_per_process_gb=peak / 1e9, losses=losses,
                moe_load_worst=moe_mean("moe_load_worst"), moe_aux_loss=moe_mean("moe_aux_loss"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="the GPU variants (bf16 local / bf16 TE / FP8 TE)")
    ap.add_argument("--moe", action="store_true", help="dense vs the tiny MoE preset at EP=1 / DP=2 / EP=2")
    ap.add_argument("--variant", action="append", default=[], help="NAME=NPROC:key=value,... (repeatable)")
    ap.add_argument("--out", default="outputs/bench/train_throughput")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = args.variant or (GPU_VARIANTS if args.gpu else MOE_VARIANTS if args.moe else CPU_VARIANTS)
    rows = []
    for spec in specs:
        name, nproc, sets = parse_variant(spec)
        reason = why_not(sets, nproc)
        row = dict(variant=name, nproc=nproc, skipped=reason) if reason else run_variant(args, name, nproc, sets, out)
        rows.append(row)
        # after every variant, so a run cut short (a time limit) still reports the ones it finished
        write_results(out / "train_throughput.json", rows, settings=dict(config=args.config, steps=args.steps))
        print(f"{name}: " + (f"skipped ({row['skipped']})" if row.get("skipped") else
                             f"{row['tokens_per_s']:,.0f} tok/s"), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("tokens_per_s")), None)
    print(f"\n{args.config}, {args.steps} steps")
    print(f"{'variant':<16} {'procs':>5} {'tok/s':>10} {'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}  note")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['variant']:<16} {r['nproc']:>5} {'-':>10} {'-':>6} {'-':>8} {'-':>6}  skipped: {r['skipped'][:80]}")
            continue
        r["ratio"] = r["tokens_per_s"] / base
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        moe = (f"; expert load max/mean {r['moe_load_worst']:.2f}, aux loss {r['moe_aux_loss']:.3f}"
               if r.get("moe_load_worst") else "")
        print(f"{r['variant']:<16} {r['nproc']:>5} {r['tokens_per_s']:>10,.0f} {r['ratio']:>5.2f}x "
              f"{r['model_tflops']:>8.3f} {mfu:>6}  final loss {r['final_loss']:.3f}{moe}")
    write_results(out / "train_throughput.json", rows, settings=dict(config=args.config, steps=args.steps,
                                                                     log_interval=args.log_interval))
    ran = [r for r in rows if not r.get("skipped")]
    if ran:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([r["variant"] for r in ran], [r["tokens_per_s"] for r in ran])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"training throughput: {Path(args.config).name}")
        fig.tight_layout()
        fig.savefig(out / "train_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
