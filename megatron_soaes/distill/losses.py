"""Vocab-parallel distillation divergences.

Logits stay sharded over the tensor-parallel group ([..., V/tp] per rank); a full-vocabulary
tensor is never gathered. The per-token sum over the vocabulary is all-reduced forward with an
identity backward (megatron's `reduce_from_tensor_model_parallel_region`: the loss is replicated, each
rank differentiates its own terms); the softmax normaliser, which every rank's terms depend on, is
all-reduced in both directions so each shard sees the whole gradient through it.

All divergences are per token, on temperature-scaled distributions p_t (teacher) and p_s (student):
  forward_kl  KL(p_t || p_s)       reverse_kl  KL(p_s || p_t)
  jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
  tvd         1/2 sum |p_t - p_s|
With `top_k`, both distributions are restricted to the teacher's k most likely tokens and
renormalised there, which is exactly what stored (offline) top-k teacher logits allow.
"""

from __future__ import annotations

import torch

from megatron_soaes.models.vocab_parallel import mask_padding, tp_info as _tp, vp_argmax

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _reduce(x: torch.Tensor) -> torch.Tensor:
    group, size, _ = _tp()
    if size == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x)


def _allreduce_both_ways(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward and backward: for a statistic (the softmax normaliser) that every rank's
    partial loss depends on, each shard's gradient is the sum of all ranks' partial gradients."""
    group, size, _ = _tp()
    if size == 1:
        return x
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        reduce_from_tensor_model_parallel_region)

    return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(x))


def vp_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    group, size, _ = _tp()
    m = logits.detach().float().amax(-1, keepdim=True)
    if size > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    z = logits.float() - m
    return z - _allreduce_both_ways(z.exp().sum(-1, keepdim=True)).log()


def _kl_terms(p, logp, logq):
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def _divergence_terms(kind: str, logp_t, logp_s, beta: float) -> torch.Tensor:
    """Element-wise terms whose sum over the vocabulary is the divergence."""
    p_t, p_s = logp_t.exp(), logp_s.exp()
    if kind == "forward_kl":
        return _kl_terms(p_t, logp_t, logp_s)
    if kind == "reverse_kl":
        return _kl_terms(p_s, logp_s, logp_t)
    if kind == "jsd":
        logm = torch.logaddexp(logp_t + torch.log(torch.tensor(beta)), logp_s + torch.log(torch.tensor(1 - beta)))
        return beta * _kl_terms(p_t, logp_t, logm) + (1 - beta) * _kl_terms(p_s, logp_s, logm)
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs()
    raise ValueError(f"unknown divergence {kind!r}; choose from {DIVERGENCES}")


def teacher_topk(teacher_logits: torch.Tensor, k: int, vocab_size: int | None = None):
    """The teacher's global top-k (values, global indices) from vocab-sharded logits, replicated on TP ranks."""
    group, size, rank = _tp()
    t = mask_padding(teacher_logits.detach().float(), vocab_size)
    local = t.shape[-1]
    v, i = t.topk(min(k, local), dim=-1)
    i = i + rank * local
    if size > 1:
        vs, is_ = [torch.empty_like(v) for _ in range(size)], [torch.empty_like(i) for _ in range(size)]
        torch.distributed.all_gather(vs, v.contiguous(), group=group)
        torch.distributed.all_gather(is_, i.contiguous(), group=group)
        v, i = torch.cat(vs, -1), torch.cat(is_, -1)
        v, sel = v.topk(k, dim=-1)
        i = i.gather(-1, sel)
    return v, i


def gather_student(student_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Student logits at global vocabulary `indices`, replicated; gradients go to the owning shard."""
    _, _, rank = _tp()
    local = student_logits.shape[-1]
    off = indices - rank * local
    mine = (off >= 0) & (off < local)
    vals = student_logits.float().gather(-1, off.clamp(0, local - 1)) * mine
    return _reduce(vals)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, kind: str = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0, vocab_size: int | None = None, top_k: int | None = None,
               teacher_topk_values: torch.Tensor | None = None, teacher_topk_indices: torch.Tensor | None = None):
    """Per-token divergence [...] between teacher and student.

    Either `teacher_logits` (vocab-sharded like the student's) or stored top-k teacher logits
    (`teacher_topk_values`, `teacher_topk_indices`, global ids) with `top_k` <= their k.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose from {DIVERGENCES}")
    T = float(temperature)
    if top_k is None and teacher_topk_values is None:
        logp_t = vp_log_softmax(mask_padding(teacher_logits.detach(), vocab_size) / T)
        logp_s = vp_log_softmax(mask_padding(student_logits, vocab_size) / T)
        return _reduce(_divergence_terms(kind, logp_t, logp_s, beta).sum(-1))
    if teacher_topk_values is None:
        teacher_topk_values, teacher_topk_indices = teacher_topk(teacher_logits, top_k, vocab_size)
    k = top_k or teacher_topk_values.shape[-1]
    tv, ti = teacher_topk_values[..., :k].float(), teacher_topk_indices[..., :k].long()
    sv = gather_student(student_logits, ti)
    logp_t = torch.log_softmax(tv / T, -1)
    logp_s = torch.log_softmax(sv / T, -1)
    return _divergence_terms(kind, logp_t, logp_s, beta).sum(-1)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None):
    """Per-token (1 - TVD, top-1 agreement) between full distributions, vocab-parallel."""
    s = mask_padding(student_logits.detach(), vocab_size)
    t = mask_padding(teacher_logits.detach(), vocab_size)
    tvd = _reduce((0.5 * (vp_log_softmax(t).exp() - vp_log_softmax(s).exp()).abs()).sum(-1))
    top1 = (vp_argmax(s) == vp_argmax(t)).float()
    return 1.0 - tvd, top1
