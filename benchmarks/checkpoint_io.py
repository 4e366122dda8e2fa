#!/usr/bin/env python
"""Training time lost to checkpoint saves: no save, synchronous saves and asynchronous saves
(`train.async_save`), side by side on the same job, for each model given.

Each variant is the same `soaes train` run (log every step, a save every `--save-every` steps). What a
save costs the run is read two ways from its metrics.jsonl: `save_blocked_s`, the seconds the training
loop waited in the save call (plus, for asynchronous saves, `save_publish_s`: the seconds the loop held
at the step that published a finished background save -- waiting for every rank, the manifest's
hashing, the rename), and the extra wall time of the steps that follow a save against the
no-save run's median step (a background writer still competes for the same cores). Ratios are async
against sync. Writes <out> (JSON) and a PNG beside it.

  python benchmarks/checkpoint_io.py --models tiny small --out benchmarks/results/checkpoint_io_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"no save": ["train.save_interval=0"], "sync save": [], "async save": ["train.async_save=true"]}


def run(config: str, model: str, variant: str, steps: int, every: int, workdir: Path) -> dict:
    out = workdir / f"{model}-{variant.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"model.preset={model}", f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0",
            f"train.save_interval={every}", "train.keep_last=2", "optim.warmup_steps=2", "train.global_batch_size=8",
            "train.micro_batch_size=8", f"train.output_dir={out}", *VARIANTS[variant]]
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    with tempfile.TemporaryFile("w+") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True).returncode
        if rc:
            log.seek(0)
            raise SystemExit(f"{variant} / {model} failed ({rc}):\n{log.read()[-3000:]}")
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps_ = {r["step"]: r for r in recs if "loss" in r}
    # step s's tokens/s covers the time since step s-1 was logged: its own step plus s-1's save
    seq = json.loads((out / "resolved_config.json").read_text())["job"]["data"]["seq_length"]
    step_s = {s: 8 * seq / r["tokens_per_s"] for s, r in steps_.items()}
    blocked = [r["save_blocked_s"] for r in steps_.values() if "save_blocked_s" in r]
    publish = [r["save_publish_s"] for r in steps_.values() if "save_publish_s" in r]
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    n_ckpt = sum(1 for p in (out / "checkpoints").iterdir() if p.is_dir())
    return {"steps": step_s, "blocked": blocked, "publish": publish, "ckpt_mb": size / max(n_ckpt, 1) / 1e6 if n_ckpt else 0.0,
            "losses": [steps_[s]["loss"] for s in sorted(steps_)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/tiny/cpt.yaml")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--workdir", default="outputs/bench_checkpoint_io")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = ROOT / args.workdir  # the runs start in ROOT; an absolute --workdir stays as given
    rows = []
    for model in args.models:
        res = {v: run(args.config, model, v, args.steps, args.save_every, work) for v in VARIANTS}
        # skip step 1 (warm-up) and the final step (its save is the run's last, waited for at exit)
        base = statistics.median(t for s, t in res["no save"]["steps"].items() if 1 < s < args.steps)
        # the steps right after a save, from the second save on (the first one starts the writer's manager)
        after = [s + 1 for s in range(2 * args.save_every, args.steps - 1, args.save_every)]
        for v, r in res.items():
            lost = [r["steps"][s] - base for s in after] if v != "no save" else []
            rows.append({"model": model, "variant": v, "median_step_s": round(base if v == "no save" else statistics.median(
                t for s, t in r["steps"].items() if 1 < s < args.steps and s not in after), 4),
                "checkpoint_mb": round(r["ckpt_mb"], 1), "saves": len(r["blocked"]),
                "blocked_s_per_save": round(statistics.mean(r["blocked"][1:-1] or r["blocked"] or [0.0]), 4),
                "publish_held_s_per_save": round(statistics.mean(r["publish"]), 4) if r["publish"] else None,
                "wall_lost_s_per_save": round(statistics.mean(lost), 4) if lost else 0.0,
                "same_losses_as_no_save": r["losses"] == res["no save"]["losses"]})
        sync = next(r for r in rows if r["model"] == model and r["variant"] == "sync save")
        asy = next(r for r in rows if r["model"] == model and r["variant"] == "async save")
        for r in (sync, asy):
            r["blocked_vs_sync"] = round(r["blocked_s_per_save"] / max(sync["blocked_s_per_save"], 1e-9), 3)
            r["wall_lost_vs_sync"] = round(r["wall_lost_s_per_save"] / max(sync["wall_lost_s_per_save"], 1e-9), 3)
    print(f"{'model':6} {'variant':11} {'ckpt MB':>8} {'step s':>7} {'blocked s/save':>15} {'vs sync':>8} "
          f"{'publish held s':>15} {'wall lost s/save':>17} {'vs sync':>8} same losses")
    for r in rows:
        print(f"{r['model']:6} {r['variant']:11} {r['checkpoint_mb']:8.1f} {r['median_step_s']:7.3f} "
              f"{r['blocked_s_per_save']:15.3f} {r.get('blocked_vs_sync', 0):8.3f} {r['publish_held_s_per_save'] or 0:15.3f} "
              f"{r['wall_lost_s_per_save']:17.3f} "
              f"{r.get('wall_lost_vs_sync', 0):8.3f} {r['same_losses_as_no_save']}")
    path = write_results(args.out, rows, note="blocked: seconds the training loop waited in save() (the first "
                         "save, which starts megatron-core's writer manager, and the last, waited for at exit, are "
                         "left out); publish held: seconds the loop held at the step that published a background save; wall lost: extra seconds of the step after a save vs the no-save run's median step")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['model']}\n{r['variant']}" for r in rows if r["variant"] != "no save"]
        ax.bar(labels, [r["blocked_s_per_save"] for r in rows if r["variant"] != "no save"], label="blocked in save()")
        ax.bar(labels, [r["wall_lost_s_per_save"] for r in rows if r["variant"] != "no save"], alpha=0.5,
               label="wall time lost")
        ax.set_ylabel("seconds per save")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
