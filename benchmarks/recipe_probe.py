#!/usr/bin/env python
"""Training runs side by side, as a results file: for each run directory (a `soaes train` / pipeline phase
output with metrics.jsonl and resolved_config.json), the settings that were varied and where its loss
went. Used to record the tiny main job's recipe search (README "Why the tiny job's models do not answer"), so the figures quoted
about it are backed by a file.

  python benchmarks/recipe_probe.py outputs/exp_a/cpt outputs/exp_b/cpt --note "..." --out benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provenance import write_results


def run_row(d: Path) -> dict:
    job = json.loads((d / "resolved_config.json").read_text())["job"]
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    every = max(1, len(steps) // 8)
    return {"run": str(d), "model": job["model"].get("preset") or job["model"].get("hf_config"),
            "vocab": job["model"].get("overrides", {}).get("vocab_size"),
            "init": job["model"].get("init_checkpoint"),
            "data": [(s.get("name") or s["path"], s["weight"]) for s in job["data"]["train"]] if job["data"]["train"]
            else None,
            "lr": job["optim"]["lr"], "global_batch_size": job["train"]["global_batch_size"],
            "seq_length": job["data"]["seq_length"], "steps_run": len(steps),
            "tokens": sum(steps[-1].get("source_tokens", {}).values()) if steps else 0,
            "loss_curve": [(r["step"], round(r["loss"], 3)) for r in steps[::every]] +
                          ([(steps[-1]["step"], round(steps[-1]["loss"], 3))] if steps else []),
            "final_eval": evals[-1]["eval"] if evals else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [run_row(Path(d)) for d in a.runs]
    print(write_results(a.out, rows, note=a.note))


if __name__ == "__main__":
    main()
