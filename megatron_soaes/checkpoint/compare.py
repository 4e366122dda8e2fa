"""Logit parity between the HF reference implementation and our megatron-core model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def hf_logits(hf_dir, tokens: torch.Tensor, adapter=None) -> torch.Tensor:
    """transformers' logits; with `adapter` (an HF PEFT directory) peft's, base + adapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


# Parity judged the way it scales: against the size of the logits (a real model's are tens; fp32 sums
# taken in another order, as TP takes them, differ by ~1e-6 of that, where an absolute bound sized for
# tiny random models fails them) plus top-1 agreement. A wrong conversion misses both by orders.
PARITY = {"fp32": {"rtol": 1e-4, "min_top1": 0.99}, "half": {"rtol": 3e-2, "min_top1": 0.9}}


def logit_stats(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (ours.float() - ref.float()).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": diff.max().item() / max(ref.float().abs().max().item(), 1e-12),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "num_tokens": int(ref.shape[0] * ref.shape[1]),
    }


def parity_failure(stats: dict, precision: str = "fp32") -> str | None:
    """Why `stats` (logit_stats) are not parity at this precision ("fp32", or "half" when either side
    ran in bf16/fp16), or None when they are."""
    b = PARITY[precision]
    if stats["max_rel_diff"] > b["rtol"] or stats["top1_agreement"] < b["min_top1"]:
        return (f"max |logit diff| {stats['max_abs_diff']:.3g} = {stats['max_rel_diff']:.2e} of the largest logit "
                f"(bound {b['rtol']:g}), top-1 agreement {stats['top1_agreement']:.3f} (bound {b['min_top1']})")
    return None


def compare_logits(hf_dir, tensor_parallel: int = 1, pipeline_parallel: int = 1, mcore_dir=None,
                   batch: int = 2, seq_len: int = 32, seed: int = 0, adapter=None,
                   sequence_parallel: bool = False, prepare=None) -> dict | None:
    """Convert (unless `mcore_dir` is given), load at TP/PP, and compare logits with HF on random tokens.
    With `adapter` (an HF PEFT LoRA directory) the reference is peft on transformers, and `prepare(model,
    cfg)` (collective; e.g. `adapters.peft_io.attach_peft_adapter`) puts the same adapter on ours.

    Run with world size TP*PP. The last stage's first TP rank computes the stats; every rank
    returns them.
    """
    from megatron.core import parallel_state

    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.checkpoint.load import load_model_weights
    from megatron_soaes.models.forward import forward_logits
    from megatron_soaes.models import Qwen2Config, build_model
    from megatron_soaes.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel), seed=seed)
    rank = torch.distributed.get_rank()
    cfg = Qwen2Config.from_hf(hf_dir)
    tmp = None
    if mcore_dir is None:
        obj = [None]
        if rank == 0:  # ranks share rank 0's temporary directory (single node)
            tmp = tempfile.TemporaryDirectory(prefix="soaes-compare-")
            obj = [str(Path(tmp.name) / "mcore")]
            hf_to_megatron(hf_dir, obj[0], tensor_parallel, pipeline_parallel, progress=False)
        torch.distributed.broadcast_object_list(obj, src=0)
        mcore_dir = obj[0]
    torch.distributed.barrier()
    model = build_model(cfg, dtype="fp32", sequence_parallel=sequence_parallel)
    load_model_weights(model, mcore_dir)
    if prepare is not None:
        prepare(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    logits = forward_logits(model, tokens)
    stats = None
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        stats = logit_stats(logits[..., : cfg.vocab_size].cpu(), hf_logits(hf_dir, tokens, adapter))
        stats.update(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    out = [stats]
    last = torch.distributed.get_world_size() - parallel_state.get_tensor_model_parallel_world_size()
    torch.distributed.broadcast_object_list(out, src=last)
    torch.distributed.barrier()
    if tmp is not None:
        tmp.cleanup()
    return out[0]
