#!/usr/bin/env python
"""Conversion speed and peak memory on a random checkpoint of a real shape (default Qwen2.5-1.5B, bf16,
1 GB shards), side by side in one run, each step in a fresh process:
  copy          - a plain copy of the checkpoint's files with fsync: the disk's speed for these bytes
  baseline      - transformers: from_pretrained + save_pretrained of the same checkpoint
  before        - our converter at an earlier commit (--before, run from a `git archive` of it)
  after         - our converter in this tree
each converter HF -> Megatron torch_dist (TP=2) and Megatron -> HF. Prints seconds, GB/s (checkpoint
bytes / seconds), peak RSS and its ratio to the largest shard, and the after/before speedup; writes the
results file, and with --extrapolate the time the measured rate gives a 72B and a 235B checkpoint.

  python benchmarks/convert.py --before f2f4e43 --out benchmarks/results/convert_cpu.json
  python benchmarks/convert.py --preset qwen3-30b-a3b --layers 4 --out benchmarks/results/convert_cpu_moe.json
(MoE: the experts are read and written expert by expert, one tensor per layer on the global expert axis.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_results


def make_checkpoint(preset_name: str, out: Path, shard_bytes: int = 1 << 30, layers: int | None = None) -> int:
    """Random bf16 HF checkpoint written shard by shard (never the whole model in memory); `layers` keeps the
    preset's first layers only (an MoE model's real layer shapes at a size this disk holds)."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from megatron_soaes.checkpoint.qwen2_hf import hf_tensor_shapes
    from megatron_soaes.models import preset

    cfg = preset(preset_name)
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf("bfloat16")))
    shapes = hf_tensor_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    shards, cur, cur_bytes, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        cur[name] = t
        cur_bytes += t.numel() * 2
        if cur_bytes >= shard_bytes:
            shards.append(cur)
            save_file(cur, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            total += cur_bytes
            cur, cur_bytes = {}, 0
    if cur:
        shards.append(cur)
        save_file(cur, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        total += cur_bytes
    n = len(shards)
    weight_map = {}
    for i, s in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / name)
        weight_map.update({k: name for k in s})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _child(task: str, a: str, b: str, tp: int, src: str) -> None:
    if src:
        sys.path.insert(0, src)  # an earlier commit's package, exported by `git archive`
    import megatron_soaes

    assert not src or megatron_soaes.__file__.startswith(src), megatron_soaes.__file__
    t0 = time.time()
    if task == "copy":  # the disk's speed for these bytes: read each file, write it, fsync
        Path(b).mkdir(parents=True)
        for f in sorted(Path(a).iterdir()):
            with open(f, "rb") as src, open(Path(b) / f.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)
                dst.flush()
                os.fsync(dst.fileno())
    elif task == "baseline":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
        model.save_pretrained(b, max_shard_size="1GB")
    elif task == "hf2mc":
        from megatron_soaes.checkpoint.convert import hf_to_megatron

        hf_to_megatron(a, b, tensor_parallel=tp, overwrite=True, progress=False)
    else:
        from megatron_soaes.checkpoint.convert import megatron_to_hf

        megatron_to_hf(a, b, overwrite=True, progress=False)
    # VmHWM is this process image's peak RSS (ru_maxrss would carry the parent's over fork+exec).
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": time.time() - t0, "peak_rss": rss}))


def run(task, a, b, tp, src=""):
    out = subprocess.run([sys.executable, __file__, "--child", task, a, b, str(tp), src], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_revision(rev: str, dest: Path) -> str:
    """The package as it was at `rev` (git archive), for the `before` rows."""
    root = Path(__file__).resolve().parents[1]
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "megatron_soaes"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--layers", type=int, default=None, help="keep the preset's first N layers (e.g. an MoE preset's)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--before", default=None, help="git revision whose converter is the 'before' rows")
    p.add_argument("--workdir", default="/tmp/soaes-convbench")
    p.add_argument("--out", default=None, help="results file (default: <workdir>/result.json)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        task, a, b, tp, src = args.child
        return _child(task, a, b, int(tp), src)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf = work / "hf"
    t0 = time.time()
    size = make_checkpoint(args.preset, hf, layers=args.layers)
    shard = max(f.stat().st_size for f in hf.glob("*.safetensors"))
    print(f"random {args.preset}{f' ({args.layers} layers)' if args.layers else ''} bf16 checkpoint: {size / 1e9:.2f} GB ({shard / 1e9:.2f} GB largest shard) "
          f"written in {time.time() - t0:.1f}s")
    versions = [("after", "")]
    if args.before:
        versions.insert(0, ("before", export_revision(args.before, work / "before_src")))
    rows = [{"step": "plain copy (read, write, fsync)", **run("copy", str(hf), str(work / "copy"), 1)},
            {"step": "baseline: transformers load + save", **run("baseline", str(hf), str(work / "tf"), 1)}]
    shutil.rmtree(work / "copy"), shutil.rmtree(work / "tf")
    for version, src in versions:
        mc, back = work / f"mcore_{version}", work / f"hf_{version}"
        rows.append({"step": f"{version}: HF -> Megatron TP={args.tp}", **run("hf2mc", str(hf), str(mc), args.tp, src)})
        rows.append({"step": f"{version}: Megatron -> HF", **run("mc2hf", str(mc), str(back), 1, src)})
        shutil.rmtree(mc), shutil.rmtree(back)
    for r in rows:
        r["gb_per_s"] = round(size / 1e9 / r["seconds"], 3)
        r["peak_rss_vs_largest_shard"] = round(r["peak_rss"] / shard, 3)
        r["vs_plain_copy"] = round(rows[0]["seconds"] / r["seconds"], 3)  # 1.0: at the disk's speed
    if args.before:
        for direction in ("HF -> Megatron", "Megatron -> HF"):
            b, a = (next(r for r in rows if r["step"].startswith(v) and direction in r["step"]) for v in ("before", "after"))
            a["speedup_vs_before"] = round(b["seconds"] / a["seconds"], 2)
    print(f"\n{'step':40s} {'seconds':>8s} {'GB/s':>6s} {'vs copy':>8s} {'peak RSS GB':>12s} {'RSS / shard':>12s} "
          f"{'vs before':>10s}")
    for r in rows:
        print(f"{r['step']:40s} {r['seconds']:8.1f} {r['gb_per_s']:6.2f} {r['vs_plain_copy']:8.2f} "
              f"{r['peak_rss'] / 1e9:12.2f} {r['peak_rss_vs_largest_shard']:11.2f}x {r.get('speedup_vs_before', ''):>10}")
    # what the measured rates give at scale (bf16 weights: 2 bytes per parameter)
    from megatron_soaes.models import preset

    scale = (("qwen3-30b-a3b", 30.53e9), ("qwen3-235b-a22b", 235.09e9)) if preset(args.preset).is_moe else \
        (("qwen2.5-72b", 72.7e9), ("qwen3-235b-a22b", 235e9))
    extrapolated = {name: {r["step"]: round(2 * params / 1e9 / r["gb_per_s"] / 60, 1) for r in rows}
                    for name, params in scale}
    for name, mins in extrapolated.items():
        print(f"{name}: " + ", ".join(f"{k} {v} min" for k, v in mins.items()))
    write_results(args.out or work / "result.json", rows, preset=args.preset, layers=args.layers, checkpoint_bytes=size,
                  largest_shard_bytes=shard, before=args.before, minutes_at_scale=extrapolated)
    if not args.keep:
        shutil.rmtree(hf)


if __name__ == "__main__":
    main()
