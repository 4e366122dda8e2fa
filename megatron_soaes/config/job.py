"""One typed, validated config per job (YAML -> pydantic), torchtitan-style: a section per concern,
a comment per field. Unknown keys and bad values are all reported at once, each as
``file: section.field: problem``, before any work starts.

A *template* (validated with ``template=True``) is a job whose run-specific fields (output
directory, length, SFT data) are still open: a curriculum holds one and each stage is a typed patch
of it (`config.curriculum.stage_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from megatron_soaes.config.base import ConfigError, StrictModel, is_template
from megatron_soaes.utils.dtypes import DTYPE_CHOICES

Dtype = Literal[DTYPE_CHOICES]


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot be realised on the given world size or model."""


class ModelSpec(StrictModel):
    """Which architecture: a preset name (+ overrides) or an HF config.json / directory."""

    preset: str | None = None  # a named architecture (models.config.PRESETS), e.g. qwen2.5-7b
    hf_config: str | None = None  # config.json or an HF directory
    overrides: dict = Field(default_factory=dict)  # preset fields to change, e.g. vocab_size

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.hf_config is None):
            raise ValueError("give exactly one of preset or hf_config")
        return self


class ModelSection(ModelSpec):
    init_checkpoint: str | None = None  # torch_dist weights to start from (converted HF or an earlier phase)
    init_adapter: str | None = None  # with peft: the LoRA adapter checkpoint to continue (an earlier stage's)


class ParallelConfig(StrictModel):
    """Model-parallel sizes; the data-parallel size is whatever is left of the world. Validated once,
    here, for config files and for `runtime.initialize` alike."""

    tensor_parallel: int = 1  # TP: each layer's weights split over this many ranks
    pipeline_parallel: int = 1  # PP: the layers split into this many consecutive stages
    context_parallel: int = 1  # CP: each sequence split over this many ranks (TE attention or the SDPA layers)
    sequence_parallel: bool = False  # needs tensor_parallel > 1
    # interleaved schedule chunks per stage: refused above 1 (one model chunk per stage is built)
    virtual_pipeline: int | None = None
    use_distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    # MoE models: experts split over this many ranks (each holds num_experts / expert_parallel experts; tokens
    # travel to their experts and back). Carved from the data-parallel ranks, so it must divide
    # world / (TP * PP); expert layers keep TP's tensor split unless expert_tensor_parallel says otherwise.
    expert_parallel: int = 1
    # MoE models: the tensor split of each expert (default: tensor_parallel). 1 keeps experts whole and spreads
    # them over the ranks TP would split them on (TP=2, EP=2, expert TP 1 on 2 GPUs): fewer, larger GEMMs.
    # The expert layout (expert TP x EP x expert DP x PP) must fill the world like the dense one.
    expert_tensor_parallel: int | None = None

    @property
    def expert_tp(self) -> int:
        """The tensor split of each expert."""
        return self.tensor_parallel if self.expert_tensor_parallel is None else self.expert_tensor_parallel

    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def check_sizes(self) -> None:
        """What holds for any world size."""
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel", "expert_tensor_parallel"):
            value = getattr(self, name)
            if value is None and name == "expert_tensor_parallel":
                continue
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ParallelConfigError("parallel.sequence_parallel needs tensor_parallel > 1")
        if self.virtual_pipeline is not None and self.pipeline_parallel < 2:
            raise ParallelConfigError("parallel.virtual_pipeline needs pipeline_parallel > 1")
        if self.virtual_pipeline is not None and self.virtual_pipeline > 1:
            raise ParallelConfigError("parallel.virtual_pipeline: the interleaved schedule is not built (the trainer "
                                      "builds one model chunk per pipeline stage); leave it unset")

    def validate_world(self, world_size: int) -> int:
        """Raise unless the layout fits `world_size`; returns the data-parallel size."""
        self.check_sizes()
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel} = {mp}")
        etp = self.expert_tp
        ep = etp * self.pipeline_parallel * self.expert_parallel
        if world_size % ep:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by expert TP*PP*EP = "
                f"{etp}*{self.pipeline_parallel}*{self.expert_parallel} = {ep}")
        return world_size // mp

    validate = validate_world  # runtime's name

    def data_parallel_size(self, world_size: int) -> int:
        return self.validate_world(world_size)


