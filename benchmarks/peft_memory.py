#!/usr/bin/env python
"""Full fine-tuning vs LoRA on the same job, side by side: trainable parameters, optimizer-state bytes (read
from each run's checkpoint manifest), checkpoint bytes, peak RSS of the training process, tokens/s; then
the same state arithmetic for Qwen2.5-72B (bf16 weights, fp32 gradients, main weights and Adam moments
for what trains) and how many 80 GB GPUs that state alone needs (activations come on top).

  python benchmarks/peft_memory.py --config outputs/smollm2/cpt/resolved_config.json --steps 6 \\
      --out benchmarks/results/peft_memory_cpu.json
The config may be a job YAML or a run's resolved_config.json (its "job"); it needs model.init_checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from measure import run_measured
from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]


def run(job: dict, name: str, sets: list[str], steps: int, work: Path) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(job, allow_unicode=True))
    base = [f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0", "train.save_interval=0",
            f"train.output_dir={out}", "optim.warmup_steps=1", "train.tensorboard=false"]
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(cfg)]
    for s in base + sets:
        cmd += ["--set", s]
    with tempfile.TemporaryFile("w+") as log:
        rc, _, peak = run_measured(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        text = log.read()
    if rc:
        raise SystemExit(f"{name} failed:\n{text[-3000:]}")
    import torch

    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.manifest import read_manifest
    from megatron_soaes.checkpoint.safetensors_io import tensor_nbytes

    m = read_manifest(resolve_checkpoint(out))
    nbytes = lambda t: tensor_nbytes(t["shape"], getattr(torch, t["dtype"]))  # noqa: E731
    opt = sum(nbytes(t) for k, t in m["tensors"].items() if k.startswith("optimizer."))
    model = sum(nbytes(t) for k, t in m["tensors"].items() if not k.startswith("optimizer."))
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s") and r["step"] > 1]
    trainable = next((line for line in text.splitlines() if "peft: LoRA" in line), None)
    return {"variant": name, "checkpoint_bytes": m["total_bytes"], "optimizer_state_bytes": opt,
            "saved_model_bytes": model, "peak_rss_bytes": peak, "tokens_per_s": round(statistics.mean(tps), 1),
            "trainable_parameters": (int(trainable.split(":")[2].split(" of ")[0].replace(",", "").strip())
                                     if trainable else None)}


def lora_params(cfg, rank: int) -> int:
    """Adapter parameters of rank `rank` on all seven linears of every layer."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]  # (out, in) of q k v o gate up down
    return cfg.num_layers * sum(rank * (o + i) for o, i in shapes)


def at_scale(preset_name: str, rank: int) -> list[dict]:
    """Weights bf16 (2 B/param); for what trains: fp32 gradients (4), fp32 main weights (4), Adam (8)."""
    from megatron_soaes.checkpoint.qwen2_hf import hf_tensor_shapes
    from megatron_soaes.models import preset

    cfg = preset(preset_name)
    total = sum(math.prod(s) for s in hf_tensor_shapes(cfg).values())
    adapters = lora_params(cfg, rank)
    rows = []
    for name, trainable, frozen in (("full", total, 0), (f"LoRA r={rank}", adapters, total)):
        state = 2 * (trainable + frozen) + 16 * trainable
        rows.append({"model": preset_name, "variant": name, "parameters": total, "trainable_parameters": trainable,
                     "optimizer_state_bytes": 12 * trainable, "state_bytes": state,
                     "min_80gb_gpus_for_state": math.ceil(state / 80e9)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale-preset", default="qwen2.5-72b")
    ap.add_argument("--workdir", default="outputs/bench_peft_memory")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    raw = json.loads(Path(args.config).read_text()) if args.config.endswith(".json") else yaml.safe_load(open(args.config))
    job = raw.get("job", raw)
    job.pop("peft", None)
    work = ROOT / args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows = [run(job, "full", [], args.steps, work),
            run(job, f"lora_r{args.rank}", [f"peft.rank={args.rank}", f"peft.alpha={2 * args.rank}"], args.steps, work)]
    full, lora = rows
    full["trainable_parameters"] = full["trainable_parameters"] or full["saved_model_bytes"] // 4  # fp32 on CPU
    for r in rows:
        r["optimizer_state_vs_full"] = round(r["optimizer_state_bytes"] / full["optimizer_state_bytes"], 4)
        r["peak_rss_vs_full"] = round(r["peak_rss_bytes"] / full["peak_rss_bytes"], 3)
        r["tokens_per_s_vs_full"] = round(r["tokens_per_s"] / full["tokens_per_s"], 3)
    scale = at_scale(args.scale_preset, args.rank)
    print(f"{'variant':10} {'trainable':>12} {'optimizer MB':>13} {'checkpoint MB':>14} {'peak RSS GB':>12} {'tok/s':>8}")
    for r in rows:
        print(f"{r['variant']:10} {r['trainable_parameters']:12,} {r['optimizer_state_bytes'] / 1e6:13.1f} "
              f"{r['checkpoint_bytes'] / 1e6:14.1f} {r['peak_rss_bytes'] / 1e9:12.2f} {r['tokens_per_s']:8.1f}")
    for r in scale:
        print(f"{r['model']} {r['variant']}: {r['trainable_parameters']:,} trainable, state {r['state_bytes'] / 1e9:,.0f} GB "
              f"-> at least {r['min_80gb_gpus_for_state']} x 80 GB GPUs for weights, gradients and optimizer state")
    write_results(args.out, rows, at_scale=scale, note="CPU fp32 runs of the same job; at-scale rows are arithmetic "
                  "(bf16 weights; fp32 gradients, main weights and Adam moments for the trainable parameters; no activations)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
