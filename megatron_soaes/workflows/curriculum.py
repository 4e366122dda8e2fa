"""Running the domain-progressive SFT curriculum (`config.curriculum.Recipe`): stages in order,
each from the previous stage's final weights, through the one trainer.

Stage k writes ``<output_dir>/stage<k>_<name>/`` (checkpoints, metrics.jsonl, qa_answers.jsonl)
and, when finished and evaluated, ``stage.json``; a finished stage is skipped on re-runs, an
unfinished one resumes from its last checkpoint. `force` redoes the selected stages from scratch and
removes every later stage (each starts from the one before, so it would be stale).
"""

from __future__ import annotations

from pydantic import BaseModel

from megatron_soaes.checkpoint.load import resolve_checkpoint
from megatron_soaes.config import ConfigError
from megatron_soaes.config.curriculum import Recipe, parse_stages, stage_job
from megatron_soaes.utils.files import atomic_write_text, remove_atomically


class StageResult(BaseModel):
    """What a finished stage records in its stage.json (and the pipeline in its phase record)."""

    stage: int
    name: str
    init_checkpoint: str
    steps: int
    data: dict  # packing statistics: examples, rows, fill, ...
    final_train_loss: float | None
    eval: dict[str, float]  # last held-out losses
    checkpoint: str  # full weights (with LoRA: the base with this stage's adapter merged)
    adapter: str | None = None  # with LoRA: the stage's adapter checkpoint (the next stage continues it)
    run_dir: str  # the stage's output directory (metrics.jsonl, checkpoints/)
    qa: dict[str, float] | None = None  # Rouge-1/2/L, BLEU-4 on the recipe's held-out QA


def run_curriculum(recipe: Recipe, stages: str | None = None, force: bool = False, log=print) -> list[StageResult]:
    """Run (or resume) the selected stages in order. Collective under torchrun/srun."""
    import torch

    from megatron_soaes.data.sft import Template
    from megatron_soaes.runtime import initialize
    from megatron_soaes.runtime.distributed import world_info
    from megatron_soaes.eval.qa import evaluate_qa
    from megatron_soaes.sft.task import SFTTask
    from megatron_soaes.training import Trainer
    from megatron_soaes.training.metrics import last_eval

    records = []
    selected = parse_stages(stages, len(recipe.stages))
    if force and world_info()[1] > 1 and not torch.distributed.is_initialized():
        initialize(recipe.job.parallel)  # for the barrier below (the trainer initialises again, as it always does)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if force and rank == 0:
        for k in range(selected[0], len(recipe.stages) + 1):
            if remove_atomically(recipe.stage_dir(k)):
                log(f"stage {k} ({recipe.stages[k - 1].name}): previous run removed ({'forced' if k in selected else 'stale'})")
    if force and torch.distributed.is_initialized():
        torch.distributed.barrier()
    for k in selected:
        sdir, name = recipe.stage_dir(k), recipe.stages[k - 1].name
        done = sdir / "stage.json"
        if done.exists():
            log(f"stage {k} ({name}): done, skipped ({done})")
            records.append(StageResult.model_validate_json(done.read_text()))
            continue
        lora = recipe.job.peft is not None
        init, adapter = resolve_checkpoint(recipe.init_checkpoint), None
        if k > 1:
            prev = recipe.stage_dir(k - 1)
            if not (prev / "stage.json").exists():
                raise ConfigError(f"stage {k} starts from stage {k - 1}, which has not finished ({prev}); "
                                  f"run --stages {k - 1}-{k} or the whole recipe")
            if lora:  # the base stays; the previous stage's adapter goes on training
                adapter = resolve_checkpoint(prev)
            else:
                init = resolve_checkpoint(prev)
        log(f"stage {k}/{len(recipe.stages)} ({name}): from {init}" + (f" with the adapter {adapter}" if adapter else ""))
        trainer = Trainer(stage_job(recipe, k, init, init_adapter=adapter), SFTTask(), log=log)
        hist = trainer.run()
        job = trainer.job
        ckpt = resolve_checkpoint(sdir)  # the last checkpoint, or the one its retention gate kept
        weights = ckpt
        if lora:  # what evaluation, distillation and export read: the base with this stage's adapter merged
            from megatron_soaes.adapters.merge import merge_adapter

            weights = sdir / "merged"
            if rank == 0:
                merge_adapter(init, ckpt, weights, overwrite=True, progress=False)
        rec = StageResult(stage=k, name=name, init_checkpoint=str(init), steps=job.train.steps,
                          data=trainer.task.stats, final_train_loss=hist[-1].loss if hist else None,
                          eval=last_eval(sdir), checkpoint=str(weights), adapter=str(ckpt) if lora else None,
                          run_dir=str(sdir))
        if rank == 0:
            ev = recipe.evaluation
            if ev.qa:
                s = job.sft
                rec.qa = evaluate_qa(rec.checkpoint, trainer.tokenizer, ev.qa, Template(s.default_system, s.last_turn_only),
                                     ev.limit, ev.max_new_tokens, out_file=sdir / "qa_answers.jsonl")
                log(f"stage {k} ({name}): " + ", ".join(f"{m} {v:.2f}" for m, v in rec.qa.items() if m != "n"))
            atomic_write_text(done, rec.model_dump_json(indent=2))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        records.append(rec)
    return records
