"""The one training loop. CPT, SFT and distillation plug in a `Task` (data + forward step + loss);
the loop owns parallel setup, megatron-core schedules, DDP, optimizer, LR schedule, NaN/Inf skips,
evaluation, logging and atomic, resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from megatron_soaes.training.config import ConfigError, JobConfig


class Task(Protocol):
    def build(self, job: JobConfig, tokenizer, model_cfg, dp_rank: int, dp_size: int, consumed_samples: int):
        """Return (train ResumableBatches, {name: list of eval micro-batches})."""

    def forward_step(self, data_iterator, model):
        """megatron forward_step_func: returns (output, loss_func); loss_func -> (loss_sum, num_tokens, report).

        `report` maps names to [sum, count] tensors; the loop logs each as sum/count over the global
        batch. Optional attributes: `report_keys` (every name a report may hold; default "lm loss",
        whose value is the training loss) and `on_built(model, optimizer)`.
        """


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of per-token losses under the mask; megatron divides by the global token count."""
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.reshape(-1).float() * mask).sum()
    n = mask.sum()
    return total, n.to(torch.int), {"lm loss": torch.stack([total.detach().clone(), n.detach().clone()])}


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    skipped: bool


def model_config_from(section, tokenizer, where: str = "model"):
    """Qwen2Config from a config section with `preset`+`overrides` or `hf_config` (student or teacher)."""
    from megatron_soaes.models.qwen2 import ModelConfigError, Qwen2Config, preset

    try:
        cfg = preset(section.preset, **section.overrides) if section.preset else Qwen2Config.from_hf(section.hf_config)
    except (ModelConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{where}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return cfg


def resolve_model_config(job: JobConfig, tokenizer):
    return model_config_from(job.model, tokenizer)


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


def _reduce_loss(reports: list[dict], keys=("lm loss",)) -> tuple[float, dict[str, float]]:
    res = _reduce_reports(reports, keys)
    return res.get("lm loss", float("nan")), res


# Dense peak TFLOP/s per GPU (bf16/fp16, and TF32 for fp32) from the vendors' data sheets.
_PEAKS = {"H100": (989.4, 494.7), "H200": (989.4, 494.7), "H800": (989.4, 494.7), "A100": (312.0, 156.0),
          "A800": (312.0, 156.0), "L40S": (362.0, 183.0)}


def peak_tflops(dtype: str, configured: float | None = None) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, tf32) in _PEAKS.items():
        if key in name:
            return tf32 if dtype == "fp32" else half
    return None


def flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token: 6 x parameters (matmuls, fwd + bwd) + attention scores and values
    (12 x layers x hidden x sequence length), as in the Megatron-LM MFU accounting."""
    return 6.0 * cfg.num_parameters() + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length


def _grads_finite(ddp) -> bool:
    ok = torch.tensor([1.0], device=_comm_device())
    for buf in ddp.buffers:
        if not torch.isfinite(buf.grad_data).all():
            ok.zero_()
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def use_transformer_engine(job) -> bool:
    """Whether this job runs Transformer Engine layers; a clear error when it asks for TE without it."""
    from megatron_soaes.models.qwen2 import have_transformer_engine

    t = job.train
    have = have_transformer_engine()
    if t.transformer_impl == "transformer_engine" and not have:
        raise ConfigError("train.transformer_impl: transformer_engine is not installed (pip install '.[gpu]' on a "
                          "CUDA machine)")
    if job.parallel.context_parallel > 1 and (t.transformer_impl == "local" or not have):
        raise ConfigError("parallel.context_parallel > 1 needs Transformer Engine attention (megatron-core's local "
                          "attention has no context parallelism)")
    if t.fp8 and (t.transformer_impl == "local" or not have):
        raise ConfigError("train.fp8: FP8 needs Transformer Engine layers (pip install '.[gpu]' on a CUDA machine; "
                          "transformer_impl must not be 'local')")
    return have if t.transformer_impl == "auto" else t.transformer_impl == "transformer_engine"


def train(job: JobConfig, task: Task, log: Callable[[str], None] = print) -> list[StepRecord]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.models.qwen2 import build_model
    from megatron_soaes.runtime import ParallelConfig, initialize, world_info
    from megatron_soaes.training import checkpointing as ckpt

    # ---- everything that can be checked before work starts ----
    world = world_info()[1]
    dp = job.check_world(world)
    job.check_paths()
    if job.train.dtype != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.dtype: {job.train.dtype} training needs a GPU (megatron-core's mixed-precision "
                          "optimizer is CUDA-only); use fp32 on CPU")
    use_te = use_transformer_engine(job)
    tokenizer = load_tokenizer(job.data.tokenizer)
    model_cfg = resolve_model_config(job, tokenizer)
    p = job.parallel
    model_cfg.check_parallel(p.tensor_parallel, p.pipeline_parallel)

    initialize(ParallelConfig(p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.sequence_parallel),
               seed=job.train.seed)
    rank = torch.distributed.get_rank()
    if rank != 0:
        log = lambda msg: None  # noqa: E731  (one log stream, from global rank 0)
    t = job.train
    out = Path(t.output_dir)
    ckpt_dir = out / "checkpoints"
    extra = {"sequence_parallel": p.sequence_parallel, "calculate_per_token_loss": True}
    if t.fp8:
        extra.update(fp8="hybrid")
    model = build_model(model_cfg, dtype=t.dtype, use_te=use_te, **extra)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.use_distributed_optimizer), model)
    o = job.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=t.dtype == "bf16",
        fp16=t.dtype == "fp16", params_dtype=model.config.params_dtype,
        use_distributed_optimizer=p.use_distributed_optimizer), [ddp])
    style = {"wsd": "WSD"}.get(o.schedule, o.schedule)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=t.steps, lr_decay_style=style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        wsd_decay_steps=o.wsd_decay_steps if o.schedule == "wsd" else None,
        lr_wsd_decay_style="linear" if o.schedule == "wsd" else None)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    model.config.grad_scale_func = optimizer.scale_loss

    start_step, consumed, restored_tokens = 0, 0, {}
    resume = ckpt.latest_checkpoint(ckpt_dir)
    if resume is not None:
        common = ckpt.load(resume, ddp.module, optimizer, scheduler)
        start_step, consumed = common["iteration"], common["consumed_samples"]
        restored_tokens = {int(k): int(v) for k, v in common.get("source_tokens", {}).items()}
        log(f"resumed from {resume} at step {start_step}")
    elif job.model.init_checkpoint:
        load_model_weights(ddp.module, job.model.init_checkpoint)
        optimizer.reload_model_params()
        log(f"initialised weights from {job.model.init_checkpoint}")

    dp_rank = ps.get_data_parallel_rank()
    batches, eval_sets = task.build(job, tokenizer, model_cfg, dp_rank, dp, consumed)
    report_keys = tuple(getattr(task, "report_keys", ("lm loss",)))
    if hasattr(task, "on_built"):
        task.on_built(ddp, optimizer)
    fb = get_forward_backward_func()
    seq, mbs = job.data.seq_length, t.micro_batch_size
    fpt = flops_per_token(model_cfg, job.data.seq_length)
    peak = peak_tflops(t.dtype, t.peak_tflops)
    world_devices = torch.distributed.get_world_size()
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def evaluate(step: int) -> dict:
        res = {}
        for name, micro in eval_sets.items():
            reports = fb(forward_step_func=task.forward_step, data_iterator=iter(micro), model=[ddp],
                         num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs, forward_only=True)
            loss, parts = _reduce_loss(reports, report_keys)
            res[name] = loss
            if len(parts) > 1:
                res.update({f"{name}/{k}": v for k, v in parts.items() if k != "lm loss"})
        if res:
            log(f"step {step} | eval " + " | ".join(
                f"{k} loss {v:.4f} ppl {math.exp(min(v, 50)):.2f}" if "/" not in k else f"{k} {v:.4f}"
                for k, v in res.items()))
            _write_metrics({"step": step, "eval": res})
        return res

    tb = None
    if rank == 0 and t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            log("tensorboard not installed: metrics.jsonl only")

    def _write_metrics(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if tb is not None:
            for k, v in ({f"eval/{a}": b for a, b in rec["eval"].items()} if "eval" in rec else rec).items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    tb.add_scalar(k if "/" in k else f"train/{k}", v, rec["step"])
            tb.flush()

    history: list[StepRecord] = []
    source_tokens: dict[int, int] = dict(restored_tokens)  # tokens per blend source, whole run
    src_names = {i: s.name or Path(s.path).name for i, s in enumerate(job.data.train)}
    t_start, tokens_since = time.time(), 0
    for step in range(start_step + 1, t.steps + 1):
        ddp.train()
        micro = batches.next_global_batch()
        counts = torch.zeros(max(len(job.data.train), 1), dtype=torch.float64, device=_comm_device())
        for mb in micro:
            counts.index_add_(0, mb["source"].to(counts.device), torch.ones(len(mb["source"]), dtype=torch.float64,
                                                                             device=counts.device))
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())  # the whole global batch
        for i, c in enumerate(counts.tolist()):
            if c:
                source_tokens[i] = source_tokens.get(i, 0) + int(c) * seq
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = fb(forward_step_func=task.forward_step, data_iterator=iter(micro), model=[ddp],
                     num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs, forward_only=False)
        loss, parts = _reduce_loss(reports, report_keys)
        finite = math.isfinite(loss) and _grads_finite(ddp)
        grad_norm = None
        if finite:
            ok, grad_norm, _ = optimizer.step()
            finite = bool(ok)
        if finite:
            scheduler.step(increment=1)
        else:
            log(f"step {step}: non-finite loss/gradients (loss={loss}); update skipped")
        ckpt.fault_point("after_step", step)
        tokens_since += t.global_batch_size * seq
        lr = optimizer.param_groups[0]["lr"]
        rec = StepRecord(step, loss, lr, None if grad_norm is None else float(grad_norm), 0.0, not finite)
        speed = {}
        if step % t.log_interval == 0 or step == t.steps:
            dt = time.time() - t_start
            rec.tokens_per_s = tokens_since / max(dt, 1e-9)
            tflops = fpt * rec.tokens_per_s / 1e12
            speed = {"tokens_per_s": rec.tokens_per_s, "model_tflops": tflops,
                     "mfu": tflops / (peak * world_devices) if peak else None}
            mfu = f" | MFU {100 * speed['mfu']:.1f}%" if peak else ""
            eta = (t.steps - step) * t.global_batch_size * seq / max(rec.tokens_per_s, 1e-9)
            per_src = ", ".join(f"{src_names.get(k, f'src{k}')}={v:,}" for k, v in sorted(source_tokens.items()))
            log(f"step {step}/{t.steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                f"{rec.grad_norm if rec.grad_norm is None else round(rec.grad_norm, 3)} | "
                f"{rec.tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s (model){mfu} | ETA {eta:.0f}s | tokens {per_src}")
            t_start, tokens_since = time.time(), 0
        history.append(rec)
        _write_metrics({"step": step, "loss": loss, "lr": lr, "grad_norm": rec.grad_norm, "skipped": rec.skipped,
                        "source_tokens": source_tokens, **speed, **{k: v for k, v in parts.items() if k != "lm loss"}})
        if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
            evaluate(step)
        if (t.save_interval and step % t.save_interval == 0) or step == t.steps:
            common = {"iteration": step, "consumed_samples": batches.consumed, "job": job.model_dump(),
                      "source_tokens": {str(k): v for k, v in source_tokens.items()}}
            path = ckpt.save(ckpt_dir, step, ddp.module, optimizer, scheduler, common, model_cfg, t.keep_last)
            log(f"saved {path}")
    evaluate(t.steps)
    if tb is not None:
        tb.close()
    return history
