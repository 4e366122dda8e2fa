#!/usr/bin/env python
"""The replay / retention trade-off: CPT of the same general-pretrained base at several replay weights
(and replay schedules), side by side -- the domain perplexity gained against the general ability kept,
both measured on held-out validation text against the base (the gate's step-0 evaluation), as a table
and a plot. The reference system's 99.8% retention sits somewhere on this curve.

  python benchmarks/replay_retention.py --config examples/tiny/pipeline.yaml --steps 60 \\
      --out benchmarks/results/replay_retention_cpu.json
The base is the pipeline's `base` phase (run here first if it has not been: data + general pre-training).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("replay 0", 0.0, "constant", 0.0), ("replay 0.1", 0.1, "constant", 0.0), ("replay 0.3", 0.3, "constant", 0.0),
            ("replay 0.5", 0.5, "constant", 0.0), ("replay 0.5 -> 0.1, cosine", 0.5, "cosine", 0.1)]


def evals(run: Path) -> dict[int, dict]:
    out = {}
    for line in open(run / "metrics.jsonl"):
        r = json.loads(line)
        if "eval" in r:
            out[r["step"]] = r["eval"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/tiny/pipeline.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default=str(ROOT / "outputs/replay_retention"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/replay_retention_cpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from megatron_soaes.config import replace
    from megatron_soaes.config.pipeline import load_pipeline_config
    from megatron_soaes.workflows.pipeline import Pipeline

    work = Path(args.work)
    sets = [*args.set, f"output_dir={work / 'pipeline'}", f"cpt.steps={args.steps}"]
    cli = [sys.executable, "-m", "megatron_soaes.cli"]
    subprocess.run([*cli, "pipeline", "--config", args.config, *[x for s in sets for x in ("--set", s)], "--until", "base"],
                   cwd=ROOT, check=True)
    rows = []
    for label, weight, style, end in SETTINGS:
        sets_w = [*sets, f"cpt.replay_weight={weight}", f"cpt.replay_style={style}", f"cpt.replay_end={end}",
                  "retention.min_ratio=1e-9", "retention.action=warn", f"retention.eval_interval={max(args.steps // 4, 1)}"]
        pipe = Pipeline(load_pipeline_config(args.config, sets_w), log=lambda *_: None)
        job = pipe.cpt_job()
        run = work / label.replace(" ", "_").replace(">", "").replace(",", "")
        job = replace(job, train=replace(job.train, output_dir=str(run), save_interval=0, tensorboard=False))
        cfg = work / f"{run.name}.yaml"
        cfg.write_text(yaml.safe_dump(job.model_dump(), allow_unicode=True))
        if not (run / "retention.json").exists():
            subprocess.run([*cli, "train", "--config", str(cfg)], cwd=ROOT, check=True)
        ev, gate = evals(run), json.loads((run / "retention.json").read_text())
        first, last = ev[0], ev[max(ev)]
        tokens = [json.loads(x) for x in open(run / "metrics.jsonl") if '"source_tokens"' in x][-1]["source_tokens"]
        total = sum(tokens.values())
        general_share = tokens.get("1", 0) / total if len(job.data.train) > 1 else 0.0
        rows.append({"setting": label, "replay_start": weight, "style": style, "replay_end": end if style != "constant" else weight,
                     "general_token_share": round(general_share, 4),
                     "domain_ppl_base": math.exp(first["domain"]), "domain_ppl_cpt": math.exp(last["domain"]),
                     "domain_gain": math.exp(first["domain"] - last["domain"]),
                     "general_ppl_base": math.exp(first["general"]), "general_ppl_cpt": math.exp(last["general"]),
                     "general_retention": gate["history"][-1]["ratio"],
                     "retention_curve": [round(h["ratio"], 4) for h in gate["history"]]})
        r = rows[-1]
        print(f"{label:<28} general share {r['general_token_share']:.3f}  domain ppl {r['domain_ppl_base']:.1f} -> "
              f"{r['domain_ppl_cpt']:.1f} (gain {r['domain_gain']:.2f}x)  general retention {r['general_retention']:.3f}", flush=True)
    cmd = "python benchmarks/replay_retention.py " + " ".join(sys.argv[1:])
    write_results(args.out, rows, cmd, config=args.config, steps=args.steps,
                  note="domain gain = base/CPT domain validation perplexity; general retention = base/CPT general "
                       "validation perplexity (both on held-out text, the gate's step-0 evaluation as the base)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in rows:
            ax.scatter(r["general_retention"], r["domain_gain"], s=40)
            ax.annotate(r["setting"], (r["general_retention"], r["domain_gain"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("general retention (base ppl / CPT ppl)")
        ax.set_ylabel("domain gain (base ppl / CPT ppl)")
        ax.set_title(f"replay vs retention, {args.steps} CPT steps")
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
