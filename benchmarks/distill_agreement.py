#!/usr/bin/env python
"""Does distillation make the draft agree with the target more than cross-entropy training does?

One run, side by side on the demo corpora: a tiny teacher (preset `tiny`) is pre-trained, then the
draft (preset `tiny-draft`) is trained for the same steps on the same data with
  ce only (kd_weight 0: the baseline)  and  forward KL, reverse KL, JSD(0.5), TVD (kd_weight 1).
Each student is scored against the teacher on held-out domain and general text: 1 - TVD and greedy
top-1 agreement (the quantities speculative decoding's acceptance depends on), plus its own loss.
Writes <out>/distill_agreement.{json,png}.

  python benchmarks/distill_agreement.py --out outputs/bench/distill [--teacher-steps 150 --student-steps 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from provenance import write_results

from megatron_soaes.training.metrics import last_eval

ROOT = Path(__file__).resolve().parents[1]


def run(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(path)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--out", default="outputs/bench/distill")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--student-steps", type=int, default=100)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--divergences", nargs="*", default=["forward_kl", "reverse_kl", "jsd", "tvd"])
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "tokenizer.json").exists():
        from megatron_soaes.data.demo_data import prepare_demo_data

        prepare_demo_data(data)
    common = {
        "data": {"tokenizer": str(data / "tokenizer.json"), "seq_length": args.seq_length,
                 "train": [{"path": str(data / "domain.train"), "weight": 0.7},
                           {"path": str(data / "general.train"), "weight": 0.3}],
                 "valid": {"domain": [{"path": str(data / "domain.valid")}],
                           "general": [{"path": str(data / "general.valid")}]}},
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 10},
    }
    tiny = {"preset": "tiny", "overrides": {"vocab_size": 8064}}
    teacher_out = out / "teacher"
    if not (teacher_out / "checkpoints" / "latest").exists():
        run({"kind": "cpt", "model": tiny, **common,
             "train": {"steps": args.teacher_steps, "global_batch_size": 16, "micro_batch_size": 8, "dtype": "fp32",
                       "log_interval": 25, "eval_iters": 4, "output_dir": str(teacher_out)}}, out / "teacher.yaml")
    ckpt = teacher_out / "checkpoints" / (teacher_out / "checkpoints" / "latest").read_text().strip()
    rows = []
    for name in ["ce only", *args.divergences]:
        sout = out / name.replace(" ", "_")
        if not (sout / "checkpoints" / "latest").exists():
            run({"kind": "distill", "model": {"preset": "tiny-draft", "overrides": {"vocab_size": 8064}}, **common,
                 "train": {"steps": args.student_steps, "global_batch_size": 16, "micro_batch_size": 8,
                           "dtype": "fp32", "log_interval": 25, "eval_iters": 4, "output_dir": str(sout)},
                 "distill": {"teacher": {**tiny, "checkpoint": str(ckpt)},
                             "divergence": "forward_kl" if name == "ce only" else name,
                             "kd_weight": 0.0 if name == "ce only" else 1.0}}, out / f"{sout.name}.yaml")
        ev = last_eval(sout)
        rows.append({"student": name, **{k: round(v, 4) for k, v in ev.items()}})
    base = rows[0]
    print(f"teacher: tiny ({args.teacher_steps} steps); draft: tiny-draft ({args.student_steps} steps, same data)")
    print(f"{'student':<12} {'dom 1-TVD':>10} {'dom top1':>9} {'gen 1-TVD':>10} {'gen top1':>9} {'dom CE':>8} {'gen CE':>8}")
    for r in rows:
        print(f"{r['student']:<12} {r['domain/1-tvd']:>10.4f} {r['domain/top1 agree']:>9.4f} {r['general/1-tvd']:>10.4f} "
              f"{r['general/top1 agree']:>9.4f} {r['domain/ce loss']:>8.3f} {r['general/ce loss']:>8.3f}")
    for r in rows[1:]:
        r["gain_domain_1-tvd"] = round(r["domain/1-tvd"] - base["domain/1-tvd"], 4)
        r["gain_domain_top1"] = round(r["domain/top1 agree"] - base["domain/top1 agree"], 4)
    write_results(out / "distill_agreement.json", rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [r["student"] for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["domain/1-tvd"] for r in rows], width=0.4, label="1 - TVD (domain)")
        ax.bar([i + 0.2 for i in x], [r["domain/top1 agree"] for r in rows], width=0.4, label="top-1 agreement (domain)")
        ax.set_xticks(list(x), names)
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("draft-teacher agreement on held-out domain text")
        fig.tight_layout()
        fig.savefig(out / "distill_agreement.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
