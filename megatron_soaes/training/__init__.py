"""The trainer (`trainer`), the task protocol and registry (`task`), metrics (`metrics`),
checkpoints (`checkpointing`) and the CPT task (`cpt`)."""

from megatron_soaes.training.task import TASKS, BaseTask, Task, dry_run, masked_token_loss, prepare_job, task_for
from megatron_soaes.training.trainer import StepRecord, Trainer, train

__all__ = ["TASKS", "BaseTask", "StepRecord", "Task", "Trainer", "dry_run", "masked_token_loss", "prepare_job", "task_for", "train"]
