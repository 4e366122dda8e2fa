"""One typed, validated config per job (YAML -> pydantic). Unknown keys and bad values are all
reported at once, each as ``file: section.field: problem``, before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    pass


class StrictModel(BaseModel):
    """Config sections reject unknown keys."""

    model_config = ConfigDict(extra="forbid")


_Strict = StrictModel


class ModelSection(_Strict):
    preset: str | None = None
    hf_config: str | None = None  # config.json or an HF directory
    overrides: dict = Field(default_factory=dict)
    init_checkpoint: str | None = None  # torch_dist weights to start from (converted HF or an earlier phase)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.hf_config is None):
            raise ValueError("give exactly one of model.preset or model.hf_config")
        return self


class ParallelSection(_Strict):
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    context_parallel: int = Field(1, ge=1)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


class DataSource(_Strict):
    path: str  # indexed dataset prefix (without .bin/.idx)
    weight: float = Field(1.0, gt=0)
    name: str | None = None


class DataSection(_Strict):
    tokenizer: str
    seq_length: int = Field(ge=8)
    train: list[DataSource] = Field(default_factory=list)  # required for cpt / distill
    valid: dict[str, list[DataSource]] = Field(default_factory=dict)  # named held-out sets
    cache_dir: str | None = None


class OptimSection(_Strict):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    wsd_decay_steps: int | None = None


class TrainSection(_Strict):
    steps: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(1, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: bool = False
    # layer implementation: Transformer Engine's fused layers when importable (auto), or force one
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    seed: int = 1234
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(0, ge=0)  # 0: only at the end
    eval_iters: int = Field(4, ge=1)
    save_interval: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, ge=1)
    output_dir: str
    peak_tflops: float | None = Field(None, gt=0)  # per-device peak for MFU; known GPUs are detected
    tensorboard: bool = True  # scalars under <output_dir>/tensorboard when the tensorboard package is installed


class TeacherSection(_Strict):
    preset: str | None = None
    hf_config: str | None = None
    overrides: dict = Field(default_factory=dict)
    checkpoint: str  # torch_dist checkpoint (converted HF or an earlier phase); frozen
    tensor_parallel: int | None = Field(None, ge=1)  # default: the student's
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # default: train.dtype

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.hf_config is None):
            raise ValueError("give exactly one of distill.teacher.preset or distill.teacher.hf_config")
        return self


class OnPolicySection(_Strict):
    fraction: float = Field(0.0, ge=0, le=1)  # share of micro-batches whose continuation the student writes
    prompt_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)


class DistillSection(_Strict):
    teacher: TeacherSection | None = None  # online teacher; omit when training from offline logits
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1)  # generalised JSD mixing weight
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0, le=1)  # loss = kd_weight * divergence + (1 - kd_weight) * CE(labels)
    top_k: int | None = Field(None, ge=1)  # restrict both distributions to the teacher's top-k tokens
    offline_logits: str | None = None  # directory written by `soaes distill-dump`
    on_policy: OnPolicySection = Field(default_factory=OnPolicySection)

    @model_validator(mode="after")
    def _source(self):
        if (self.teacher is None) == (self.offline_logits is None):
            raise ValueError("give exactly one of distill.teacher (online) or distill.offline_logits")
        if self.offline_logits and self.top_k is None:
            raise ValueError("distill.top_k is required with offline_logits (the stored k or less)")
        if self.offline_logits and self.on_policy.fraction > 0:
            raise ValueError("on-policy distillation needs an online teacher")
        return self


class SFTFile(_Strict):
    path: str  # jsonl / json / parquet / HF datasets directory
    repeat: int = Field(1, ge=1)  # epochs of this file within the stage


class SFTSection(_Strict):
    train: list[SFTFile] = Field(min_length=1)
    valid: dict[str, list[SFTFile]] = Field(default_factory=dict)
    replay: list[SFTFile] = Field(default_factory=list)  # earlier stages' data to mix back in
    replay_fraction: float = Field(0.0, ge=0, le=1)
    epochs: float | None = Field(None, gt=0)  # derive train.steps from the packed row count
    default_system: str | None = "You are a helpful assistant."
    last_turn_only: bool = False
    truncation: Literal["truncate", "drop"] = "truncate"
    packing: bool = True


class JobConfig(_Strict):
    kind: Literal["cpt", "sft", "distill"] = "cpt"
    model: ModelSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection
    distill: DistillSection | None = None
    sft: SFTSection | None = None

    @model_validator(mode="after")
    def _kind_sections(self):
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
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps {self.optim.warmup_steps} must be smaller than train.steps {self.train.steps}")
        return self

    def check_world(self, world_size: int) -> int:
        """Errors that need the world size; returns the data-parallel size."""
        p = self.parallel
        mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        if world_size % mp:
            raise ConfigError(f"parallel: world size {world_size} is not divisible by TP*PP*CP = {mp}")
        dp = world_size // mp
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                              f"micro_batch_size {t.micro_batch_size} * data-parallel size {dp}")
        if p.sequence_parallel and p.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_parallel > 1")
        if p.context_parallel > 1:
            self._check_context_parallel()
        return dp

    def _check_context_parallel(self) -> None:
        cp = self.parallel.context_parallel
        if self.data.seq_length % (2 * cp):
            raise ConfigError(f"parallel.context_parallel {cp}: data.seq_length {self.data.seq_length} must be "
                              f"divisible by 2*CP = {2 * cp} (each rank holds two load-balanced chunks)")
        if self.kind == "sft" or self.sft is not None:
            raise ConfigError("parallel.context_parallel: packed SFT rows are not split across CP ranks; use CP=1")
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


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "config", model=None):
    """Validate `data` as `model` (default JobConfig); every problem in one ConfigError."""
    try:
        return (model or JobConfig).model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model=None):
    """Read YAML as `model` (default JobConfig); `overrides` like ``train.steps=10`` are applied first."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    for item in overrides or []:
        key, _, value = item.partition("=")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return parse_config(data, str(path), model)
