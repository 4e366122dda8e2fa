#!/usr/bin/env python
"""Curation throughput, rule by rule: documents/s, MB/s and peak memory of `soaes curate` with one rule at a
time and with all of them, on the demo CPT corpora (real law articles + general text, against the pipeline's
evaluation items) and on a synthetic 100k-document corpus (sentences of the demo corpora recombined, with
planted duplicates); then how long 100 GB would take on one node at the measured rate.

  python benchmarks/curate.py --config examples/tiny/pipeline.yaml --out benchmarks/results/curate_cpu.json
(the pipeline's data phase must have run: its demo data directory is read)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from measure import run_measured
from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
OFF = ["exact_dedup=false", "near_dedup=false", "decontaminate=false", "quality.min_chars=null",
       "quality.max_chars=null", "quality.max_symbol_ratio=null", "quality.max_digit_ratio=null",
       "quality.min_text_ratio=null", "quality.max_duplicate_line_fraction=null", "quality.max_duplicate_ngram_fraction=null"]
RULES = {  # what each run turns back on (everything else off)
    "read + write only": [],
    "exact dedup": ["exact_dedup=true"],
    "near dedup (MinHash + LSH)": ["near_dedup=true"],
    "quality rules": ["quality.min_chars=20", "quality.max_chars=200000", "quality.max_symbol_ratio=0.1",
                      "quality.max_digit_ratio=0.3", "quality.min_text_ratio=0.5", "quality.max_duplicate_line_fraction=0.3",
                      "quality.max_duplicate_ngram_fraction=0.5"],
    "decontamination": ["decontaminate=true"],
    "all (the default config)": None,
}


def synthetic(src: list[Path], n: int, out: Path, seed: int = 0) -> Path:
    """`n` documents of 4-12 sentences drawn from the demo corpora; 5% exact and 5% edited copies."""
    rng = random.Random(seed)
    sents = []
    for f in src:
        for line in open(f, encoding="utf-8"):
            sents += [s + "。" for s in json.loads(line)["text"].replace("\n", "").split("。") if len(s) > 8]
    docs = []
    with open(out, "w", encoding="utf-8") as w:
        for i in range(n):
            r = rng.random()
            if docs and r < 0.05:
                text = rng.choice(docs)
            elif docs and r < 0.10:
                t = list(rng.choice(docs))
                for _ in range(3):
                    t[rng.randrange(len(t))] = "的"
                text = "".join(t)
            else:
                text = "".join(rng.choice(sents) for _ in range(rng.randint(4, 12)))
                docs.append(text)
                docs = docs[-5000:]
            w.write(json.dumps({"id": f"syn{i}", "text": text}, ensure_ascii=False) + "\n")
    return out


def run(name: str, sources: dict, evals: list[Path], sets: list[str] | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "curate", "--out", str(out)]
    for k, p in sources.items():
        cmd += ["--source", f"{k}={p}"]
    for e in evals:
        cmd += ["--eval", str(e)]
    for s in ([] if sets is None else OFF + sets):
        cmd += ["--set", s]
    rc, seconds, peak = run_measured(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rc:
        raise SystemExit(f"{name}: soaes curate failed ({rc})")
    s = json.loads((out / "curation.json").read_text())
    docs = sum(v["read"] for v in s["per_source"].values())
    mb = sum(v["bytes_read"] for v in s["per_source"].values()) / 1e6  # of jsonl read
    removed = {}
    for v in s["per_source"].values():
        for k, c in v["removed"].items():
            removed[k] = removed.get(k, 0) + c
    work = s["seconds"]  # curate's own time (index building included), without the process start
    return {"rule": name, "documents": docs, "MB": round(mb, 1), "seconds": round(work, 2), "wall_s": round(seconds, 2),
            "docs_per_s": round(docs / work, 1), "MB_per_s": round(mb / work, 2),
            "peak_rss_MB": round(peak / 1e6), "removed": removed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/tiny/pipeline.yaml"), help="a pipeline whose data phase ran")
    ap.add_argument("--synthetic-docs", type=int, default=100_000)
    ap.add_argument("--work", default=str(ROOT / "outputs/bench_curate"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/curate_cpu.json"))
    args = ap.parse_args()
    import shutil

    sys.path.insert(0, str(ROOT))
    from megatron_soaes.config.pipeline import load_pipeline_config
    from megatron_soaes.data.demo_data import curate_demo_data
    from megatron_soaes.workflows.pipeline import Pipeline

    pipe = Pipeline(load_pipeline_config(args.config), log=lambda *_: None)
    data, work = pipe.data, Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    demo = {n: data / "corpora" / f"{n}.train.jsonl" for n in ("domain", "general")}
    evals = [data / "corpora" / f"{n}.jsonl" for n in ("domain.valid", "domain.test", "general.valid", "general.test")]
    evals += [data / "sft" / f"{n}.test.jsonl" for n in ("consultation", "recitation", "soae_qa")]
    syn = synthetic(list(demo.values()), args.synthetic_docs, work / "synthetic.jsonl")
    rows = []
    for corpus, sources in (("demo CPT corpora", demo), (f"synthetic {args.synthetic_docs // 1000}k", {"syn": syn})):
        for rule, sets in RULES.items():
            r = run(rule, sources, evals, sets, work / f"run{len(rows)}")
            rows.append({"corpus": corpus, **r})
            print(f"{corpus:<20} {rule:<28} {r['docs_per_s']:>9,.0f} docs/s {r['MB_per_s']:>7.2f} MB/s "
                  f"peak {r['peak_rss_MB']:>5} MB  removed {r['removed']}", flush=True)
    # what the pipeline's data phase removed from the demo data (the same call: reused when up to date)
    demo_summary = curate_demo_data(data, pipe.cfg.data.curation, pipe.mcq_files(), log=lambda *_: None)
    demo_counts = {f"{k}/{n}": {"read": st["read"], "kept": st["kept"], "removed": st["removed"]}
                   for k, summ in demo_summary.items() for n, st in summ["per_source"].items()}
    full = next(r for r in rows if r["corpus"].startswith("synthetic") and r["rule"].startswith("all"))
    hours = 100_000 / full["MB_per_s"] / 3600
    cmd = "python benchmarks/curate.py " + " ".join(sys.argv[1:])
    write_results(args.out, rows, cmd, demo_pipeline_curation=demo_counts, extrapolation={
        "100GB_hours_this_machine": round(hours, 1),
        "note": "the full config's MB/s on the synthetic corpus with 2 workers; the per-record work scales with "
                "workers (a node's cores), the in-order decisions and the LSH index stay in one process, and "
                "memory grows with the kept documents' signatures (num_perm x 8 bytes each + LSH buckets)"})
    print(f"100 GB at {full['MB_per_s']:.2f} MB/s: {hours:.1f} h on this machine (2 workers)")


if __name__ == "__main__":
    main()
