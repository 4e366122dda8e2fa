"""LoRA for megatron-core's tensor-parallel linears, in peft's shape: an adapter module wrapped around
the layer it adapts, the base layer frozen inside it.

Sharding follows the layer, the rank dimension is never split:
- column-parallel (``linear_qkv``, ``linear_fc1``): A ``[P*r, in]`` replicated, B ``[out/tp, P*r]`` split
  like the weight's rows. Without SP the adapter's hidden state passes `copy_to_tensor_model_parallel_region`
  (the backward all-reduce makes A's gradient the sum over every rank's rows, as for the layer's input);
  with SP it is computed on the local sequence slice and all-gathered (r columns, not the hidden size), and
  A is marked ``sequence_parallel`` so megatron's finalize all-reduces its gradient across TP.
- row-parallel (``linear_proj``, ``linear_fc2``): A ``[r, in/tp]`` split like the weight's columns, B
  ``[out, r]`` replicated; the partial ``A x`` is all-reduced (reduce-scattered along the sequence with SP,
  then B is marked ``sequence_parallel``).

An expert's linears (megatron's MoE experts) do no communication of their own: the token dispatcher gathers
their input and reduces their output across the expert-TP ranks, so the adapter does none either, and the
factor every expert-TP rank holds whole (A of ``linear_fc1``, B of ``linear_fc2``) has its gradient summed
over those ranks by a hook, the other factor being split like the weight.

DoRA (``dora``, peft's ``use_dora``): a learned magnitude m per output row rescales the adapted weight,
``W' = m / ||W + s B A||_row * (W + s B A)``, the norm detached as in the paper and peft. The output is
``out + (m/n - 1) * W x + m/n * s B A x``; the row norm is local on a column-parallel layer (whole rows) and
summed over TP on a row-parallel one (rows split by columns); m is split like the rows (column) or whole
(row, TP-reduced with SP like B). Rows of a fused layer whose part is not adapted keep scale 1.

A fused layer holds several HF projections (q/k/v, gate/up): each adapted one is a *part* with its own r
rows of A, and B is masked block-diagonally so part p's output rows only see part p's rows of A -- the
exact equivalent of peft's separate q_proj/k_proj/v_proj adapters, kept exact through training (masked
entries get zero gradients and stay zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """peft's: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass(frozen=True)
class FusedLayout:
    """Which HF projection each local output row of a column-parallel layer belongs to."""

    parts: tuple[str, ...]  # the HF projections fused in this layer, in part order
    row_part: torch.Tensor  # [out_local] part index of every local output row


