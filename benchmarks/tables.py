#!/usr/bin/env python
"""The result tables of the README and the manual (docs/*.md), rendered from the committed results files
they cite, so no figure in a table can drift from its file: each table sits between
``<!-- table: NAME -->`` and ``<!-- /table -->`` and is exactly `render(NAME)` of
``benchmarks/results/NAME.json`` (a test holds every page to it).

  python benchmarks/tables.py            # check: exit 1 naming the tables that differ
  python benchmarks/tables.py --write    # rewrite every page's tables from the files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def pages() -> list[Path]:
    """Every page that may hold result tables."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- table: (?P<name>[\w.@-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def source_line(data: dict, name: str) -> str:
    p = data["provenance"]
    m = p["machine"]
    where = m.get("gpu") or f"{m['cores']} cores ({m['cpu']})"
    return (f"`benchmarks/results/{name}.json`: commit {p['commit']}{' (+ local changes)' if p.get('dirty') else ''}, "
            f"{p['date']}, {where}, `{p['command']}`")


def spec_decode(data: dict) -> list[str]:
    lines = ["| method | batch | nodes | tokens/s | tau | alpha | speedup | identical to greedy |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r.get('batch', 1)} | {_f(r['nodes'], 'd')} | {r['tokens_per_s']:.1f} | "
                     f"{_f(r['tau'], '.2f')} | {_f(r['alpha'], '.2f')} | {r['speedup']:.2f}x | {'yes' if r['exact'] else 'NO'} |")
    return lines


def train_throughput(data: dict) -> list[str]:
    moe = any(r.get("moe_load_worst") for r in data["rows"])  # MoE variants: expert load and aux loss too
    extra = " expert load max/mean (worst layer) | aux loss |" if moe else ""
    lines = ["| variant | processes | tokens/s | ratio | final loss |" + extra, "|---|---|---|---|---|" + "---|---|" * moe]
    for r in data["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['variant']} | {r['nproc']} | skipped: {r['skipped'][:60]} | - | - |" + " - | - |" * moe)
        else:
            tail = f" {_f(r.get('moe_load_worst'), '.2f')} | {_f(r.get('moe_aux_loss'), '.3f')} |" if moe else ""
            lines.append(f"| {r['variant']} | {r['nproc']} | {r['tokens_per_s']:,.0f} | {r.get('ratio', 1):.3f} | "
                         f"{r['final_loss']:.6f} |" + tail)
    return lines


def pipeline(data: dict) -> list[str]:
    secs = data["phase_seconds"]
    lines = ["| " + " | ".join(secs) + " | all |", "|" + "---|" * (len(secs) + 1),
             "| " + " | ".join(f"{v:.0f} s" for v in secs.values()) + f" | {data['wall_seconds'] / 60:.1f} min |", "",
             *[f"- {q}: {v}" for q, v, _ in data["table"] if q.startswith(("Speculative", "Mean accepted", "Distill"))], "",
             "| draft | method | tau | alpha | speedup | agreement with the target's own output | identical to greedy |",
             "|---|---|---|---|---|---|---|"]
    for who, rows in (("distilled", data["speculative"]), ("CE-only", data["speculative_ce_draft"])):
        for r in rows:
            if r["method"].startswith(("chain", "tree")):
                lines.append(f"| {who} | {r['method']} | {r['tau']:.2f} | {r['alpha']:.2f} | {r['speedup']:.2f}x | "
                             f"{_f(r.get('draft_agreement'), '.3f')} | {'yes' if r['exact'] else 'NO'} |")
    ev = data["evaluate"]
    if any(e.get("qa_sets") for e in ev.values()):
        from megatron_soaes.workflows.report import general_lines, qa_lines

        lines += qa_lines(ev, data.get("comparisons") or {})
        lines += general_lines(ev, data.get("evaluate_stages") or {}, None)
        lines += ["", "| phase | domain ppl | domain top-1 |", "|---|---|---|"]
        order = [(n, e) for n, e in ev.items() if n in ("base", "cpt")]
        order += [(f"SFT stage {n} (end)", e) for n, e in (data.get("evaluate_stages") or {}).items()]
        order += [(n, e) for n, e in ev.items() if n not in ("base", "cpt")]
        lines += [f"| {n} | {e['domain_ppl']:.1f} | {_f(e.get('domain_top1'), '.3f')} |" for n, e in order]
    else:  # results files of older versions
        lines += legacy_phase_table(data)
    gates = data.get("retention_gates") or {}
    if gates:
        lines += ["", "| gated run | bound | retention against its start at each evaluation (ppl; top-1) | decisions |",
                  "|---|---|---|---|"]
        for run, g in gates.items():
            h = g["history"]
            ppl = " → ".join(_f(r.get("ppl_ratio") or r["ratio"], ".3f") for r in h)
            acc = " → ".join(_f(r.get("accuracy_ratio"), ".3f") for r in h)
            decisions = ", ".join(sorted({r["decision"] for r in h}))
            lines.append(f"| {run} | {g['metric']} >= {g['min_ratio']} ({g['action']}) | {ppl}; {acc} | {decisions} |")
    return lines




