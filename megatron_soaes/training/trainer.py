"""The one trainer. CPT, SFT and distillation plug in a `Task`; the trainer owns everything else:
checks before work, parallel setup, the megatron-core model, DDP, optimizer and LR schedule,
megatron's forward-backward schedules, NaN/Inf skips, evaluation, metrics and atomic, resumable
checkpoints. `setup`, `train_step`, `evaluate` and `save` are separate so each reads on its own."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from megatron_soaes.config import ConfigError, JobConfig
from megatron_soaes.training.metrics import MetricsLog, flops_per_token, peak_tflops
from megatron_soaes.training.task import Task, task_for
from megatron_soaes.utils.files import atomic_write_json, atomic_write_text


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    skipped: bool
    moe: dict | None = None  # MoE models: training.moe_metrics figures of this step


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _reduce_reports(reports: list[dict], keys=("lm loss",)) -> dict[str, float]:
    """Each key's sum/count over micro-batches and data-parallel ranks (valid on every rank)."""
    from megatron.core import parallel_state as ps

    t = torch.zeros(len(keys), 2, dtype=torch.float64, device=_comm_device())
    # CP ranks hold disjoint tokens of the same sequences: every one of them counts
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for r in reports:
            for j, key in enumerate(keys):
                if key in r:
                    t[j] += r[key].double().to(t.device)
    torch.distributed.all_reduce(t)
    return {k: (t[j, 0] / t[j, 1]).item() for j, k in enumerate(keys) if t[j, 1] > 0}


def _grads_finite(ddp) -> bool:
    ok = torch.tensor([1.0], device=_comm_device())
    for buf in [*ddp.buffers, *ddp.expert_parallel_buffers]:  # expert weights' gradients live in the latter
        if not torch.isfinite(buf.grad_data).all():
            ok.zero_()
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


