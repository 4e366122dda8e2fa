#!/usr/bin/env python
"""Every GPU-only check and benchmark in one command (`make gpu-check`), inside about 9 minutes on one
H100; JSON + PNG under --out (default benchmarks/results/gpu):

  throughput   bf16 CPT throughput side by side: megatron's local attention vs SDPA (micro-batch 4 and 8),
               and Transformer Engine when importable, for the Qwen2.5-0.5B shape; SDPA for the 1.5B
               shape (tokens/s, model TFLOP/s, MFU; train_throughput.py)
  parity       the local-attention and SDPA runs above start from the same seed on the same data: their
               first logged losses side by side
  packed       packed SFT rows: FlexAttention's document mask vs the dense block-causal mask (time,
               memory, per-token loss difference; packed_attention.py)
  verify       the CUDA tree-verify op against the PyTorch reference (verify_op.py)
  speculative  the spec-pair (small target, distilled tiny draft) trained here in bf16, then speculative
               decoding on the GPU at batch 1, 4 and 16, with and without CUDA graphs (spec_decode.py)

Each part runs as its own process with a time limit; a part that fails or cannot run is recorded with
the reason and the others go on. Needs the demo data (data/demo: `soaes prepare-demo-data`).
  python benchmarks/gpu_check.py [--parts throughput packed ...] [--smoke]   (--smoke: tiny shapes, any device)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "throughput", "parity", "packed", "verify", "speculative")


def run(cmd: list[str], limit: int, log: Path) -> dict:
    """Run one part's command; its output goes to `log` (and its tail into the result on failure)."""
    t0 = time.time()
    try:
        res = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out, rc = res.stdout, res.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    log.write_text(out)
    print(out[-3000:], flush=True)
    r = {"seconds": round(time.time() - t0, 1), "rc": rc}
    if rc != 0:
        r["error"] = out.strip()[-800:]
    return r


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def env_info() -> dict:
    import torch

    from megatron_soaes.models.attention import have_flex_attention
    from megatron_soaes.models.megatron import have_transformer_engine
    from megatron_soaes.speculative.verify import native_available

    cuda = torch.cuda.is_available()
    return dict(torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if cuda else "cpu",
                transformer_engine=have_transformer_engine(), flex_attention=have_flex_attention(),
                native_verify_cuda=cuda and native_available("cuda"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, a few steps: checks the command runs (CPU too)")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, smoke = sys.executable, args.smoke
    dev, dtype = ("cuda", "bf16") if torch.cuda.is_available() and not smoke else ("cpu", "fp32")
    if not smoke and dev != "cuda":
        raise SystemExit("error: gpu-check needs a CUDA GPU (use --smoke to check the command on CPU)")
    if not (ROOT / "data" / "demo" / "tokenizer.json").exists():
        raise SystemExit("error: data/demo missing: run `soaes prepare-demo-data --out data/demo` first")
    report: dict = {"smoke": smoke, "env": env_info()}
    print(f"gpu-check on {report['env']['device']} (torch {report['env']['torch']}), parts: {' '.join(args.parts)}", flush=True)
    bench = ROOT / "benchmarks"

    if "throughput" in args.parts or "parity" in args.parts:
        steps = "4" if smoke else "20"
        shapes = [("0.5b", "examples/gpu/cpt_throughput.yaml"), ("1.5b", "examples/gpu/cpt_throughput_1.5b.yaml")]
        base = "train.dtype=fp32,model.preset=tiny,data.seq_length=256,optim.warmup_steps=1" if smoke else "train.dtype=bf16"
        local = f"{base},train.transformer_impl=local"  # megatron's local layers even where TE imports
        variants = {"0.5b": [f"local attention=1:{local},train.attention=megatron_local",
                             f"SDPA=1:{local},train.attention=sdpa",
                             f"SDPA mbs8=1:{local},train.attention=sdpa,train.micro_batch_size=8,train.global_batch_size=32",
                             f"TE=1:{base},train.transformer_impl=transformer_engine"],
                    "1.5b": [f"SDPA=1:{local},train.attention=sdpa"]}
        report["throughput"] = {}
        for name, config in shapes[:1] if smoke else shapes:
            cmd = [py, bench / "train_throughput.py", "--config", config, "--steps", steps, "--log-interval", "2" if smoke else "5",
                   "--out", out / f"throughput_{name}"]
            for v in variants[name]:
                cmd += ["--variant", v]
            r = run(cmd, 600, out / f"throughput_{name}.log")
            report["throughput"][name] = {**r, "rows": read_json(out / f"throughput_{name}" / "train_throughput.json")}

    if "parity" in args.parts:
        # same seed, same data, same init: the first logged losses of local attention vs SDPA
        runs = out / "throughput_0.5b"
        losses = {}
        for name in ("local_attention", "SDPA"):
            f = runs / name / "metrics.jsonl"
            if f.exists():
                losses[name] = {r["step"]: r["loss"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r}
        if len(losses) == 2:
            common = sorted(set(losses["local_attention"]) & set(losses["SDPA"]))
            rel = [abs(losses["SDPA"][s] - losses["local_attention"][s]) / abs(losses["local_attention"][s]) for s in common]
            report["parity"] = {"steps": common, "local_attention": [losses["local_attention"][s] for s in common],
                                "sdpa": [losses["SDPA"][s] for s in common], "max_rel_diff": max(rel) if rel else None}
        else:
            report["parity"] = {"error": f"missing runs: {sorted(set(('local_attention', 'SDPA')) - set(losses))}"}

    if "packed" in args.parts:
        shape = ["--preset", "test", "--seq", "256", "--mbs", "2", "--steps", "2"] if smoke else \
                ["--preset", "qwen2.5-0.5b", "--seq", "2048", "--mbs", "4", "--per-row", "8", "--steps", "5"]
        r = run([py, bench / "packed_attention.py", "--device", dev, "--dtype", dtype, "--json", out / "packed.json", *shape],
                300, out / "packed.log")
        report["packed"] = {**r, **(read_json(out / "packed.json") or {})}

    if "verify" in args.parts:
        if dev == "cuda":
            r = run([py, bench / "verify_op.py", "--device", "cuda", "--json", out / "verify.json"], 120, out / "verify.log")
            report["verify"] = {**r, "rows": read_json(out / "verify.json")}
        else:
            report["verify"] = {"skipped": "no CUDA device"}

    if "speculative" in args.parts:
        pair = out / "spec_pair"
        steps = "6" if smoke else "200"
        common = ["--set", f"train.steps={steps}", "--set", "train.save_interval=0", "--set", "train.eval_interval=0",
                  "--set", "train.tensorboard=false"]
        target = [py, "-m", "megatron_soaes.cli", "train", "--config", "examples/spec/target_cpt.yaml", *common,
                  "--set", f"train.output_dir={pair}/target"]
        draft = [py, "-m", "megatron_soaes.cli", "train", "--config", "examples/spec/draft_distill.yaml", *common,
                 "--set", f"train.output_dir={pair}/draft",
                 "--set", f"distill.teacher.checkpoint={pair}/target/checkpoints/iter_{int(steps):07d}"]
        if smoke:
            target += ["--set", "model.preset=tiny", "--set", "optim.warmup_steps=1"]
            draft += ["--set", "distill.teacher.preset=tiny", "--set", "optim.warmup_steps=1"]
        r1 = run(target, 240, out / "spec_target.log")
        r2 = run(draft, 240, out / "spec_draft.log") if r1["rc"] == 0 else {"skipped": "target training failed"}
        spec = {"train_target": r1, "train_draft": r2}
        if r2.get("rc") == 0:
            bs = ["1", "4"] if smoke else ["1", "4", "16"]
            cmd = [py, bench / "spec_decode.py", "--target", f"{pair}/target/checkpoints/iter_{int(steps):07d}",
                   "--draft", f"{pair}/draft/checkpoints/iter_{int(steps):07d}", "--tokenizer", "data/demo/tokenizer.json",
                   "--prompts", "data/demo/corpora/domain.test.jsonl", "--num-prompts", "4" if smoke else "16",
                   "--prompt-len", "48", "--max-new-tokens", "16" if smoke else "64", "--gammas", "2", "4",
                   "--trees", "2,1", "2,2,1", "dynamic", "--batch-sizes", *bs, "--device", dev, "--dtype", dtype,
                   "--no-hf"]
            r = run(cmd + ["--out", out / "spec_eager"], 300, out / "spec_eager.log")
            spec["eager"] = {**r, "rows": read_json(out / "spec_eager" / "spec_decode.json")}
            if dev == "cuda":  # fewer settings: every (batch, block, cache size) shape is captured once
                graphs = cmd[:cmd.index("--gammas")] + ["--gammas", "4", "--trees", "2,2,1", "--batch-sizes", "1", "4",
                                                        "--device", dev, "--dtype", dtype, "--no-hf", "--cuda-graphs"]
                r = run(graphs + ["--out", out / "spec_graphs"], 300, out / "spec_graphs.log")
                spec["graphs"] = {**r, "rows": read_json(out / "spec_graphs" / "spec_decode.json")}
        report["speculative"] = spec

    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "gpu_check.png")
    print(summary(report), flush=True)


def summary(report: dict) -> str:
    lines = ["", "gpu-check summary"]
    for name, part in report.get("throughput", {}).items():
        for r in part.get("rows") or []:
            if r.get("skipped"):
                lines.append(f"  throughput {name} {r['variant']}: skipped ({r['skipped'][:60]})")
            else:
                mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
                lines.append(f"  throughput {name} {r['variant']}: {r['tokens_per_s']:,.0f} tok/s, "
                             f"{r.get('ratio', 1):.2f}x{mfu}")
    p = report.get("parity", {})
    if p.get("max_rel_diff") is not None:
        lines.append(f"  parity local vs SDPA: first losses {p['local_attention'][:3]} vs {p['sdpa'][:3]}, "
                     f"max rel diff {p['max_rel_diff']:.2e}")
    k = report.get("packed", {})
    if "speedup_flex" in k:
        lines.append(f"  packed SFT: flex {k['speedup_flex']:.2f}x the dense mask, loss diff {k['max_abs_loss_diff']:.1e}")
    for tag in ("eager", "graphs"):
        for r in (report.get("speculative", {}).get(tag) or {}).get("rows") or []:
            if r["method"] != "target only (ours)":
                lines.append(f"  speculative ({tag}) batch {r['batch']} {r['method']}: {r['speedup']:.2f}x, tau {r['tau']:.2f}, "
                             f"exact {r['exact']}")
    def broken(v) -> bool:
        if isinstance(v, dict):
            return bool(v.get("error")) or v.get("rc") not in (None, 0) or any(broken(x) for x in v.values())
        if isinstance(v, list):
            return any(broken(x) for x in v)
        return False

    failed = [k for k, v in report.items() if k != "env" and broken(v)]
    failed += [f"throughput {r['variant']}" for part in report.get("throughput", {}).values() for r in part.get("rows") or []
               if str(r.get("skipped", "")).startswith("failed")]
    lines.append(f"  parts with errors: {', '.join(failed) or 'none'}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    bars = [(f"{n} {r['variant']}", r["tokens_per_s"]) for n, part in report.get("throughput", {}).items()
            for r in part.get("rows") or [] if r.get("tokens_per_s")]
    if bars:
        axes[0].barh([b[0] for b in bars], [b[1] for b in bars])
    axes[0].set_xlabel("training tokens/s")
    axes[0].set_title("CPT throughput")
    for tag in ("eager", "graphs"):
        rows = [r for r in (report.get("speculative", {}).get(tag) or {}).get("rows") or []
                if r["method"] != "target only (ours)"]
        for b in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["batch"] == b]
            axes[1].plot([r["method"] for r in sel], [r["speedup"] for r in sel], marker="o", label=f"{tag}, batch {b}")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("speedup vs target-only")
    axes[1].set_title("speculative decoding")
    axes[1].tick_params(axis="x", rotation=30)
    if axes[1].lines[1:]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
