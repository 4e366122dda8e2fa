"""What a training job plugs into the trainer: a `Task` (prepare the job, build its data, one
forward step with its loss), and the registry the CLI and the workflows look tasks up in by
`job.kind`. The trainer calls `task.prepare(job)` for every entry point, so the same YAML means the
same run whichever command starts it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megatron_soaes.config import ConfigError, JobConfig


@runtime_checkable
class Task(Protocol):
    report_keys: tuple[str, ...]  # names a loss report may hold; "lm loss" is the training loss

    def prepare(self, job: JobConfig, tokenizer) -> JobConfig:
        """The job this task will run: fields derived from the data filled in (e.g. train.steps from
        sft.epochs). Pure and repeatable: preparing a prepared job returns it unchanged."""

    def build(self, job: JobConfig, tokenizer, model_cfg, dp_rank: int, dp_size: int, consumed_samples: int):
        """Return (train ResumableBatches, {name: list of eval micro-batches})."""

    def on_built(self, model, optimizer) -> None:
        """Called once the (DDP-wrapped) model and optimizer exist."""

    def forward_step(self, data_iterator, model):
        """megatron forward_step_func: returns (output, loss_func); loss_func -> (loss_sum, num_tokens, report).
        `report` maps names to [sum, count] tensors, logged as sum/count over the global batch."""


class BaseTask:
    """Defaults for the optional parts of the protocol."""

    report_keys: tuple[str, ...] = ("lm loss",)

    def prepare(self, job: JobConfig, tokenizer) -> JobConfig:
        return job

    def on_built(self, model, optimizer) -> None:
        pass

    eval_forward_step = None  # a task's own forward step for its held-out sets (default: forward_step)


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of per-token losses under the mask; megatron divides by the global token count."""
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.reshape(-1).float() * mask).sum()
    n = mask.sum()
    return total, n.to(torch.int), {"lm loss": torch.stack([total.detach().clone(), n.detach().clone()])}


# kind -> "module:Class"; imported on lookup, so `training` depends on no task package.
TASKS: dict[str, str] = {
    "cpt": "megatron_soaes.training.cpt:CPTTask",
    "sft": "megatron_soaes.sft.task:SFTTask",
    "distill": "megatron_soaes.distill.task:DistillTask",
    "draft_head": "megatron_soaes.heads.task:DraftHeadTask",
}


def task_for(kind: str) -> Task:
    if kind not in TASKS:
        raise ConfigError(f"kind: unknown task {kind!r}; known: {', '.join(TASKS)}")
    module, _, name = TASKS[kind].partition(":")
    return getattr(importlib.import_module(module), name)()


def prepare_job(job: JobConfig, task: Task | None = None, tokenizer=None) -> JobConfig:
    """`job` as the trainer will run it (what `--dry-run` shows, and what the trainer itself uses)."""
    from megatron_soaes.data.tokenizer import load_tokenizer

    task = task or task_for(job.task_name)
    return task.prepare(job, tokenizer or load_tokenizer(job.data.tokenizer))


def check_model_layout(job: JobConfig, cfg) -> None:
    """The model against the job's parallel layout: one-line errors before any work."""
    from megatron_soaes.models.config import ModelConfigError

    p = job.parallel
    try:
        cfg.check_parallel(p.tensor_parallel, p.pipeline_parallel, p.expert_parallel, p.expert_tensor_parallel)
    except ModelConfigError as e:
        raise ConfigError(f"parallel: {e}") from None
    if cfg.is_moe and p.tensor_parallel > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: megatron-core's MoE layers need it when tensor_parallel > 1")
    if p.expert_tensor_parallel is not None and not cfg.is_moe:
        raise ConfigError(f"parallel.expert_tensor_parallel given for a dense model ({cfg.architecture})")


def dry_run(job: JobConfig, world_size: int = 1, check_paths: bool = True, task: Task | None = None) -> str:
    """Check `job` against a world size (and its paths), prepare it as the trainer would, and say what
    would run: the layout, the batch split and the number of steps. Builds nothing."""
    from megatron_soaes.data.tokenizer import tokenizer_available

    from megatron_soaes.models.megatron import select_attention, use_transformer_engine

    dp = job.check_world(world_size)
    select_attention(job, use_transformer_engine(job))  # what the installed layers cannot run, as the run refuses it
    if check_paths:
        job.check_paths()
    if job.model.preset or Path(job.model.hf_config).exists():  # the architecture, without the tokenizer
        from megatron_soaes.models import resolve_model_config

        check_model_layout(job, resolve_model_config(job.model))
    # the task's own checks (e.g. the distillation pair) whenever the tokenizer is here; SFT epochs also
    # need the data: it is packed (cached) to count the rows
    ready = check_paths or tokenizer_available(job.data.tokenizer)
    if ready and (job.train.steps is not None or check_paths or all(Path(f.path).exists() for f in job.sft.train)):
        job = prepare_job(job, task)
    steps = "train.steps from sft.epochs (data not checked)" if job.train.steps is None else f"train.steps {job.train.steps}"
    p, t = job.parallel, job.train
    ep = f" (experts: EP {p.expert_parallel}, expert TP {p.expert_tp})" if p.expert_parallel > 1 or p.expert_tp != p.tensor_parallel else ""
    return (f"OK for world size {world_size}: kind {job.kind}, TP {p.tensor_parallel} x PP {p.pipeline_parallel} x "
            f"CP {p.context_parallel} x DP {dp}{ep}; global batch {t.global_batch_size} = micro-batch {t.micro_batch_size} "
            f"x DP {dp} x {t.global_batch_size // (t.micro_batch_size * dp)} micro-batches; {steps}")
