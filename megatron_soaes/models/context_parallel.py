"""Context parallelism for megatron's local layer spec (no Transformer Engine).

megatron-core splits a sequence over the CP group only inside TE's attention; its local
`DotProductAttention` refuses CP. Everything outside attention already works per token: the data side
gives each CP rank chunks r and 2*CP-1-r of every sequence (`data.gpt_data.cp_slice`, load-balanced for
causal masks), megatron's rotary embedding slices its positions the same way, and the trainer sums
losses and token counts over the CP group. What is left is attention, done here by all-gathering K and V
over the CP group (what megatron's TE path calls the `all_gather` CP mode): each rank attends its
local queries to the whole sequence's keys, masked by global positions -- causal across chunks, and
within one packed example when rows are packed (the segment ids are gathered too). The backward of the
gather sums each rank's K/V gradients over the group and keeps the local part.

Why all-gather rather than a ring: one collective per layer, which overlaps nothing but is simple and
exact on gloo and NCCL alike, and K/V are small beside Q under GQA (Qwen2.5-72B: 8 KV heads for 64 query
heads). The cost is K/V for the whole sequence on every rank, which the memory table in the manual counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_group_and_rank():
    """(group, size, rank) of this process's context-parallel group; size 1 without CP."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    size = ps.get_context_parallel_world_size()
    if size == 1:
        return None, 1, 0
    return ps.get_context_parallel_group(), size, ps.get_context_parallel_rank()


def chunk_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of a CP rank's tokens: chunks r and 2*CP-1-r of length local_len / 2."""
    c = local_len // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def gathered_positions(local_len: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of the all-gathered sequence, in gather order (rank 0's chunks, then rank 1's, ...)."""
    return torch.cat([chunk_positions(local_len, cp_size, r, device) for r in range(cp_size)])


def _all_gather_cat(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    """Every CP rank's `x`, concatenated along `dim` in rank order (gather order)."""
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 over the CP group; backward: the summed gradient's local part."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.group, ctx.size, ctx.rank = group, size, rank
        return _all_gather_cat(x, group, size, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=2)[ctx.rank].contiguous(), None, None, None


def gather_sequence(x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
    """[b, heads, s_local, d] -> [b, heads, s_local * CP, d] in gather order (differentiable)."""
    return _GatherSequence.apply(x, group, size, rank)


def gather_segments(segment_ids: torch.Tensor, group, size: int) -> torch.Tensor:
    """[b, s_local] segment ids of every CP rank, in gather order (no gradient)."""
    return _all_gather_cat(segment_ids, group, size, dim=1)


def _segments(attention_mask) -> torch.Tensor | None:
    return getattr(attention_mask, "segment_ids", None)


def cp_mask(attention_mask, local_len: int, cp_size: int, cp_rank: int, group, device, flex: bool):
    """The mask of one context-parallel forward, built once and shared by every layer (the causal one is
    the same for every step; a packed batch's rides on its `DocumentMask`): True where a local query may
    attend a gathered key -- causal by global position, and within its own example when rows are packed.
    `flex`: a FlexAttention block mask (no [s/CP, s] tensor; GPU), else a bool [b or 1, 1, s/CP, s]."""
    key = (local_len, cp_size, cp_rank, str(device), flex)
    cache = getattr(attention_mask, "_cp_masks", None) if attention_mask is not None else _CAUSAL
    if cache is None:
        cache = attention_mask._cp_masks = {}
    if key not in cache:
        cache.clear()  # one layout per process: never more than one entry
        cache[key] = _build(_segments(attention_mask), local_len, cp_size, cp_rank, group, device, flex)
    return cache[key]


_CAUSAL: dict = {}


def _build(segment_ids, local_len, cp_size, cp_rank, group, device, flex):
    q = chunk_positions(local_len, cp_size, cp_rank, device)
    k = gathered_positions(local_len, cp_size, device)
    seg_k = gather_segments(segment_ids, group, cp_size) if segment_ids is not None else None
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        if seg_k is None:
            def allowed(b, h, qi, ki):
                return k[ki] <= q[qi]
        else:
            def allowed(b, h, qi, ki):
                return (k[ki] <= q[qi]) & (segment_ids[b, qi] == seg_k[b, ki])
        batch = None if seg_k is None else segment_ids.shape[0]
        return create_block_mask(allowed, batch, None, local_len, local_len * cp_size, device=device, _compile=True)
    mask = (k[None, :] <= q[:, None])[None, None]
    if seg_k is not None:
        mask = mask & (segment_ids[:, None, :, None] == seg_k[:, None, None, :])
    return mask
