#!/usr/bin/env python
"""The main job's figures as a results file: runs `soaes pipeline` on a config (every phase redone, so
the times are this code's), then records each phase's wall time and the report's figures (the
speculative rows of both drafts, the evaluation per phase, the export check) with their provenance.
The README's main-job figures are rendered from this file (benchmarks/tables.py).

  python benchmarks/main_job.py --config examples/smollm2/pipeline.yaml --out benchmarks/results/pipeline_smollm2.json
  python benchmarks/main_job.py --config examples/tiny/pipeline.yaml --out benchmarks/results/pipeline_tiny.json
  python benchmarks/main_job.py --collect outputs/tiny --out ...     # an existing run, not re-run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]


def collect(out_dir: Path) -> dict:
    phases = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / "phases").glob("*.json"))}
    from megatron_soaes.config.pipeline import PHASES

    from megatron_soaes.training.retention import RETENTION_FILE

    summary = json.loads((out_dir / "report" / "summary.json").read_text())
    gates = {str(p.relative_to(out_dir)): json.loads((p / RETENTION_FILE).read_text())
             for p in [out_dir / "cpt", *sorted((out_dir / "sft").glob("stage*"))] if (p / RETENTION_FILE).exists()}
    ev = phases["evaluate"]  # the evaluate phase's own record (a run stopped --until evaluate has no newer report)
    evaluate = {n: {**m, "qa_sets": {k: {x: v for x, v in q.items() if x != "scores"}  # per-item scores: in the run
                                     for k, q in (m.get("qa_sets") or {}).items()}}
                for n, m in ev["models"].items()}
    return {"phase_seconds": {p: phases[p]["seconds"] for p in PHASES if p in phases},
            "table": summary["table"], "evaluate": evaluate, "comparisons": ev.get("comparisons") or {},
            "evaluate_stages": phases.get("evaluate", {}).get("stages", {}),  # each SFT stage's end but the last
            "retention_gates": {k: {"metric": g.get("metric", "perplexity"), "min_ratio": g["min_ratio"], "action": g["action"],
                                    "history": [{x: r.get(x) for x in ("step", "ratio", "ppl_ratio", "accuracy_ratio", "decision")}
                                                for r in g["history"]]} for k, g in gates.items()},
            "curation": phases.get("data", {}).get("curation"),
            "export": {k: phases["export"][k] for k in ("target", "draft")} if "export" in phases else None,
            "speculative": summary["speculative"], "speculative_ce_draft": summary["speculative_ce_draft"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/smollm2/pipeline.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--collect", default=None, help="an existing pipeline output directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default=None, help="how the run was made, when not one clean run (with --collect)")
    args = ap.parse_args()
    if args.collect:
        out_dir, wall = Path(args.collect), None
    else:
        from megatron_soaes.workflows.pipeline import load_pipeline_config

        out_dir = Path(load_pipeline_config(args.config, args.set).output_dir)
        t0 = time.time()
        cmd = [sys.executable, "-m", "megatron_soaes.cli", "pipeline", "--config", args.config, "--force"]
        for s in args.set:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.time() - t0
    rows = collect(out_dir)
    rows["wall_seconds"] = wall if wall is not None else sum(rows["phase_seconds"].values())
    extra = {"note": args.note} if args.note else {}
    write_results(args.out, [], settings={"config": args.config, "set": args.set, "output_dir": str(out_dir)}, **extra,
                  **rows)
    print(f"wrote {args.out}: {rows['wall_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