def pipeline_headline(data: dict) -> list[str]:
    """The README's view of a main-job file: every model on both QA sets and the never-trained text, the
    paired differences that carry the claims, speculative decoding, the time."""
    from megatron_soaes.workflows.report import MODEL_NAMES

    ev, cmp = data["evaluate"], data.get("comparisons") or {}

    def ci(m):
        return f"{m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"

    def diff(d):
        return f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"

    k = ev["base"]["qa_sets"]["knowledge"]
    lines = [f"Knowledge QA: {k['n']} held-out questions on articles the CPT corpus holds; consultations: "
             f"{ev['base']['qa_sets']['consultation']['n']} free-form questions; mean [95% bootstrap interval]. "
             "Never-trained text: English news no phase trains on (cloze chance 0.25).", "",
             "| model | knowledge Rouge-L | knowledge BLEU-4 | consultation Rouge-L | news ppl | news cloze |",
             "|---|---|---|---|---|---|"]
    for name, e in ev.items():
        q = e["qa_sets"]
        lines.append(f"| {MODEL_NAMES.get(name, name)} | {ci(q['knowledge']['metrics']['rouge-l'])} | "
                     f"{ci(q['knowledge']['metrics']['bleu-4'])} | {ci(q['consultation']['metrics']['rouge-l'])} | "
                     + ("- | - |" if name == "draft" else  # a 4-layer draft is not a general model: its text is QA
                        f"{_f(e.get('heldout_ppl'), '.1f')} | {_f((e.get('cloze') or {}).get('accuracy'), '.3f')} |"))
    lines += ["", "| paired difference (knowledge QA) | Rouge-L | BLEU-4 |", "|---|---|---|"]
    for key, label in (("cpt - base", "CPT - base"), ("sft_progressive - cpt", "SFT progressive - CPT"),
                       ("sft_progressive - sft_single", "progressive - single-stage (equal cost)"),
                       ("sft_lora - sft_progressive", "LoRA - full SFT (same curriculum)")):
        if key in cmp:
            d = cmp[key]["knowledge"]
            lines.append(f"| {label} | {diff(d['rouge-l'])} | {diff(d['bleu-4'])} |")
    best = max((r for r in data["speculative"] if r["method"].startswith(("chain", "tree"))), key=lambda r: r["speedup"])
    ce = {r["method"]: r for r in data["speculative_ce_draft"]}.get(best["method"])
    lines += ["", f"Speculative decoding (CPU, batch 1): {best['speedup']:.2f}x with {best['method']} (tau {best['tau']:.2f}), "
              f"output identical to target-only greedy: {'yes' if all(r['exact'] for r in data['speculative']) else 'NO'}"
              + (f"; the CE-only draft: {ce['speedup']:.2f}x (tau {ce['tau']:.2f})." if ce else "."),
              f"The whole job: {data['wall_seconds'] / 60:.0f} min."]
    return lines