class DataSource(StrictModel):
    path: str  # indexed dataset prefix (without .bin/.idx)
    weight: float = Field(1.0, gt=0)  # blend weight
    name: str | None = None  # shown in the per-source token counts (default: the file name)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class ReplaySchedule(StrictModel):
    """A blend weight that changes over training (`data.replay_schedule`): the named source's share of each
    global batch goes from `start` to `end`; the other sources share the rest in their weights' proportion.
    The sample order is a pure function of the config, so a resumed run draws exactly the same samples."""

    source: str  # a data.train entry's label (its name, or its file name)
    start: float = Field(ge=0, le=1)  # the source's share of each global batch at the first step
    end: float = Field(ge=0, le=1)  # its share once decay_steps are done
    # constant: start throughout; linear / cosine: from start to end over decay_steps; step: start for the
    # first half of decay_steps, end from there on
    style: Literal["constant", "linear", "cosine", "step"] = "linear"
    decay_steps: int | None = Field(None, ge=1)  # default: train.steps

    def weight(self, step: int, steps: int) -> float:
        """The source's share at 0-based optimizer step `step`."""
        import math

        n = self.decay_steps or steps
        f = min(step / max(n - 1, 1), 1.0)
        if self.style == "constant":
            return self.start
        if self.style == "step":
            return self.start if step < n // 2 else self.end
        if self.style == "cosine":
            f = 0.5 * (1 - math.cos(math.pi * f))
        return self.start + (self.end - self.start) * f


class DataSection(StrictModel):
    tokenizer: str  # "qwen", a byte-level BPE tokenizer.json, a sentencepiece .model, a .tiktoken file or an HF directory
    seq_length: int = Field(ge=8)  # tokens per training sequence
    train: list[DataSource] = Field(default_factory=list)  # indexed datasets (cpt; distill without sft)
    valid: dict[str, list[DataSource]] = Field(default_factory=dict)  # named held-out sets
    cache_dir: str | None = None  # megatron's dataset index cache (default: none, built in memory)
    replay_schedule: ReplaySchedule | None = None  # one source's weight over the steps (default: fixed weights)


class OptimSection(StrictModel):
    lr: float = Field(3e-4, gt=0)  # peak learning rate, reached after warmup_steps
    min_lr: float = Field(3e-5, ge=0)  # where the decay ends
    weight_decay: float = Field(0.1, ge=0)  # AdamW's decoupled weight decay
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.95  # Adam's second-moment decay
    adam_eps: float = 1e-8  # Adam's denominator epsilon
    clip_grad: float = Field(1.0, ge=0)  # 0: no clipping
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0 to lr
    # decay from lr to min_lr after warmup: cosine, linear, constant (none), wsd (warmup-stable-decay: constant,
    # then a linear decay over the last wsd_decay_steps)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    wsd_decay_steps: int | None = None  # with schedule wsd: steps of the final decay

    @model_validator(mode="after")
    def _decay_goes_down(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}: the schedule decays from lr to min_lr")
        return self


class RetentionSection(StrictModel):
    """A general-ability gate (`train.retention`): a held-out general text set, evaluated at the phase's start
    and at every evaluation (next-token loss and top-1 accuracy), as retention against the start."""

    eval_set: str = "general"  # a data.valid entry (indexed plain text), evaluated as next-token loss in any task
    # what the bound applies to (both are measured and logged): perplexity -- ppl at the start / ppl now;
    # accuracy -- next-token top-1 accuracy now / at the start
    metric: Literal["perplexity", "accuracy"] = "perplexity"
    min_ratio: float = Field(0.98, gt=0)  # the bound: retention below it breaks the gate
    # warn: log it; stop: save and end the run (exit 3); keep_best: train on, and publish (retention.json,
    # what `resolve_checkpoint` of the run returns) the evaluated step with the lowest `select` loss whose
    # retention stays at or above the bound -- the starting checkpoint when none does
    action: Literal["warn", "stop", "keep_best"] = "warn"
    select: str | None = None  # the eval set keep_best minimises (default: the task's first other eval set)


