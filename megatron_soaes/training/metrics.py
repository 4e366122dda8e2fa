"""A run's metrics: ``metrics.jsonl`` (one JSON record per step and per evaluation) plus
tensorboard scalars, written from global rank 0; readers for what later phases need from them;
and the throughput accounting (model FLOPs per token, GPU peaks for MFU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, start_step: int, log=print):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled, self.tb = enabled, None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log("tensorboard not installed: metrics.jsonl only")

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            scalars = {f"eval/{a}": b for a, b in rec["eval"].items()} if "eval" in rec else rec
            for k, v in scalars.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in open(path)] if path.exists() else []


def last_eval(run_dir) -> dict:
    """The run's last held-out evaluation ({} when it has none)."""
    evals = [r["eval"] for r in read_metrics(run_dir) if "eval" in r]
    return evals[-1] if evals else {}


def loss_curve(run_dir) -> tuple[list[int], list[float]]:
    recs = [r for r in read_metrics(run_dir) if "loss" in r]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


# Dense peak TFLOP/s per GPU (bf16/fp16, and TF32 for fp32) from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"H100": (989.4, 494.7), "H200": (989.4, 494.7), "H800": (989.4, 494.7), "A100": (312.0, 156.0),
                   "A800": (312.0, 156.0), "L40S": (362.0, 183.0)}


def peak_tflops(dtype: str, configured: float | None = None) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tf32 if dtype == "fp32" else half
    return None


def flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token: 6 x parameters a token runs through (matmuls, fwd + bwd; an MoE model's
    top-k experts, not all of them) + attention scores and values (12 x layers x hidden x sequence length),
    as in the Megatron-LM MFU accounting."""
    return 6.0 * cfg.num_parameters(active=True) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length
