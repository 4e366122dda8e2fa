"""Vocabulary-parallel primitives over megatron-core's TP-split logits (each rank holds a contiguous slice
of the padded vocabulary): the padding masked out, and the argmax over the whole vocabulary. Shared by the
plain-text evaluation (next-token accuracy) and distillation (agreement with the teacher)."""

from __future__ import annotations

import torch

_MASKED = -1e9  # finite: exp() underflows to exactly 0 and 0 * (finite) stays 0 in the backward pass


def tp_info():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def mask_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Megatron pads the vocabulary; padded entries get no probability mass."""
    if vocab_size is None:
        return logits
    _, _, rank = tp_info()
    local = logits.shape[-1]
    ids = torch.arange(rank * local, (rank + 1) * local, device=logits.device)
    if int(ids[-1]) < vocab_size:
        return logits
    return logits.masked_fill(ids >= vocab_size, _MASKED)


def vp_argmax(logits: torch.Tensor) -> torch.Tensor:
    group, size, rank = tp_info()
    v, i = logits.float().max(-1)
    i = i + rank * logits.shape[-1]
    if size == 1:
        return i
    vs, is_ = [torch.empty_like(v) for _ in range(size)], [torch.empty_like(i) for _ in range(size)]
    torch.distributed.all_gather(vs, v.contiguous(), group=group)
    torch.distributed.all_gather(is_, i.contiguous(), group=group)
    best = torch.stack(vs, -1).argmax(-1, keepdim=True)  # first max wins, as in a full-vocab argmax
    return torch.stack(is_, -1).gather(-1, best)[..., 0]