class TrainSection(StrictModel):
    steps: int | None = Field(None, ge=1)  # optimizer steps; or derived from sft.epochs (give one of them)
    global_batch_size: int = Field(ge=1)  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = Field(1, ge=1)  # sequences per forward on one rank
    dtype: Dtype = "bf16"  # bf16/fp16 need a GPU (megatron's mixed-precision optimizer is CUDA-only)
    fp8: bool = False  # needs Transformer Engine
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto: TE when importable
    # core attention: auto = TE's with TE layers, else SDPA (fused kernels, causal without a mask);
    # megatron_local = megatron-core's unfused DotProductAttention (the reference)
    attention: Literal["auto", "sdpa", "megatron_local", "transformer_engine"] = "auto"
    seed: int = 1234  # weights' initialisation, dropout and the data order
    log_interval: int = Field(10, ge=1)  # steps between log lines (loss, rate, ETA)
    eval_interval: int = Field(0, ge=0)  # 0: only at the end
    eval_iters: int = Field(4, ge=1)  # micro-batches per held-out set
    save_interval: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, ge=1)  # checkpoints kept
    # write checkpoints in a background process (megatron-core's async dist-checkpointing) while the next
    # steps run; a checkpoint is published only when every rank finished writing, at most one in flight
    async_save: bool = False
    # before resuming, a checkpoint is checked against its manifest: file sizes always, and with
    # "checksums" every file's XXH3-128 checksum (reads the checkpoint once more, spread over the ranks)
    verify_checkpoints: Literal["checksums", "sizes"] = "checksums"
    output_dir: str | None = Field(None, validate_default=True)  # checkpoints/, metrics.jsonl, tensorboard/
    peak_tflops: float | None = Field(None, gt=0)  # per-device peak for MFU; known GPUs are detected
    tensorboard: bool = True  # scalars under <output_dir>/tensorboard when the tensorboard package is installed
    retention: RetentionSection | None = None  # a general-ability gate at every evaluation (see RetentionSection)

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v, info: ValidationInfo):
        if v is None and not is_template(info):
            raise ValueError("Field required")
        return v


class TeacherSection(ModelSpec):
    checkpoint: str  # torch_dist checkpoint (converted HF or an earlier phase); frozen
    tensor_parallel: int | None = Field(None, ge=1)  # default: the student's (the only one supported co-located)
    dtype: Dtype | None = None  # default: train.dtype


class OnPolicySection(StrictModel):
    fraction: float = Field(0.0, ge=0, le=1)  # share of micro-batches whose continuation the student writes
    prompt_tokens: int = Field(64, ge=1)  # tokens of the sample kept as the prompt
    temperature: float = Field(1.0, ge=0)  # student sampling temperature (0: greedy)


HEAD_KINDS = ("eagle3", "mtp")  # distill.draft values that train a head on the teacher's hidden states