class Trainer:
    def __init__(self, job: JobConfig, task: Task | None = None, log: Callable[[str], None] = print):
        self.job, self.task, self.log = job, task or task_for(job.task_name), log
        self.async_queue = None  # megatron-core's AsyncCallsQueue while a run with train.async_save is going
        self.gate, self.stop_at = None, None  # the general-ability gate (train.retention), once started

    # ---- before any work ----
    def check(self) -> JobConfig:
        """Every error that can be found without starting work; returns the prepared job."""
        from megatron_soaes.data.tokenizer import load_tokenizer
        from megatron_soaes.models import resolve_model_config
        from megatron_soaes.models.megatron import select_attention, use_transformer_engine
        from megatron_soaes.runtime import world_info
        from megatron_soaes.training.task import check_model_layout

        job = self.job
        rank, world, _ = world_info()
        if rank != 0:
            self.log = lambda msg: None  # one log stream, from global rank 0
        self.dp = job.check_world(world)
        job.check_paths()
        if job.train.dtype != "fp32" and not torch.cuda.is_available():
            raise ConfigError(f"train.dtype: {job.train.dtype} training needs a GPU (megatron-core's mixed-precision "
                              "optimizer is CUDA-only); use fp32 on CPU")
        self.use_te = use_transformer_engine(job)
        self.attention = select_attention(job, self.use_te)
        self.tokenizer = load_tokenizer(job.data.tokenizer)
        self.model_cfg = resolve_model_config(job.model, self.tokenizer)
        check_model_layout(job, self.model_cfg)
        self.job = self.task.prepare(job, self.tokenizer)
        if job.train.steps is None:
            self.log(f"train.steps {self.job.train.steps}: sft.epochs {job.sft.epochs} over the packed rows, "
                     f"global batch {job.train.global_batch_size}")
        return self.job

    # ---- setup ----
    def setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_soaes.models import build_model
        from megatron_soaes.runtime import initialize

        job = self.check()
        p, t, o = job.parallel, job.train, job.optim
        initialize(p, seed=t.seed)
        self.rank = torch.distributed.get_rank()
        self.out = Path(t.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        extra = {"sequence_parallel": p.sequence_parallel, "calculate_per_token_loss": True}
        if t.fp8:
            extra.update(fp8="hybrid")
        own = getattr(self.task, "build_model", None)  # a task that trains something else than the GPT model (a draft head)
        model = (own(job, self.model_cfg) if own else
                 build_model(self.model_cfg, dtype=t.dtype, use_te=self.use_te, attention=self.attention, **extra))
        if job.peft:  # before DDP and the optimizer: they only see the adapters
            from megatron_soaes.adapters import apply_lora, trainable_parameters

            apply_lora(model, job.peft, self.model_cfg, seed=t.seed)
            trainable, total = trainable_parameters(model)
            self.log(f"peft: LoRA r={job.peft.rank}{' with DoRA magnitudes' if job.peft.dora else ''} on "
                     f"{', '.join(job.peft.target_modules)}: {trainable:,} of "
                     f"{total:,} parameters train on this rank ({100 * trainable / total:.2f}%)")
        from megatron_soaes.models.megatron import FUSION_FLAGS

        self.fusions = {k: getattr(model.config, k) for k in FUSION_FLAGS}
        self.moe = None  # MoE models: per-step aux loss and expert load
        if self.model_cfg.is_moe and not own:
            from megatron_soaes.training.moe_metrics import MoEMetrics

            self.moe = MoEMetrics(model, self.model_cfg, _comm_device())
        on = [k.removesuffix("_fusion") for k, v in self.fusions.items() if v is True]
        self.log(f"layers: {'Transformer Engine' if self.use_te else 'megatron local'}, attention: {self.attention}, "
                 f"fusions: {', '.join(on) or 'none'}")
        self.ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=p.use_distributed_optimizer), model)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=t.dtype == "bf16",
            fp16=t.dtype == "fp16", params_dtype=model.config.params_dtype,
            use_distributed_optimizer=p.use_distributed_optimizer), [self.ddp])
        wsd = o.schedule == "wsd"
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=t.steps, lr_decay_style="WSD" if wsd else o.schedule,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
            wsd_decay_steps=o.wsd_decay_steps if wsd else None, lr_wsd_decay_style="linear" if wsd else None)
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = self.ddp.no_sync
        model.config.grad_scale_func = self.optimizer.scale_loss

        self.start_step, consumed = self._restore()
        self.batches, self.eval_sets = self.task.build(job, self.tokenizer, self.model_cfg,
                                                       ps.get_data_parallel_rank(), self.dp, consumed)
        r = job.train.retention
        # the gate's general text as plain next-token loss and accuracy, unless the task evaluates it so itself
        # (CPT); an SFT set of the same name is packed chat data, not that
        if r and not (r.eval_set in self.eval_sets and getattr(self.task, "eval_forward_step", None)):
            from megatron_soaes.training.cpt import text_eval_batches

            self.retention_batches = text_eval_batches(job, job.data.valid[r.eval_set], self.tokenizer,
                                                       ps.get_data_parallel_rank(), self.dp)
        # held-out plain text reports next-token accuracy too (CPT's eval sets, the gate's set in any task)
        self.report_keys = tuple(dict.fromkeys((*self.task.report_keys, "accuracy")))
        self.task.on_built(self.ddp, self.optimizer)
        self.fb = get_forward_backward_func()
        self.metrics = MetricsLog(self.out, self.rank == 0, t.tensorboard, self.start_step, self.log)
        self.flops_per_token = flops_per_token(self.model_cfg, job.data.seq_length)
        self.peak = peak_tflops(t.dtype, t.peak_tflops)
        self.src_names = job.source_names()
        if self.rank == 0:
            atomic_write_json(self.out / "resolved_config.json", {
                "job": job.model_dump(), "model": self.model_cfg.to_dict(),
                "transformer_impl": "transformer_engine" if self.use_te else "local", "attention": self.attention,
                "fusions": self.fusions, "world_size": torch.distributed.get_world_size(), "data_parallel": self.dp})

    def _restore(self) -> tuple[int, int]:
        """Resume from the newest complete checkpoint, or load the initial weights. With LoRA the frozen
        base always comes from init_checkpoint (checkpoints hold the adapters only), and the adapters from
        the resumed checkpoint or, on a fresh start, from model.init_adapter."""
        from megatron_soaes.checkpoint.load import load_adapter, load_model_weights, resolve_checkpoint
        from megatron_soaes.training import checkpointing as ckpt

        self.source_tokens: dict[int, int] = {}  # tokens per blend source, whole run
        self.resumed_common: dict = {}
        resume = ckpt.latest_verified(self.ckpt_dir, self.job.train.verify_checkpoints == "checksums", self.log)
        peft, init = self.job.peft, self.job.model.init_checkpoint
        if init and (peft or resume is None):
            load_model_weights(self.ddp.module, init)
            self.optimizer.reload_model_params()
            if resume is None:
                self.log(f"initialised weights from {init}")
        adapter = resume or (resolve_checkpoint(self.job.model.init_adapter) if self.job.model.init_adapter else None)
        if peft and adapter is not None:
            from megatron_soaes.adapters import check_base, check_structure
            from megatron_soaes.checkpoint.meta import read_meta

            meta = read_meta(adapter)
            check_base(meta, init, adapter)
            check_structure(meta, peft, adapter)
        if resume is not None:
            common = ckpt.load(resume, self.ddp.module, self.optimizer, self.scheduler, log=self.log)
            self.resumed_common = common
            self.source_tokens = {int(k): int(v) for k, v in common.get("source_tokens", {}).items()}
            self.log(f"resumed from {resume} at step {common['iteration']}")
            return common["iteration"], common["consumed_samples"]
        if adapter is not None:
            load_adapter(self.ddp.module, adapter)
            self.optimizer.reload_model_params()
            self.log(f"continuing the adapter {adapter}")
        elif peft and peft.dora:  # a fresh DoRA adapter starts from the loaded base's row norms
            from megatron_soaes.adapters import init_dora

            init_dora(self.ddp.module)
            self.optimizer.reload_model_params()
        return 0, 0

    # ---- one optimizer step ----
    def _schedule(self, micro: list, forward_only: bool, forward_step=None) -> tuple[float, dict[str, float]]:
        t = self.job.train
        reports = self.fb(forward_step_func=forward_step or self.task.forward_step, data_iterator=iter(micro), model=[self.ddp],
                          num_microbatches=len(micro), seq_length=self.job.data.seq_length,
                          micro_batch_size=t.micro_batch_size, forward_only=forward_only)
        parts = _reduce_reports(reports, self.report_keys)
        return parts.get("lm loss", float("nan")), parts

    def _count_sources(self, micro: list) -> None:
        from megatron.core import parallel_state as ps

        counts = torch.zeros(max(len(self.job.data.train), 1), dtype=torch.float64, device=_comm_device())
        for mb in micro:
            counts.index_add_(0, mb["source"].to(counts.device),
                              torch.ones(len(mb["source"]), dtype=torch.float64, device=counts.device))
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())  # the whole global batch
        for i, c in enumerate(counts.tolist()):
            if c:
                self.source_tokens[i] = self.source_tokens.get(i, 0) + int(c) * self.job.data.seq_length

    def train_step(self, step: int) -> tuple[StepRecord, dict[str, float]]:
        from megatron_soaes.training import checkpointing as ckpt

        self.ddp.train()
        micro = self.batches.next_global_batch()
        self._count_sources(micro)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, parts = self._schedule(micro, forward_only=False)
        finite = math.isfinite(loss) and _grads_finite(self.ddp)
        grad_norm = None
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
            finite = bool(ok)
        if finite:
            self.scheduler.step(increment=1)
        else:
            self.log(f"step {step}: non-finite loss/gradients (loss={loss}); update skipped")
        ckpt.fault_point("after_step", step)
        lr = self.optimizer.param_groups[0]["lr"]
        return StepRecord(step, loss, lr, None if grad_norm is None else float(grad_norm), 0.0, not finite), parts

    # ---- evaluation ----
    def evaluate(self, step: int) -> dict[str, float]:
        self.ddp.eval()  # no MoE load-balancing loss or load counts from held-out batches (train_step sets train())
        res = {}
        for name, micro in self.eval_sets.items():
            loss, parts = self._schedule(micro, forward_only=True, forward_step=getattr(self.task, "eval_forward_step", None))
            res[name] = loss
            if len(parts) > 1:
                res.update({f"{name}/{k}": v for k, v in parts.items() if k != "lm loss"})
        if res:
            self.log(f"step {step} | eval " + " | ".join(
                f"{k} loss {v:.4f} ppl {math.exp(min(v, 50)):.2f}" if "/" not in k else f"{k} {v:.4f}"
                for k, v in res.items()))
            self.metrics.write({"step": step, "eval": res})
        if self.gate is not None:
            self._judge_retention(step, res)
        return res

    # ---- the general-ability gate (train.retention) ----
    def _general(self, res: dict | None = None) -> tuple[float, float]:
        """The gate's set: (next-token loss, top-1 accuracy)."""
        from functools import partial

        from megatron_soaes.training.cpt import lm_eval_forward_step

        name = self.job.train.retention.eval_set
        if res and name in res and f"{name}/accuracy" in res:  # the task evaluated it as plain text itself (CPT)
            return res[name], res[f"{name}/accuracy"]
        loss, parts = self._schedule(self.retention_batches, forward_only=True,
                                     forward_step=partial(lm_eval_forward_step, vocab_size=self.model_cfg.vocab_size))
        return loss, parts["accuracy"]

    def _start_retention(self) -> None:
        """The gate's baseline: restored from the checkpoint on resume, else the loss before any step."""
        from megatron_soaes.training.retention import RETENTION_FILE, RetentionBreached, RetentionGate

        r = self.job.train.retention
        self.gate, self.stop_at = None, None
        if r is None:
            if self.rank == 0:  # a gate of an earlier run in this directory publishes nothing now
                (self.out / RETENTION_FILE).unlink(missing_ok=True)
            return
        if "retention" in self.resumed_common:  # the run's baseline and history; the bound is the job's
            self.gate = RetentionGate.restore(self.resumed_common["retention"])
            self.gate.min_ratio, self.gate.action, self.gate.metric = r.min_ratio, r.action, r.metric
            last = self.gate.history[-1] if self.gate.history else None
            if last and last["decision"] == "stop":  # a rerun of a stopped run stops again, it does not train on
                raise RetentionBreached(last["step"], last["ratio"], self.gate.min_ratio, self.ckpt_dir / f"iter_{last['step']:07d}")
            self._prune_best(self.gate.best["step"] if self.gate.best else 0)
            return
        self._prune_best(0)
        with torch.no_grad():  # every held-out set at step 0: the gate's baseline and the domain loss it starts from
            base, acc = self._general(self.evaluate(0))
        self.gate = RetentionGate(r.min_ratio, r.action, base, base_accuracy=acc, metric=r.metric)
        self.log(f"retention gate: {r.eval_set} baseline loss {base:.4f} (ppl {math.exp(min(base, 50)):.2f}, top-1 "
                 f"{acc:.4f}) at the phase's start; bound {r.min_ratio} on {r.metric}, action {r.action}")
        self.metrics.write({"step": 0, "retention": {"general_loss": base, "accuracy": acc, "ratio": 1.0, "baseline": True}})

    def _prune_best(self, keep_upto: int) -> None:
        """keep_best's saves newer than the restored gate's best were made after the checkpoint resumed
        from (a killed run): remove them, or keep-last-1 would keep them over the next best."""
        import shutil

        if self.rank == 0 and (self.out / "best").is_dir():
            for d in (self.out / "best").iterdir():
                if d.name.startswith("iter_") and int(d.name[5:12]) > keep_upto:
                    shutil.rmtree(d, ignore_errors=True)
            latest = self.out / "best" / "latest"
            if keep_upto == 0:
                latest.unlink(missing_ok=True)
            else:
                atomic_write_text(latest, f"iter_{keep_upto:07d}")
        torch.distributed.barrier()

    def _judge_retention(self, step: int, res: dict) -> None:
        r = self.job.train.retention
        select = r.select or next((k for k in self.eval_sets if k != r.eval_set and "/" not in k), None)
        with torch.no_grad():
            rec = self.gate.judge(step, *self._general(res), res.get(select) if select else None)
        self.metrics.write({"step": step, "retention": rec})
        say = {"ok": "above the bound", "kept": "kept training", "warn": "WARNING: below the bound",
               "stop": "below the bound: stopping", "best": f"new best {select} loss {rec['select_loss']}"}[rec["decision"]]
        self.log(f"retention gate: step {step}: {r.eval_set} retention {rec['ratio']:.4f} on {r.metric} (bound "
                 f"{r.min_ratio}; perplexity {rec['ppl_ratio']:.4f}, accuracy {rec['accuracy_ratio']:.4f}) -- {say}")
        if rec["decision"] == "best":
            from megatron_soaes.training import checkpointing as ckpt

            path = ckpt.save(self.out / "best", step, self.ddp.module, self.optimizer, self.scheduler,
                             self._common(step), self.model_cfg, 1, None, self._adapter_meta(), self._meta())
            self.gate.best = {"step": step, "select_loss": rec["select_loss"], "ratio": rec["ratio"],
                              "checkpoint": str(Path(path).resolve())}
        elif rec["decision"] == "stop":
            self.stop_at = step

    def _stop_at_gate(self, step: int) -> None:
        """action: stop -- the save of `step` published, the gate's record written, then RetentionBreached."""
        from megatron_soaes.training.retention import RetentionBreached

        self.finish_saves(blocking=True)
        self._finish_retention()
        self.metrics.close()
        raise RetentionBreached(step, self.gate.history[-1]["ratio"], self.gate.min_ratio, self.ckpt_dir / f"iter_{step:07d}")

    def _finish_retention(self) -> None:
        """retention.json in the run directory; with keep_best it names the published checkpoint."""
        if self.gate is None:
            return
        from megatron_soaes.training.retention import RETENTION_FILE

        out = {**self.gate.state(), "eval_set": self.job.train.retention.eval_set}
        write = (lambda: atomic_write_json(self.out / RETENTION_FILE, out)) if self.rank == 0 else (lambda: None)
        if self.gate.action == "keep_best":
            if self.gate.best is None and self.job.peft:  # every rank raises; the base alone is no adapter
                from megatron_soaes.training.retention import RetentionBreached

                write()
                last = self.gate.history[-1]
                raise RetentionBreached(last["step"], last["ratio"], self.gate.min_ratio, "no adapter (none kept the bound)")
            start = self.job.model.init_checkpoint
            out["published"] = self.gate.best["checkpoint"] if self.gate.best else (
                str(Path(start).resolve()) if start else None)
            self.log(f"retention gate: publishing {out['published']}" + (
                f" (step {self.gate.best['step']}, retention {self.gate.best['ratio']:.4f})" if self.gate.best else
                " (the starting checkpoint: no evaluated step stayed above the bound)"))
        write()
        torch.distributed.barrier()  # every rank resolves the run's checkpoint through this file next

    # ---- checkpoints ----
    def save(self, step: int) -> float:
        """Save at `step`; returns the seconds training was blocked (waiting for the previous background
        save, staging, or the whole write when saves are synchronous)."""
        from megatron_soaes.training import checkpointing as ckpt

        t0 = time.time()
        self.finish_saves(blocking=True)  # at most one save in flight
        path = ckpt.save(self.ckpt_dir, step, self.ddp.module, self.optimizer, self.scheduler, self._common(step),
                         self.model_cfg, self.job.train.keep_last, self.async_queue, self._adapter_meta(), self._meta())
        blocked = time.time() - t0
        self.log(f"{'saving' if self.async_queue else 'saved'} {path} (training blocked {blocked:.2f}s)")
        return blocked

    def _common(self, step: int) -> dict:
        """What a checkpoint holds besides tensors: progress, the job, token counts, the gate's state."""
        common = {"iteration": step, "consumed_samples": self.batches.consumed, "job": self.job.model_dump(),
                  "source_tokens": {str(k): v for k, v in self.source_tokens.items()}}
        if self.gate is not None:
            common["retention"] = self.gate.state()
        return common

    def _meta(self) -> dict:
        """What a checkpoint records beside its weights: its tokenizer (so megatron -> HF writes a complete HF
        directory), as an absolute path when it is a file or directory."""
        tok = self.job.data.tokenizer
        own = getattr(self.task, "checkpoint_meta", dict)()  # e.g. a draft head's record
        return {"tokenizer": str(Path(tok).resolve()) if Path(tok).exists() else tok, **own}

    def _adapter_meta(self) -> dict | None:
        if not self.job.peft:
            return None
        from megatron_soaes.adapters import base_identity

        return {"adapter": self.job.peft.model_dump(), "base": base_identity(self.job.model.init_checkpoint)}

    def finish_saves(self, blocking: bool) -> float | None:
        """Publish background saves that every rank has finished (collective); `blocking` waits for them.
        Returns the seconds a publication held the training loop (the manifest's hashing is its cost), or None
        when none was published."""
        if self.async_queue is None or not self.async_queue.get_num_unfinalized_calls():
            return None
        t0, published = time.time(), None
        for _ in self.async_queue.maybe_finalize_async_calls(blocking=blocking):
            published = time.time() - t0
            self.log(f"background save published (the loop held {published:.2f}s: waiting, manifest, rename)")
        return published

    # ---- the loop ----
    def _speed(self, rec: StepRecord, dt: float, tokens: int) -> dict:
        rec.tokens_per_s = tokens / max(dt, 1e-9)
        tflops = self.flops_per_token * rec.tokens_per_s / 1e12
        world = torch.distributed.get_world_size()
        return {"tokens_per_s": rec.tokens_per_s, "model_tflops": tflops,
                "mfu": tflops / (self.peak * world) if self.peak else None}

    def _log_step(self, rec: StepRecord, speed: dict) -> None:
        t, seq = self.job.train, self.job.data.seq_length
        mfu = f" | MFU {100 * speed['mfu']:.1f}%" if self.peak else ""
        eta = (t.steps - rec.step) * t.global_batch_size * seq / max(rec.tokens_per_s, 1e-9)
        per_src = ", ".join(f"{self.src_names.get(k, f'source {k}')}={v:,}" for k, v in sorted(self.source_tokens.items()))
        norm = rec.grad_norm if rec.grad_norm is None else round(rec.grad_norm, 3)
        moe = ""
        if rec.moe and "moe_aux_loss" in rec.moe:
            z = f" | router z {rec.moe['moe_z_loss']:.4f}" if "moe_z_loss" in rec.moe else ""
            moe = f" | moe aux {rec.moe['moe_aux_loss']:.4f}{z} | expert load max/mean {rec.moe['moe_load_worst']:.2f}"
        self.log(f"step {rec.step}/{t.steps} | loss {rec.loss:.4f} | lr {rec.lr:.3e} | grad norm {norm} | "
                 f"{rec.tokens_per_s:,.0f} tok/s | {speed['model_tflops']:.3f} TFLOP/s (model){mfu}{moe} | "
                 f"ETA {eta:.0f}s | tokens {per_src}")

    def run(self) -> list[StepRecord]:
        from megatron_soaes.training.preemption import Preempted, SigtermWatch

        self.async_queue = None
        if self.job.train.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        with SigtermWatch() as sigterm:
            self.setup()
            self._start_retention()
            t, seq = self.job.train, self.job.data.seq_length
            history: list[StepRecord] = []
            t_start, tokens_since = time.time(), 0
            for step in range(self.start_step + 1, t.steps + 1):
                rec, parts = self.train_step(step)
                if self.moe is not None:  # collective, every step
                    rec.moe = self.moe.collect(t.global_batch_size // (t.micro_batch_size * self.dp))
                publish_s = self.finish_saves(blocking=False)
                tokens_since += t.global_batch_size * seq
                speed = {}
                if step % t.log_interval == 0 or step == t.steps:
                    speed = self._speed(rec, time.time() - t_start, tokens_since)
                    self._log_step(rec, speed)
                    t_start, tokens_since = time.time(), 0
                history.append(rec)
                if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
                    self.evaluate(step)
                preempted = sigterm.requested(_comm_device())
                blocked = None
                if (t.save_interval and step % t.save_interval == 0) or step == t.steps or preempted or self.stop_at:
                    blocked = self.save(step)
                self.metrics.write({"step": step, "loss": rec.loss, "lr": rec.lr, "grad_norm": rec.grad_norm,
                                    "skipped": rec.skipped, "source_tokens": self.source_tokens, **speed,
                                    **({"save_blocked_s": blocked} if blocked is not None else {}),
                                    **({"save_publish_s": publish_s} if publish_s is not None else {}), **(rec.moe or {}),
                                    **{k: v for k, v in parts.items() if k != "lm loss"}})
                if self.stop_at:
                    self._stop_at_gate(step)
                if preempted and step != t.steps:
                    self.finish_saves(blocking=True)
                    self.log(f"SIGTERM: saved at step {step}; exiting for a requeue")
                    self.metrics.close()
                    raise Preempted(step, self.ckpt_dir / f"iter_{step:07d}")
            self.finish_saves(blocking=True)  # the run ends only when its last checkpoint is published
            self.evaluate(t.steps)
            if self.stop_at:  # broken at the final evaluation: the run is complete, and says so
                self._stop_at_gate(t.steps)
            self._finish_retention()
            self.metrics.close()
        return history


def train(job: JobConfig, task: Task | None = None, log: Callable[[str], None] = print) -> list[StepRecord]:
    """Run `job` (its task looked up by `job.kind` unless given); returns the per-step records."""
    return Trainer(job, task, log).run()
