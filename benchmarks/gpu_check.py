#!/usr/bin/env python
"""Every GPU-only path checked for correctness, then measured, in one command (`make gpu-check`) that
fits a short GPU loan: <= 6 minutes on one H100 with the wheel install and the op build
(`tools/gpu_check.sh` builds the op in the background while the first parts run).

Parts, in order of value (correctness of each GPU path first, throughput last); each asserts its
figures against the bounds in TOLERANCES and the run exits 1 naming every part that was wrong:

  parity       bf16 training, megatron's local attention vs SDPA with the CUDA fusions, same seed and
               data: the first losses agree (rel. diff <= parity_first_rel at step 1, <= parity_rel after);
               and both are causal, exactly: changing a token changes no earlier token's loss
               (attention_probe.py --probe causal)
  packed       packed SFT rows, forward + backward: compiled FlexAttention's document mask vs the dense
               block-causal mask give the same per-token losses (mean rel <= packed_mean_rel,
               max abs <= packed_max_abs); both keep examples apart, exactly: changing a token changes
               no loss of another example or an earlier token; and both equal the examples run one by one,
               per-token losses and parameter gradients (attention_probe.py --probe packed)
  cp           context parallelism on megatron's local layers (no Transformer Engine): the same bf16 CPT from
               the same weights at CP 1 (one rank) and CP 2 (two ranks sharing the one GPU over gloo with CUDA
               tensors: NCCL refuses two ranks on one device), so FlexAttention's gathered-K/V CP mask runs on
               CUDA; the losses agree step by step (rel. diff <= cp_rel)
  verify       the CUDA tree-verify op equals the PyTorch reference on every tree (verify_op.py)
  speculative  a small target + distilled draft trained here in bf16, decoded in fp32 on the GPU at batch
               1, 4 and 16: every speculative output equals target-only greedy; with CUDA graphs the
               tokens equal the eager run's (spec_decode.py)
  throughput   bf16 CPT tokens/s, TFLOP/s and MFU: local attention vs SDPA (micro-batch 4, 8) and TE when
               importable, Qwen2.5-0.5B shape; SDPA at 1.5B (train_throughput.py). Gets what is left
               of --budget; rows not reached are listed, not failed.

The report (gpu_check.json, written after every part, so an interrupted run still reports) and a PNG go
to --out (default benchmarks/results/gpu).

  python benchmarks/gpu_check.py [--parts verify speculative] [--budget 330] [--smoke]
  --smoke: tiny shapes in fp32 on any device (CI runs it on CPU: the verify part uses the C++ op there)
  --plant PLANT: plant a bug to see the check fail naming its part: parity (non-causal SDPA), packed (no
               document mask), packed-boundary (each example's first token sees the one before), verify (a
               wrong verify op), speculative (a lossy decoder)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance, read_rows

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("env", "parity", "packed", "cp", "verify", "speculative", "throughput")
# The bounds each part is held to (stated once; the README quotes them).
TOLERANCES = {
    "parity_first_rel": 1e-2,  # bf16: local vs SDPA loss at step 1 (same weights, same batch)
    "parity_rel": 3e-2,  # and at the next steps (the runs drift apart by rounding)
    "packed_mean_rel": 1e-2,  # flex vs dense mask: mean per-token loss, relative
    "packed_max_abs": 0.25,  # and the largest per-token difference (bf16 logits)
    "cp_rel": 1e-2,  # CP 2 vs CP 1 losses, each step (bf16: the split attention rounds differently)
}
# Seconds each part may take at most (on one H100); throughput gets what the budget has left.
LIMITS = {"parity": 100, "packed": 90, "cp": 90, "verify": 90, "speculative": 210, "throughput": 240}
# What --plant can plant -> the part that must then fail.
PLANTS = {"parity": "parity", "packed": "packed", "packed-boundary": "packed", "verify": "verify",
          "speculative": "speculative"}
PROBE_PLANT = {"parity": "noncausal", "packed": "no-document-mask", "packed-boundary": "boundary"}


class Check:
    def __init__(self, out: Path, budget: float, smoke: bool, plant: str | None, args_line: str, reuse_pair: bool = False):
        self.out, self.smoke, self.plant, self.reuse_pair = out, smoke, plant, reuse_pair
        self.deadline = time.time() + budget
        self.report: dict = {"smoke": smoke, "tolerances": TOLERANCES, "provenance": provenance(args_line), "parts": {}}

    def left(self, part: str) -> int:
        """Seconds the next command of `part` may take (CPU smoke runs get more: 2 cores, not a GPU)."""
        return int(max(0, min(LIMITS.get(part, 60) * (4 if self.smoke else 1), self.deadline - time.time())))

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2))
        tmp.replace(self.out / "gpu_check.json")

    def run(self, cmd: list, limit: int, log: Path, results=(), extra_env: dict | None = None) -> dict:
        """One command of a part; its output goes to `log`, the tail into the result when it fails. `results`
        (files or directories it writes) are removed first: a failed run never reports an earlier run's figures.
        The command runs in a process group of its own, killed whole at the time limit (a training it started
        must not go on holding the GPU)."""
        for path in map(Path, results):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        t0 = time.time()
        if limit < 5:
            return {"rc": "not reached", "error": "no time left in the budget"}
        # each part is a job of its own: never a rendezvous address this process was started with
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            out, rc = p.communicate(timeout=limit)[0], p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, rc = p.communicate()[0], f"timeout after {limit}s"
        out = out.decode(errors="replace")
        log.write_text(out)
        print(out[-2000:], flush=True)
        r = {"seconds": round(time.time() - t0, 1), "rc": rc}
        if rc != 0:
            r["error"] = out.strip()[-800:]
        return r


def losses(run_dir: Path) -> dict[int, float]:
    f = run_dir / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r} if f.exists() else {}


# ---- parts: each returns its record; `wrong` lists what disagrees with its bound ----
def part_env(c: Check, py: str) -> dict:
    import torch

    from megatron_soaes.models.attention import have_flex_attention
    from megatron_soaes.models.megatron import have_transformer_engine

    cuda = torch.cuda.is_available()
    return dict(torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if cuda else "cpu",
                transformer_engine=have_transformer_engine(), flex_attention=have_flex_attention(), wrong=[])


def shapes(c: Check) -> tuple[str, str]:
    """(common --set overrides, dtype) of the training parts."""
    if c.smoke:
        return "train.dtype=fp32,model.preset=tiny,data.seq_length=256,optim.warmup_steps=1", "fp32"
    return "train.dtype=bf16", "bf16"


def probe(c: Check, py: str, kind: str, part: str, dev: str, dtype: str, shape: list) -> dict:
    """attention_probe.py: which losses a changed token moves (exact), planted where --plant says."""
    out = c.out / f"{kind}_probe.json"
    cmd = [py, "benchmarks/attention_probe.py", "--probe", kind, "--device", dev, "--dtype", dtype, "--json", out, *shape]
    if c.plant in PROBE_PLANT and PLANTS[c.plant] == part:
        cmd += ["--plant", PROBE_PLANT[c.plant]]
    r = c.run(cmd, c.left(part), c.out / f"{kind}_probe.log", results=[out])
    r["rows"] = read_rows(out) or []
    r["wrong"] = [f"{row['path']}: {w}" for row in r["rows"] for w in row["wrong"]]
    if not r["rows"]:
        r["wrong"].append(f"no probe result ({r['rc']})")
    return r


def part_parity(c: Check, py: str, dev: str, dtype: str) -> dict:
    base, _ = shapes(c)
    local = f"{base},train.transformer_impl=local"  # megatron's local layers even where TE imports
    out = c.out / "parity"
    cmd = [py, "benchmarks/train_throughput.py", "--config", "examples/gpu/cpt_throughput.yaml", "--steps", "3",
           "--log-interval", "1", "--out", out, "--variant", f"local attention=1:{local},train.attention=megatron_local",
           "--variant", f"SDPA=1:{local},train.attention=sdpa"]
    r = c.run(cmd, c.left("parity"), c.out / "parity.log", results=[out])
    a, b = losses(out / "local_attention"), losses(out / "SDPA")
    steps = sorted(set(a) & set(b))
    rel = [abs(b[s] - a[s]) / abs(a[s]) for s in steps]
    r.update(steps=steps, local_attention=[a[s] for s in steps], sdpa=[b[s] for s in steps], rel_diff=rel,
             max_rel_diff=max(rel) if rel else None, wrong=[])
    if not steps:
        r["wrong"].append(f"no common logged steps ({r['rc']})")
    elif rel[0] > TOLERANCES["parity_first_rel"] or max(rel) > TOLERANCES["parity_rel"]:
        r["wrong"].append(f"local vs SDPA losses differ: rel {['%.2e' % x for x in rel]} (bounds "
                          f"{TOLERANCES['parity_first_rel']} at step 1, {TOLERANCES['parity_rel']} after)")
    r["causal_probe"] = probe(c, py, "causal", "parity", dev, dtype, probe_shape(c, packed=False))
    r["wrong"] += r["causal_probe"]["wrong"]
    return r


def probe_shape(c: Check, packed: bool) -> list:
    if c.smoke:
        return ["--preset", "test", "--seq", "256"]
    return ["--preset", "qwen2.5-0.5b", "--seq", "1024", "--mbs", "2", "--per-row", "8" if packed else "1"]


def part_packed(c: Check, py: str, dev: str, dtype: str) -> dict:
    shape = ["--preset", "test", "--seq", "256", "--mbs", "2", "--steps", "1"] if c.smoke else \
            ["--preset", "qwen2.5-0.5b", "--seq", "2048", "--mbs", "4", "--per-row", "8", "--steps", "3"]
    r = c.run([py, "benchmarks/packed_attention.py", "--device", dev, "--dtype", dtype, "--json", c.out / "packed.json",
               *shape], c.left("packed"), c.out / "packed.log", results=[c.out / "packed.json"])
    r.update((read_rows(c.out / "packed.json") or [{}])[0])
    r["wrong"] = []
    if "max_abs_loss_diff" not in r:
        r["wrong"].append(f"no result ({r['rc']})")
    elif r["mean_rel_loss_diff"] > TOLERANCES["packed_mean_rel"] or r["max_abs_loss_diff"] > TOLERANCES["packed_max_abs"]:
        r["wrong"].append(f"flex vs dense per-token losses differ: mean rel {r['mean_rel_loss_diff']:.2e}, max abs "
                          f"{r['max_abs_loss_diff']:.2e} (bounds {TOLERANCES['packed_mean_rel']}, {TOLERANCES['packed_max_abs']})")
    r["packed_probe"] = probe(c, py, "packed", "packed", dev, dtype, probe_shape(c, packed=True))
    r["wrong"] += r["packed_probe"]["wrong"]
    return r


def part_cp(c: Check, py: str) -> dict:
    """CP 2 = CP 1 (losses per step). Both runs use gloo, so the two CP ranks can share one GPU."""
    base, _ = shapes(c)
    local = f"{base},train.transformer_impl=local,train.attention=sdpa,train.global_batch_size=2,train.micro_batch_size=1"
    if not c.smoke:
        local += ",data.seq_length=4096"
    out = c.out / "cp"
    cmd = [py, "benchmarks/train_throughput.py", "--config", "examples/gpu/cpt_throughput.yaml", "--steps", "3",
           "--log-interval", "1", "--out", out, "--variant", f"CP 1=1:{local}",
           "--variant", f"CP 2=2:{local},parallel.context_parallel=2"]
    r = c.run(cmd, c.left("cp"), c.out / "cp.log", results=[out], extra_env={"SOAES_DIST_BACKEND": "gloo"})
    rows = {x["variant"]: x for x in read_rows(out / "train_throughput.json") or []}
    a, b = (rows.get(v, {}).get("losses") or [] for v in ("CP 1", "CP 2"))
    rel = [abs(y - x) / abs(x) for x, y in zip(a, b)]
    r.update(cp1=a, cp2=b, rel_diff=rel, max_rel_diff=max(rel) if rel else None, wrong=[],
             tokens_per_s={v: x.get("tokens_per_s") for v, x in rows.items()})
    if not rel or len(a) != len(b):
        why = "; ".join(f"{v}: {x['skipped']}" for v, x in rows.items() if x.get("skipped")) or r["rc"]
        r["wrong"].append(f"no losses of both layouts ({why})")
    elif max(rel) > TOLERANCES["cp_rel"]:
        r["wrong"].append(f"CP 2 vs CP 1 losses differ: rel {['%.2e' % x for x in rel]} (bound {TOLERANCES['cp_rel']})")
    return r


def wait_for_op(c: Check, dev: str) -> str | None:
    """tools/gpu_check.sh builds the op in the background: wait for it (its log says when it is done)."""
    flag = os.environ.get("SOAES_OP_BUILD_DONE")
    while flag and not Path(flag).exists() and time.time() < c.deadline:
        time.sleep(2)
    if flag:
        log = Path(flag).with_name("op_build.log")
        if not Path(flag).exists():
            return "the op build did not finish within the budget"
        if "rc=0" not in (log.read_text() if log.exists() else ""):
            return f"the op build failed (see {log})"
    from megatron_soaes.speculative.verify import native_available

    return None if native_available(dev) else f"the native tree_verify op is not built for {dev}"


def part_verify(c: Check, py: str, dev: str) -> dict:
    why = wait_for_op(c, dev)
    if why:
        return {"wrong": [why]}
    cmd = [py, "benchmarks/verify_op.py", "--device", dev, "--json", c.out / "verify.json"]
    if c.smoke:
        cmd += ["--vocab", "8064", "--repeat", "2"]
    if c.plant == "verify":
        cmd.append("--plant-bug")
    r = c.run(cmd, c.left("verify"), c.out / "verify.log", results=[c.out / "verify.json"])
    rows = read_rows(c.out / "verify.json") or []
    r.update(rows=rows, wrong=[f"{x['draft']}, vocab {x['vocab']}: the op's output differs from the PyTorch reference"
                               for x in rows if not x["same_output"]])
    if not rows:
        r["wrong"].append(f"no result ({r['rc']})")
    return r


def part_speculative(c: Check, py: str, dev: str) -> dict:
    pair = c.out / "spec_pair"
    steps = 6 if c.smoke else 100
    common = ["--set", f"train.steps={steps}", "--set", "train.save_interval=0", "--set", "train.eval_interval=0",
              "--set", "train.tensorboard=false", "--set", f"train.dtype={'fp32' if c.smoke else 'bf16'}"]
    ckpt = lambda who: f"{pair}/{who}/checkpoints/iter_{steps:07d}"  # noqa: E731
    target = [py, "-m", "megatron_soaes.cli", "train", "--config", "examples/spec/target_cpt.yaml", *common,
              "--set", f"train.output_dir={pair}/target"]
    draft = [py, "-m", "megatron_soaes.cli", "train", "--config", "examples/spec/draft_distill.yaml", *common,
             "--set", f"train.output_dir={pair}/draft", "--set", f"distill.teacher.checkpoint={ckpt('target')}"]
    if c.smoke:
        target += ["--set", "model.preset=tiny", "--set", "optim.warmup_steps=1"]
        draft += ["--set", "distill.teacher.preset=tiny", "--set", "optim.warmup_steps=1"]
    r: dict = {"wrong": []}
    for who, cmd in (("train_target", target), ("train_draft", draft)):
        if c.reuse_pair and (Path(ckpt(who.split("_")[1])) / "manifest.json").exists():
            r[who] = {"rc": 0, "reused": ckpt(who.split("_")[1])}
            continue
        r[who] = c.run(cmd, c.left("speculative"), c.out / f"spec_{who}.log", results=[pair / who.split("_")[1]])
        if r[who]["rc"] != 0:
            r["wrong"].append(f"{who} failed")
            return r
    # fp32 decoding: speculative output must equal greedy token for token (bf16 rounding differs by shape)
    cmd = [py, "benchmarks/spec_decode.py", "--target", ckpt("target"), "--draft", ckpt("draft"),
           "--tokenizer", "data/demo/tokenizer.json", "--prompts", "data/demo/corpora/domain.test.jsonl",
           "--num-prompts", "4" if c.smoke else "8", "--prompt-len", "48", "--max-new-tokens", "16" if c.smoke else "64",
           "--device", dev, "--dtype", "fp32", "--no-hf"]
    if c.plant == "speculative":
        cmd.append("--plant-bug")
    runs = {"eager": cmd + ["--gammas", "2", "4", "--trees", "2,1", "2,2,1", "dynamic", "--batch-sizes",
                            *(["1", "4"] if c.smoke else ["1", "4", "16"])]}
    if dev == "cuda":  # one setting per mode: every (batch, block, cache size) shape is captured once
        runs["graphs"] = cmd + ["--gammas", "4", "--trees", "2,2,1", "--batch-sizes", "1", "4", "--cuda-graphs"]
    for tag, run_cmd in runs.items():
        res = c.run(run_cmd + ["--out", c.out / f"spec_{tag}"], c.left("speculative"), c.out / f"spec_{tag}.log",
                    results=[c.out / f"spec_{tag}"])
        res["rows"] = read_rows(c.out / f"spec_{tag}" / "spec_decode.json")
        r[tag] = res
        if not res["rows"]:
            r["wrong"].append(f"{tag}: no result ({res.get('rc')})")
            continue
        r["wrong"] += [f"{tag}: batch {x['batch']} {x['method']}: output differs from target-only greedy"
                       for x in res["rows"] if not x["exact"]]
    if dev != "cuda":
        r["graphs"] = {"skipped": "no CUDA device"}
    elif r["eager"]["rows"] and r["graphs"]["rows"]:
        sha = lambda rows: {x["outputs_sha1"] for x in rows if x.get("outputs_sha1")}  # noqa: E731
        if sha(r["eager"]["rows"]) != sha(r["graphs"]["rows"]):
            r["wrong"].append("graphs: target-only tokens differ from the eager run's")
    return r


def part_throughput(c: Check, py: str) -> dict:
    base, _ = shapes(c)
    local = f"{base},train.transformer_impl=local"
    variants = {"0.5b": [f"SDPA=1:{local},train.attention=sdpa",
                         f"local attention=1:{local},train.attention=megatron_local",
                         f"SDPA mbs8=1:{local},train.attention=sdpa,train.micro_batch_size=8,train.global_batch_size=32",
                         f"TE=1:{base},train.transformer_impl=transformer_engine"],
                "1.5b": [f"SDPA=1:{local},train.attention=sdpa"]}
    configs = {"0.5b": "examples/gpu/cpt_throughput.yaml", "1.5b": "examples/gpu/cpt_throughput_1.5b.yaml"}
    r: dict = {"wrong": []}
    for name in ["0.5b"] if c.smoke else ["0.5b", "1.5b"]:
        cmd = [py, "benchmarks/train_throughput.py", "--config", configs[name], "--steps", "4" if c.smoke else "12",
               "--log-interval", "2" if c.smoke else "4", "--out", c.out / f"throughput_{name}"]
        for v in variants[name]:
            if not (c.smoke and "mbs8" in v):  # the smoke run checks the command, not the batch-size scaling
                cmd += ["--variant", v]
        res = c.run(cmd, c.left("throughput"), c.out / f"throughput_{name}.log", results=[c.out / f"throughput_{name}"])
        res["rows"] = read_rows(c.out / f"throughput_{name}" / "train_throughput.json") or []
        r[name] = res
        c.report["parts"]["throughput"] = r  # saved as it goes: a run cut short keeps the rows it has
        failed = [x["variant"] for x in res["rows"] if str(x.get("skipped", "")).startswith("failed")]
        r["wrong"] += [f"{name} {v}: the run failed" for v in failed]
        c.save()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--budget", type=float, default=330, help="seconds for all parts (throughput gets the rest)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, a few steps: checks the command (CPU too)")
    ap.add_argument("--plant", choices=PLANTS, default=None, help="plant a bug (the check must fail naming its part)")
    ap.add_argument("--reuse-pair", action="store_true",
                    help="the speculative part decodes with the pair an earlier run trained in --out (its final "
                         "checkpoints complete) instead of training it again")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke, py = args.smoke, sys.executable
    dev, dtype = ("cuda", "bf16") if torch.cuda.is_available() and not smoke else ("cpu", "fp32")
    if not smoke and dev != "cuda":
        raise SystemExit("error: gpu-check needs a CUDA GPU (use --smoke to check the command on CPU)")
    if not (ROOT / "data" / "demo" / "tokenizer.json").exists():
        raise SystemExit("error: data/demo missing: run `soaes prepare-demo-data --out data/demo` first")
    c = Check(out, float("inf") if smoke else args.budget, smoke, args.plant, " ".join(sys.argv), args.reuse_pair)
    parts = [p for p in PARTS if p in args.parts]
    runners = {"env": lambda: part_env(c, py), "parity": lambda: part_parity(c, py, dev, dtype),
               "packed": lambda: part_packed(c, py, dev, dtype), "cp": lambda: part_cp(c, py), "verify": lambda: part_verify(c, py, dev),
               "speculative": lambda: part_speculative(c, py, dev), "throughput": lambda: part_throughput(c, py)}
    print(f"gpu-check on {dev} ({'smoke, ' if smoke else ''}budget {args.budget:.0f}s), parts: {' '.join(parts)}", flush=True)
    for p in parts:
        t0 = time.time()
        try:
            rec = runners[p]()
        except Exception as e:  # a part that crashes is reported as wrong; the others still run
            rec = {"wrong": [f"crashed: {type(e).__name__}: {e}"]}
        rec["part_seconds"] = round(time.time() - t0, 1)
        c.report["parts"][p] = rec
        c.save()
        print(f"[gpu-check] {p}: {'WRONG: ' + '; '.join(rec['wrong']) if rec['wrong'] else 'ok'} "
              f"({rec['part_seconds']:.0f}s)", flush=True)
    c.report["seconds"] = round(sum(v["part_seconds"] for v in c.report["parts"].values()), 1)
    wrong = {p: v["wrong"] for p, v in c.report["parts"].items() if v["wrong"]}
    c.report["wrong"] = wrong
    c.save()
    try:
        plot(c.report, out / "gpu_check.png")
    except Exception as e:  # a plot never hides the verdict
        print(f"plot failed: {e}")
    print(summary(c.report), flush=True)
    if wrong:
        print(f"gpu-check FAILED: {', '.join(wrong)}", flush=True)
        sys.exit(1)
    print("gpu-check passed: every part within its bounds", flush=True)


def summary(report: dict) -> str:
    parts = report["parts"]
    lines = ["", "gpu-check summary"]
    for p, v in parts.items():
        lines.append(f"  {p:<12} {v['part_seconds']:>6.0f}s  {'WRONG' if v['wrong'] else 'ok'}")
    p = parts.get("parity", {})
    if p.get("max_rel_diff") is not None:
        lines.append(f"  parity local vs SDPA: losses {p['local_attention']} vs {p['sdpa']}, max rel diff {p['max_rel_diff']:.2e}")
    k = parts.get("packed", {})
    if "speedup_flex" in k:
        lines.append(f"  packed SFT: flex {k['speedup_flex']:.2f}x the dense mask, per-token loss diff mean rel "
                     f"{k['mean_rel_loss_diff']:.1e}, max {k['max_abs_loss_diff']:.1e}")
    cp = parts.get("cp", {})
    if cp.get("max_rel_diff") is not None:
        lines.append(f"  cp: CP 2 vs CP 1 losses {cp['cp2']} vs {cp['cp1']}, max rel diff {cp['max_rel_diff']:.2e}")
    for r in parts.get("verify", {}).get("rows") or []:
        lines.append(f"  verify vocab {r['vocab']} {r['draft']}: native {r['native_us']} us vs reference "
                     f"{r['reference_us']} us, same output {r['same_output']}")
    for tag in ("eager", "graphs"):
        for r in (parts.get("speculative", {}).get(tag) or {}).get("rows") or []:
            lines.append(f"  speculative ({tag}) batch {r['batch']} {r['method']}: {r['speedup']:.2f}x, "
                         f"{r['tokens_per_s']:.0f} tok/s, tau {r['tau'] or 0:.2f}, exact {r['exact']}")
    for name in ("0.5b", "1.5b"):
        for r in (parts.get("throughput", {}).get(name) or {}).get("rows") or []:
            if r.get("skipped"):
                lines.append(f"  throughput {name} {r['variant']}: skipped ({r['skipped'][:60]})")
            else:
                mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
                lines.append(f"  throughput {name} {r['variant']}: {r['tokens_per_s']:,.0f} tok/s, {r.get('ratio', 1):.2f}x{mfu}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = report["parts"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    bars = [(f"{n} {r['variant']}", r["tokens_per_s"]) for n in ("0.5b", "1.5b")
            for r in (parts.get("throughput", {}).get(n) or {}).get("rows") or [] if r.get("tokens_per_s")]
    if bars:
        axes[0].barh([b[0] for b in bars], [b[1] for b in bars])
    axes[0].set_xlabel("training tokens/s")
    axes[0].set_title("CPT throughput")
    for tag in ("eager", "graphs"):
        rows = [r for r in (parts.get("speculative", {}).get(tag) or {}).get("rows") or []
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