class DraftHeadSection(StrictModel):
    """A draft head (distill.draft: eagle3 or mtp): one decoder layer on the target's own hidden states."""

    # eagle3: target layers whose inputs are fused into the head's feature (three: low, middle, high); null: EAGLE-3's
    # (2, L // 2, L - 3), as vLLM collects them. mtp reads the target's final (normed) hidden state and takes none
    feature_layers: list[int] | None = None
    # the draft vocabulary: the head scores only this many of the training answers' most frequent tokens
    # (verification still scores every token, so decoding stays lossless); null: the whole vocabulary
    draft_vocab: int | None = Field(None, ge=1)
    ttt_steps: int = Field(3, ge=1)  # training-time test: steps unrolled, each fed the head's own previous output
    # keep the teacher's outputs for each training row after its first pass (features, embeddings, its logits over the
    # draft vocabulary, in bf16 host buffers allocated once: ~(2 x (F + hidden) + draft_vocab / TP x 2 + 4) bytes per
    # token of the training rows on each rank, F the features' width), so later epochs cost only the head: EAGLE's
    # offline training without a dump, for data that fits in memory
    cache_teacher: bool = False
    # target: the head's output layer and final norm start as the target's (its rows of the draft vocabulary) and fc
    # (mtp: eh_proj) passes the target's hidden state through, so the head starts in the target's hidden space;
    # random: EAGLE-3's init
    init: Literal["target", "random"] = "target"


class DistillSection(StrictModel):
    # what is trained: a separate draft model (`model`, the student), or a head that reads the teacher's hidden
    # states: EAGLE-3's (`eagle3`: three layers' features fused) or megatron-core's multi-token-prediction layer
    # (`mtp`: the final hidden state and the next token's embedding); with a head, `model` names the teacher's
    # architecture and the head is built from it
    draft: Literal["model", "eagle3", "mtp"] = "model"
    head: DraftHeadSection = Field(default_factory=DraftHeadSection)  # draft: eagle3 or mtp
    teacher: TeacherSection | None = None  # online teacher; omit when training from offline logits
    # between the teacher's and the student's next-token distributions: forward KL(teacher || student),
    # reverse KL(student || teacher), generalised JSD(beta) or total variation distance
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1)  # generalised JSD mixing weight
    temperature: float = Field(1.0, gt=0)  # both distributions softened by it before the divergence
    kd_weight: float = Field(1.0, ge=0, le=1)  # loss = kd_weight * divergence + (1 - kd_weight) * CE(labels)
    top_k: int | None = Field(None, ge=1)  # restrict both distributions to the teacher's top-k tokens
    offline_logits: str | None = None  # directory written by `soaes distill-dump`
    on_policy: OnPolicySection = Field(default_factory=OnPolicySection)  # student-written continuations (GKD)

    @model_validator(mode="after")
    def _source(self):
        if (self.teacher is None) == (self.offline_logits is None):
            raise ValueError("give exactly one of distill.teacher (online) or distill.offline_logits")
        if self.offline_logits and self.top_k is None:
            raise ValueError("distill.top_k is required with offline_logits (the stored k or less)")
        if self.offline_logits and self.on_policy.fraction > 0:
            raise ValueError("on-policy distillation needs an online teacher")
        return self


class SFTFile(StrictModel):
    path: str  # jsonl / json / parquet / HF datasets directory
    repeat: int = Field(1, ge=1)  # epochs of this file within the stage


class SFTSection(StrictModel):
    train: list[SFTFile] = Field(default_factory=list, validate_default=True)  # chat records
    valid: dict[str, list[SFTFile]] = Field(default_factory=dict)  # named held-out sets (loss only)
    replay: list[SFTFile] = Field(default_factory=list)  # earlier stages' data to mix back in
    replay_fraction: float = Field(0.0, ge=0, le=1)  # of this job's examples, drawn from `replay`
    epochs: float | None = Field(None, gt=0)  # passes over the packed rows; sets train.steps (give one of them)
    default_system: str | None = "You are a helpful assistant."  # for records without a system turn
    last_turn_only: bool = False  # loss on the last assistant turn only
    truncation: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_length
    packing: bool = True  # several conversations per row (no cross-example attention)
    # how packed rows keep examples apart: thd = Transformer Engine's cu_seqlens kernels (micro-batch 1);
    # flex = FlexAttention with a document block mask (SDPA layers, any micro-batch, O(s) memory);
    # dense_mask = an explicit [b, 1, s, s] block-causal mask; auto: thd with TE on CUDA at micro-batch 1,
    # else flex on CUDA, else dense_mask (CPU)
    packed_attention: Literal["auto", "thd", "flex", "dense_mask"] = "auto"

    @field_validator("train")
    @classmethod
    def _train(cls, v, info: ValidationInfo):
        if not v and not is_template(info):
            raise ValueError("List should have at least 1 item after validation, not 0")
        return v