class LoRALinear(torch.nn.Module):
    def __init__(self, base, kind: str, rank: int, alpha: float, dropout: float, rslora: bool,
                 adapted: tuple[str, ...], layout: FusedLayout | None, init_seed: int, glu: bool = False,
                 dora: bool = False):
        super().__init__()
        if kind not in ("column", "row"):
            raise ValueError(f"kind must be column or row, got {kind!r}")
        self.base, self.kind, self.rank, self.glu = base, kind, rank, glu
        self.adapted = adapted
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.dropout = dropout
        self.group = base.tp_group  # the layer's own: the tensor-parallel group, or the expert-TP group
        tp_rank, tp_size = torch.distributed.get_rank(self.group), torch.distributed.get_world_size(self.group)
        self.expert = bool(getattr(base, "explicit_expert_comm", False))
        self.sequence_parallel = base.sequence_parallel and tp_size > 1 and not self.expert
        for p in base.parameters():
            p.requires_grad_(False)
        out_local, in_local = base.weight.shape
        dtype, device = base.weight.dtype, base.weight.device  # initialised on the CPU (seeded), kept beside the layer
        g = torch.Generator().manual_seed(init_seed)  # the same on every TP rank: TP=2 starts where TP=1 does
        if kind == "column":
            n = len(adapted)
            a = torch.empty(n * rank, in_local)
            for i in range(n):  # peft's init per adapter: kaiming-uniform A, zero B
                torch.nn.init.kaiming_uniform_(a[i * rank:(i + 1) * rank], a=math.sqrt(5), generator=g)
            self.lora_A = torch.nn.Parameter(a.to(device, dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_local, n * rank, dtype=dtype, device=device))
            if layout is not None:
                mask = torch.zeros(out_local, n * rank, dtype=dtype)
                for i, name in enumerate(adapted):
                    mask[layout.row_part == layout.parts.index(name), i * rank:(i + 1) * rank] = 1
                self.register_buffer("lora_mask", mask.to(device), persistent=False)
            else:
                self.lora_mask = None
            if self.sequence_parallel:
                self.lora_A.sequence_parallel = True
        else:
            full = torch.empty(rank, in_local * tp_size)
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
            self.lora_A = torch.nn.Parameter(full[:, tp_rank * in_local:(tp_rank + 1) * in_local].to(device, dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=dtype, device=device))
            self.lora_mask = None
            if self.sequence_parallel:
                self.lora_B.sequence_parallel = True
        self.dora = dora
        if dora:  # set from the loaded base (init_magnitude) or read from an adapter checkpoint
            self.lora_magnitude = torch.nn.Parameter(torch.ones(out_local, dtype=dtype, device=device))
            rows = None if self.lora_mask is None else self.lora_mask.sum(1) > 0  # rows of an adapted part
            self.register_buffer("dora_rows", rows, persistent=False)
            self.lora_magnitude.tensor_model_parallel = kind == "column"
            self.lora_magnitude.partition_dim = 0
            if self.sequence_parallel and kind == "row":
                self.lora_magnitude.sequence_parallel = True
        # megatron's optimizer and DDP look for these on parameters (experts': reduced over expert-DP)
        for p in self.lora_parameters():
            p.allreduce = getattr(base.weight, "allreduce", True)
        if self.expert and tp_size > 1:  # the whole factor's gradient is partial on each expert-TP rank
            whole = self.lora_A if kind == "column" else self.lora_B
            whole.register_hook(self._sum_over_expert_tp)
        self.lora_B.tensor_model_parallel = kind == "column"
        self.lora_A.tensor_model_parallel = kind == "row"
        (self.lora_B if kind == "column" else self.lora_A).partition_dim = 0 if kind == "column" else 1

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude] if self.dora else [])

    def _b(self) -> torch.Tensor:
        return self.lora_B if self.lora_mask is None else self.lora_B * self.lora_mask

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per local output row (fp32; summed over the TP ranks for a row-parallel layer)."""
        w = self.base.weight.float() + self.scaling * (self._b().float() @ self.lora_A.float())
        sq = (w * w).sum(dim=1)
        if self.kind == "row" and torch.distributed.get_world_size(self.group) > 1:
            torch.distributed.all_reduce(sq, group=self.group)
        return sq.sqrt()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """DoRA's start: m = ||W + s B A|| (||W|| with B zero), so the layer computes what the base does."""
        self.lora_magnitude.copy_(self.weight_norm().to(self.lora_magnitude.dtype))

    def _dora_scale(self) -> torch.Tensor:
        """m / ||W + s B A|| per local row, in fp32 (bf16 would round the scale's distance from 1)."""
        scale = self.lora_magnitude.float() / self.weight_norm().to(self.lora_magnitude.dtype).float()
        return scale if self.dora_rows is None else torch.where(self.dora_rows, scale, torch.ones_like(scale))

    def _sum_over_expert_tp(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=self.group)
        return grad

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout or not self.training:
            return x
        if self.kind == "column" and not self.sequence_parallel:
            return F.dropout(x, self.dropout)  # the same input on every TP rank: the same mask
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name

        tracker = tensor_parallel.get_cuda_rng_tracker()  # each rank holds different elements
        with (tracker.fork(get_expert_parallel_rng_tracker_name()) if self.expert else tracker.fork()):
            return F.dropout(x, self.dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings as m

        a = F.linear(self._dropout(x), self.lora_A)
        g = self.group
        if self.kind == "column":
            if self.sequence_parallel:
                a = m.gather_from_sequence_parallel_region(a, group=g)
            elif not self.expert:
                a = m.copy_to_tensor_model_parallel_region(a, group=g)
            b = self._b()
        else:
            if self.sequence_parallel:
                a = m.reduce_scatter_to_sequence_parallel_region(a, group=g)
            elif not self.expert:  # an expert's partial output is reduced by the dispatcher, as its layer's is
                a = m.reduce_from_tensor_model_parallel_region(a, group=g)
            b = self.lora_B
        return F.linear(a, b) * self.scaling

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        delta = self.delta(x).to(out.dtype)
        if not self.dora:
            return out + delta, bias
        scale = self._dora_scale()
        wx = out - self.base.bias if self.base.bias is not None and not self.base.skip_bias_add else out
        return out + ((scale - 1) * wx.float() + scale * delta.float()).to(out.dtype), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base layer's entries under their own checkpoint keys (a LoRA model loads a plain base
        checkpoint) and the module's local names; the adapters sharded like their layer. A gated fc1
        ([gate; up] on every TP rank) gets megatron's swiglu factory here, as `MLP` gives its weight, so
        checkpoints reshard across TP sizes."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        base = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        lora = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        axis = {"lora_B": 0} if self.kind == "column" else {"lora_A": 1}
        if self.dora:
            lora["lora_magnitude"] = self.lora_magnitude
            if self.kind == "column":
                axis["lora_magnitude"] = 0
        base.update(make_sharded_tensors_for_checkpoint(lora, prefix, axis, sharded_offsets, tp_group=self.group,
                                                        dp_cp_group=metadata["dp_cp_group"]))
        if self.glu:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for k in (prefix + "weight", prefix + "bias", prefix + "lora_B", prefix + "lora_magnitude"):
                if k in base:
                    base[k] = apply_swiglu_sharded_factory(base[k], sharded_offsets, singleton)
        from megatron_soaes.checkpoint.load import ADAPTER_KEY

        return {(k if ADAPTER_KEY in k else prefix + "base." + k[len(prefix):]): v for k, v in base.items()}