def legacy_phase_table(data: dict) -> list[str]:
    lines = ["", "| phase | general ppl | general top-1 | general retention vs base (ppl / top-1) | domain ppl | "
             "domain top-1 | Rouge-1 | BLEU-4 | distinct-2 | loop answers | identical answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ev, base = data["evaluate"], data["evaluate"].get("base")
    order = [(n, e) for n, e in ev.items() if n in ("base", "cpt")]
    order += [(f"SFT stage {n} (end)", e) for n, e in (data.get("evaluate_stages") or {}).items()]
    order += [(n, e) for n, e in ev.items() if n not in ("base", "cpt")]
    for name, e in order:
        d, qa = e.get("degeneracy") or {}, e.get("qa")
        kept = (f"{base['general_ppl'] / e['general_ppl']:.3f} / "
                f"{_f(e['general_top1'] / base['general_top1'] if base['general_top1'] else None, '.3f')}"
                if base and name != "draft" else "-")
        tail = (f"{qa['rouge-1']:.2f} | {qa['bleu-4']:.2f} | {_f(d.get('distinct_2'), '.3f')} | "
                f"{_f(d.get('loop_share'), '.0%')} | {_f(d.get('identical_share'), '.0%')}" if qa else "- | - | - | - | -")
        lines.append(f"| {name} | {e['general_ppl']:.1f} | {e['general_top1']:.3f} | {kept} | {e['domain_ppl']:.1f} | "
                     f"{_f(e.get('domain_top1'), '.3f')} | {tail} |")
    return lines


def test_tiers(data: dict) -> list[str]:
    rows = data["rows"]
    pipelines = sum(r["seconds"] for r in rows if "test_pipeline.py" in r["test"])
    lines = [f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped in {data['wall_seconds'] / 60:.1f} min "
             f"(CPU: {data['user_seconds']:,.0f} s user, {data['sys_seconds']:,.0f} s kernel); the pipeline tests "
             f"(whole pipelines as subprocesses) {pipelines / 60:.1f} min of it"
             + (f"; peak temporary files {data['peak_tmp_mb']:,} MB." if data.get("peak_tmp_mb") else "."), "",
             "| slowest tests | seconds |", "|---|---|"]
    lines += [f"| `{r['test']}` | {r['seconds']:.0f} |" for r in rows[:10]]
    return lines


def checkpoint_io(data: dict) -> list[str]:
    lines = ["| model | variant | checkpoint MB | median step s | blocked in save() s | vs sync | publication held s | "
             "step wall time lost s | vs sync | same losses |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        blocked = "-" if r["variant"] == "no save" else f"{r['blocked_s_per_save']:.3f}"  # only the save at exit
        lines.append(f"| {r['model']} | {r['variant']} | {r['checkpoint_mb']:.1f} | {r['median_step_s']:.3f} | "
                     f"{blocked} | {_f(r.get('blocked_vs_sync'), '.3f')} | {_f(r.get('publish_held_s_per_save'), '.3f')} | "
                     f"{r['wall_lost_s_per_save']:.3f} | "
                     f"{_f(r.get('wall_lost_vs_sync'), '.3f')} | {'yes' if r['same_losses_as_no_save'] else 'NO'} |")
    return lines


def convert(data: dict) -> list[str]:
    layers = f" (its first {data['layers']} layers)" if data.get("layers") else ""
    lines = [f"Checkpoint: random {data['preset']}{layers}, {data['checkpoint_bytes'] / 1e9:.2f} GB bf16, largest shard "
             f"{data['largest_shard_bytes'] / 1e9:.2f} GB.", "",
             "| step | seconds | GB/s | vs plain copy | peak RSS GB | RSS / largest shard | speedup vs before |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {r['gb_per_s']:.2f} | {r['vs_plain_copy']:.2f} | "
                     f"{r['peak_rss'] / 1e9:.2f} | {r['peak_rss_vs_largest_shard']:.2f}x | {_f(r.get('speedup_vs_before'), '.2f')} |")
    lines += ["", "| at the measured rates | " + " | ".join(r["step"] for r in data["rows"]) + " |",
              "|---|" + "---|" * len(data["rows"])]
    for name, mins in data["minutes_at_scale"].items():
        lines.append(f"| {name} (bf16) | " + " | ".join(f"{v:.0f} min" for v in mins.values()) + " |")
    return lines


def peft_memory(data: dict) -> list[str]:
    lines = ["| variant | trainable parameters | optimizer state MB | vs full | checkpoint MB | peak RSS GB | vs full | tokens/s | vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['variant']} | {r['trainable_parameters']:,} | {r['optimizer_state_bytes'] / 1e6:.1f} | "
                     f"{r['optimizer_state_vs_full']:.3f} | {r['checkpoint_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['peak_rss_vs_full']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_vs_full']:.2f} |")
    lines += ["", "| at scale | trainable parameters | weights + gradients + optimizer state | 80 GB GPUs for that state alone |",
              "|---|---|---|---|"]
    for r in data["at_scale"]:
        lines.append(f"| {r['model']} {r['variant']} | {r['trainable_parameters']:,} | {r['state_bytes'] / 1e9:,.0f} GB | "
                     f"{r['min_80gb_gpus_for_state']} |")
    return lines


def replay_retention(data: dict) -> list[str]:
    lines = ["| CPT setting | general tokens | domain ppl base -> CPT | domain gain | general ppl base -> CPT | general retention | "
             "retention at each evaluation |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['setting']} | {r['general_token_share']:.1%} | {r['domain_ppl_base']:.1f} -> {r['domain_ppl_cpt']:.1f} | "
                     f"{r['domain_gain']:.2f}x | {r['general_ppl_base']:.1f} -> {r['general_ppl_cpt']:.1f} | "
                     f"{r['general_retention']:.3f} | {' -> '.join(f'{x:.2f}' for x in r['retention_curve'])} |")
    return lines


def curate(data: dict) -> list[str]:
    lines = ["| corpus | rule | documents | MB | docs/s | MB/s | peak RSS MB | removed |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        removed = ", ".join(f"{k} {v:,}" for k, v in sorted(r["removed"].items())) or "-"
        lines.append(f"| {r['corpus']} | {r['rule']} | {r['documents']:,} | {r['MB']:.1f} | {r['docs_per_s']:,.0f} | "
                     f"{r['MB_per_s']:.2f} | {r['peak_rss_MB']:,} | {removed} |")
    lines += ["", "What the pipeline's data phase removes from the demo data (CPT corpora and SFT training sets):", "",
              "| set | read | kept | removed |", "|---|---|---|---|"]
    for name, r in data["demo_pipeline_curation"].items():
        removed = ", ".join(f"{k} {v:,}" for k, v in sorted(r["removed"].items())) or "-"
        lines.append(f"| {name} | {r['read']:,} | {r['kept']:,} | {removed} |")
    x = data["extrapolation"]
    lines += ["", f"100 GB at the full config's rate on the synthetic corpus: {x['100GB_hours_this_machine']} hours on this "
                  f"machine (2 workers); {x['note']}."]
    return lines


def cp_memory(data: dict) -> list[str]:
    cps = list(data["rows"][0]["activation_gb"])
    lines = ["| model | TP | sequence | " + " | ".join(f"CP {c}" for c in cps) + " |", "|---|---|---|" + "---|" * len(cps)]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['tp']} | {r['seq_length'] // 1024}k | "
                     + " | ".join(f"{r['activation_gb'][c]:.1f} GB" for c in cps) + " |")
    return lines


def context_parallel(data: dict) -> list[str]:
    lines = ["| sequence | CP | processes | tokens/s | vs CP 1 | peak RSS per process | vs CP 1 | same losses as CP 1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['seq_length']} | {r['cp']} | {r['nproc']} | {r['tokens_per_s']:,.0f} | {r['speed_vs_cp1']:.2f}x | "
                     f"{r['peak_rss_per_process_gb']:.2f} GB | {r['memory_vs_cp1']:.2f}x | "
                     f"{'-' if r['cp'] == 1 else 'yes' if r['same_losses_as_cp1'] else 'NO'} |")
    return lines


def _mtp_budget(name: str) -> str:
    """draft_mtp_s320_e885 -> '(320 steps on 885 examples) '; draft_mtp (the draft head's budget) -> ''."""
    parts = name.removeprefix("draft_mtp").strip("_").split("_")
    return f"({parts[0][1:]} steps on {parts[1][1:]} examples) " if len(parts) == 2 else ""


def draft_kinds(data: dict) -> list[str]:
    st = data["settings"]
    train = st.get("training_seconds") or {}
    lines = [f"Draft cost per token, relative to one target forward: "
             + ", ".join(f"{k} {v:.3f}" for k, v in st["draft_cost"].items())
             + f". Training on 2 cores: the distilled draft {_f(train.get('distill'), '.0f')} s, the EAGLE-3 head "
             f"{_f(train.get('draft_head'), '.0f')} s"
             + "".join(f", the MTP head {_mtp_budget(k)}{v:.0f} s" for k, v in train.items() if k.startswith("draft_mtp"))
             + ".", "",
             "| draft | method | batch | tokens/s | tau | alpha | speedup | agreement with the target | identical to greedy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['draft']} | {r['method']} | {r.get('batch', 1)} | {r['tokens_per_s']:.1f} | {_f(r['tau'], '.2f')} | "
                     f"{_f(r['alpha'], '.2f')} | {r['speedup']:.2f}x | {_f(r.get('draft_agreement'), '.3f')} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    return lines


RENDER = {"spec_decode": spec_decode, "draft_kinds_cpu": draft_kinds, "draft_kinds_mtp_cpu": draft_kinds, "cp_memory": cp_memory, "context_parallel": context_parallel, "replay_retention": replay_retention, "curate": curate, "train_throughput": train_throughput, "pipeline": pipeline, "test_tiers": test_tiers,
          "checkpoint_io": checkpoint_io, "convert": convert, "peft_memory": peft_memory}


VIEWS = {"headline": pipeline_headline}  # NAME@VIEW: another view of NAME's file


def render(name: str) -> str:
    name, _, view = name.partition("@")
    data = json.loads((RESULTS / f"{name}.json").read_text())
    fn = VIEWS[view] if view else RENDER[next(k for k in RENDER if name.startswith(k))]
    return "\n".join([source_line(data, name), "", *fn(data), ""]) + "\n"


def check(text: str) -> list[str]:
    """Names of the README tables that differ from their files."""
    return [m["name"] for m in MARK.finditer(text) if m["body"] != render(m["name"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    stale = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        if args.write:
            new = MARK.sub(lambda m: f"<!-- table: {m['name']} -->\n{render(m['name'])}<!-- /table -->", text)
            if new != text:
                page.write_text(new, encoding="utf-8")
                print(f"{page.relative_to(ROOT)}: rewrote its tables")
        else:
            stale += [f"{page.relative_to(ROOT)}: {n}" for n in check(text)]
    if stale:
        sys.exit(f"tables differ from their results files: {', '.join(stale)} (python benchmarks/tables.py --write)")
    if not args.write:
        print("every table matches its results file")


if __name__ == "__main__":
    main()
