#!/usr/bin/env python
"""Conversion time and peak memory for a random checkpoint of a real shape (default Qwen2.5-1.5B, bf16).

Side by side, each in a fresh process:
  baseline  - load the whole HF checkpoint into memory (the floor for any non-streaming converter)
  ours      - HF -> Megatron torch_dist (TP=2), and Megatron -> HF
Prints seconds, GB/s and peak RSS, and our peak RSS as a ratio of the baseline's.

  python benchmarks/convert.py --preset qwen2.5-1.5b --workdir /tmp/convbench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_results


def make_checkpoint(preset_name: str, out: Path, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 HF checkpoint written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    from megatron_soaes.checkpoint.qwen2_hf import hf_tensor_shapes
    from megatron_soaes.models import preset

    cfg = preset(preset_name)
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
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def _child(task: str, a: str, b: str, tp: int) -> None:
    t0 = time.time()
    if task == "baseline":
        from safetensors.torch import load_file

        held = [{k: v.clone() for k, v in load_file(p).items()} for p in sorted(Path(a).glob("*.safetensors"))]
        assert held
    elif task == "hf2mc":
        from megatron_soaes.checkpoint.convert import hf_to_megatron

        hf_to_megatron(a, b, tensor_parallel=tp, overwrite=True, progress=False)
    else:
        from megatron_soaes.checkpoint.convert import megatron_to_hf

        megatron_to_hf(a, b, overwrite=True, progress=False)
    # VmHWM is this process image's peak RSS (ru_maxrss would carry the parent's over fork+exec).
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": time.time() - t0, "peak_rss": rss}))


def run(task, a, b, tp):
    out = subprocess.run([sys.executable, __file__, "--child", task, a, b, str(tp)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/soaes-convbench")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        task, a, b, tp = args.child
        return _child(task, a, b, int(tp))
    work = Path(args.workdir)
    hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    size = make_checkpoint(args.preset, hf)
    print(f"random {args.preset} bf16 checkpoint: {size / 1e9:.2f} GB written in {time.time() - t0:.1f}s")
    rows = [("baseline: load whole HF checkpoint", run("baseline", str(hf), "", 1)),
            (f"ours: HF -> Megatron TP={args.tp}", run("hf2mc", str(hf), str(mc), args.tp)),
            ("ours: Megatron -> HF", run("mc2hf", str(mc), str(back), 1))]
    base = rows[0][1]["peak_rss"]
    print(f"\n{'step':40s} {'seconds':>8s} {'GB/s':>6s} {'peak RSS GB':>12s} {'RSS vs baseline':>16s}")
    for name, r in rows:
        print(f"{name:40s} {r['seconds']:8.1f} {size / 1e9 / r['seconds']:6.2f} {r['peak_rss'] / 1e9:12.2f} "
              f"{r['peak_rss'] / base:15.2f}x")
    write_results(work / "result.json", [{"step": n, **r} for n, r in rows], preset=args.preset, checkpoint_bytes=size)
    if not args.keep:
        shutil.rmtree(hf), shutil.rmtree(mc), shutil.rmtree(back)


if __name__ == "__main__":
    main()