# the HF projections LoRA can adapt (adapters.LAYER_LINEARS maps them onto megatron's linears)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PeftSection(StrictModel):
    """LoRA adapters (adapters/): the base is frozen; only the adapters train, are checkpointed and exported."""

    type: Literal["lora"] = "lora"  # the adapter kind (LoRA; DoRA is lora with dora: true)
    rank: int = Field(16, ge=1)  # r: rows of A / columns of B per adapted projection
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input
    # HF projection names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or "all-linear"
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    dora: bool = False  # DoRA: a learned magnitude per output row of each adapted weight (not on MoE experts)

    @model_validator(mode="after")
    def _dora(self):
        if self.dora and self.dropout:
            raise ValueError("peft.dora with peft.dropout > 0 is not supported (DoRA here adapts the undropped input)")
        return self

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        bad = [t for t in v if t != "all-linear" and t not in LORA_TARGETS]
        if bad or not v:
            raise ValueError(f"unknown target module {bad[0] if bad else '(none)'}; choose from "
                             f"{', '.join(LORA_TARGETS)} or all-linear")
        return v


class JobConfig(StrictModel):
    """One training job -- CPT, an SFT stage or a distillation -- for the one Trainer."""

    kind: Literal["cpt", "sft", "distill"] = "cpt"  # the task the trainer runs (training.task registry)
    model: ModelSection  # the architecture and the weights to start from
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)  # the layout over the ranks
    data: DataSection  # tokenizer, sequence length, indexed datasets and their blend
    optim: OptimSection = Field(default_factory=OptimSection)  # AdamW and the learning-rate schedule
    train: TrainSection  # length, batch, precision, evaluation, checkpoints
    distill: DistillSection | None = None  # kind distill
    sft: SFTSection | None = None  # kind sft, or distillation on chat data
    peft: PeftSection | None = None  # train LoRA adapters on a frozen base (needs model.init_checkpoint)

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo):
        self.parallel.check_sizes()
        if is_template(info):  # fields only; the cross-field rules wait for the complete job
            return self
        if (self.kind == "cpt" or (self.kind == "distill" and self.sft is None)) and not self.data.train:
            raise ValueError(f"data.train: kind {self.kind} needs at least one indexed dataset (or, for distill, an sft section)")
        if self.kind == "sft" and self.sft is None:
            raise ValueError("kind: sft needs an sft section")
        if self.kind == "cpt" and self.sft is not None:
            raise ValueError("an sft section is only valid with kind sft or distill (distillation on chat data)")
        if self.kind == "distill" and self.distill is None:
            raise ValueError("kind: distill needs a distill section")
        if self.kind != "distill" and self.distill is not None:
            raise ValueError(f"a distill section is only valid with kind: distill (kind is {self.kind})")
        if self.distill and self.distill.offline_logits and self.sft is not None:
            raise ValueError("distill.offline_logits: stored teacher logits cover CPT data; use an online teacher with sft data")
        if self.peft and not self.model.init_checkpoint:
            raise ValueError("peft: adapters train on a frozen base; set model.init_checkpoint to its checkpoint")
        if self.model.init_adapter and not self.peft:
            raise ValueError("model.init_adapter: an adapter to continue needs a peft section")
        rs = self.data.replay_schedule
        if rs and rs.source not in [t.label for t in self.data.train]:
            raise ValueError(f"data.replay_schedule.source: {rs.source!r} is not a data.train entry "
                             f"({', '.join(t.label for t in self.data.train) or 'none'})")
        if rs and len(self.data.train) < 2:
            raise ValueError("data.replay_schedule: a schedule needs the replay source and at least one other in data.train")
        r = self.train.retention
        if r and r.eval_set not in self.data.valid:
            raise ValueError(f"train.retention.eval_set: {r.eval_set!r} is not a data.valid entry "
                             f"({', '.join(self.data.valid) or 'none'}); the gate evaluates indexed general text")
        if r and r.select is not None and r.select not in {*self.data.valid, *(self.sft.valid if self.sft else {})}:
            raise ValueError(f"train.retention.select: {r.select!r} is not an evaluation set of this job")
        epochs = self.sft.epochs if self.sft else None
        if (self.train.steps is None) == (epochs is None):
            raise ValueError("train.steps: give exactly one of train.steps or sft.epochs (which sets the steps "
                             f"from the packed row count); got {'both' if epochs else 'neither'}")
        if self.train.steps is not None and self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps {self.optim.warmup_steps} must be smaller than train.steps {self.train.steps}")
        return self

    @property
    def steps(self) -> int:
        """train.steps once known (after the task's `prepare` for sft.epochs)."""
        if self.train.steps is None:
            raise ConfigError("train.steps is derived from sft.epochs by the task's prepare(); call it first")
        return self.train.steps

    def check_world(self, world_size: int) -> int:
        """Errors that need the world size; returns the data-parallel size."""
        dp = self.parallel.validate_world(world_size)
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                              f"micro_batch_size {t.micro_batch_size} * data-parallel size {dp}")
        if self.parallel.context_parallel > 1:
            self._check_context_parallel()
        return dp

    def _check_context_parallel(self) -> None:
        cp = self.parallel.context_parallel
        if self.data.seq_length % (2 * cp):
            raise ConfigError(f"parallel.context_parallel {cp}: data.seq_length {self.data.seq_length} must be "
                              f"divisible by 2*CP = {2 * cp} (each rank holds two load-balanced chunks)")
        if self.distill and (self.distill.offline_logits or self.distill.on_policy.fraction > 0):
            raise ConfigError("parallel.context_parallel: offline teacher logits and on-policy rollouts need CP=1")

    def check_paths(self) -> None:
        for where, sources in [("data.train", self.data.train), *[(f"data.valid.{k}", v) for k, v in self.data.valid.items()]]:
            for i, s in enumerate(sources):
                for ext in (".bin", ".idx"):
                    if not Path(s.path + ext).exists():
                        raise ConfigError(f"{where}[{i}].path: {s.path}{ext} does not exist")
        if self.model.init_checkpoint and not Path(self.model.init_checkpoint).exists():
            raise ConfigError(f"model.init_checkpoint: {self.model.init_checkpoint} does not exist")
        if self.sft:
            s = self.sft
            for where, files in [("sft.train", s.train), ("sft.replay", s.replay),
                                 *[(f"sft.valid.{k}", v) for k, v in s.valid.items()]]:
                for i, f in enumerate(files):
                    if not Path(f.path).exists():
                        raise ConfigError(f"{where}[{i}].path: {f.path} does not exist")
        d = self.distill
        if d and d.teacher and not Path(d.teacher.checkpoint).exists():
            raise ConfigError(f"distill.teacher.checkpoint: {d.teacher.checkpoint} does not exist")
        if d and d.offline_logits and not (Path(d.offline_logits) / "topk.json").exists():
            raise ConfigError(f"distill.offline_logits: {d.offline_logits} has no topk.json (run soaes distill-dump)")

    @property
    def task_name(self) -> str:
        """The training.task registry entry this job runs: its kind, or the draft head's task."""
        if self.kind == "distill" and self.distill.draft in HEAD_KINDS:
            return "draft_head"
        return self.kind

    def source_names(self) -> dict[int, str]:
        """Names of the training data sources, by blend index (for per-source token counts)."""
        if self.data.train:
            return {i: s.label for i, s in enumerate(self.data.train)}
        if self.sft:
            return {0: "+".join(Path(f.path).name.split(".")[0] for f in self.sft.train) or "sft"}
        return {}
