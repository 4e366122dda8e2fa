"""Core attention for megatron's local layer spec on `torch.nn.functional.scaled_dot_product_attention`.

megatron-core's own non-TE core attention (`DotProductAttention`) copies K/V for GQA
(`repeat_interleave`), materialises a [b*np, s, s] score buffer, softmaxes in plain torch and runs
two bmm's; SDPA runs a fused kernel (flash / memory-efficient on CUDA, a fused CPU kernel otherwise)
with the causal mask implicit. Subclassing keeps megatron's per-rank head bookkeeping, softmax
scale and (empty) sharded state dict, so checkpoints are the same with either.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def have_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _flex(cuda: bool):
    """flex_attention, compiled for CUDA tensors (eager flex is a reference implementation that
    materialises the scores: fine for CPU tests, not for speed)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if cuda:
        return torch.compile(flex_attention, dynamic=False)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # deliberate on CPU
    return flex_attention


class DocumentMask:
    """Packed rows' attention as the model's `attention_mask`: causal inside each example of a row, no
    attention across examples (segment ids [b, s]; padding is its own segment, as in the dense mask).
    `SDPAttention` runs it through FlexAttention with a block-sparse mask built once per forward and
    shared by every layer: no [b, heads, s, s] scores at any micro-batch size, and no Transformer
    Engine (on CUDA the block mask is built compiled, without a dense [s, s] intermediate)."""

    def __init__(self, segment_ids: torch.Tensor):
        self.segment_ids = segment_ids
        self._block = None

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            seg = self.segment_ids
            b, s = seg.shape

            def same_example_causal(bi, h, q, kv):
                return (seg[bi, q] == seg[bi, kv]) & (q >= kv)

            self._block = create_block_mask(same_example_causal, b, None, s, s, device=seg.device,
                                            _compile=seg.is_cuda)
        return self._block


class SDPAttention(DotProductAttention):
    """megatron's core attention on SDPA / FlexAttention, with context parallelism
    (`models.context_parallel`: K and V all-gathered over the CP group, masked by global position)."""

    def __init__(self, config, *args, **kwargs):
        from megatron_soaes.models.context_parallel import cp_group_and_rank

        cp = config.context_parallel_size
        config.context_parallel_size = 1  # megatron's local attention refuses CP when built; this one handles it
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp
        self.cp_group, self.cp_size, self.cp_rank = cp_group_and_rank()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np*hn].

        `attention_mask` follows megatron: bool, True where attention is NOT allowed, broadcastable to
        [b, np, sq, sk]; None means causal (or none, for a padding-free non-causal mask type); a
        `DocumentMask` runs packed rows through FlexAttention."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed THD sequences: use the block-causal attention_mask with SDPA")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        if self.config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type {self.config.softmax_type} is not supported by SDPAttention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        dropout = self.attention_dropout.p if self.training else 0.0
        if self.cp_size > 1:
            out = self._context_parallel(q, k, v, attention_mask, mask_type, groups, dropout)
        elif isinstance(attention_mask, DocumentMask):
            if dropout:
                raise NotImplementedError("attention dropout with FlexAttention (packed rows)")
            out = _flex(q.is_cuda)(q, k, v, block_mask=attention_mask.block_mask(), scale=self.softmax_scale,
                                   enable_gqa=groups > 1)
        elif attention_mask is None:
            # causal without a materialised mask; GQA without copying K/V (the fused kernels support it)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale,
                                                 is_causal=mask_type == AttnMaskType.causal and q.shape[2] > 1,
                                                 enable_gqa=groups > 1)
        else:
            # with an explicit mask, enable_gqa would select the O(s^2) math kernel: expand K/V instead
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _context_parallel(self, q, k, v, attention_mask, mask_type, groups, dropout):
        """Local queries (this rank's two chunks) against the whole sequence's keys and values: through
        FlexAttention on CUDA (a block mask, GQA without copies), else SDPA with an explicit mask."""
        from megatron_soaes.models.context_parallel import cp_mask, gather_sequence

        if mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"context parallelism in SDPAttention: {mask_type} masks (causal only)")
        if attention_mask is not None and not isinstance(attention_mask, DocumentMask):
            raise NotImplementedError("context parallelism in SDPAttention: pass packed rows as a DocumentMask "
                                      "(segment ids), not a dense mask of this rank's chunks")
        k, v = (gather_sequence(t, self.cp_group, self.cp_size, self.cp_rank) for t in (k, v))
        flex = q.is_cuda and have_flex_attention()
        mask = cp_mask(attention_mask, q.shape[2], self.cp_size, self.cp_rank, self.cp_group, q.device, flex)
        if flex:
            if dropout:
                raise NotImplementedError("attention dropout with FlexAttention (context parallelism on CUDA)")
            return _flex(True)(q, k, v, block_mask=mask, scale=self.softmax_scale, enable_gqa=groups > 1)
        if groups > 1:  # with an explicit mask, enable_gqa would select the O(s^2) math kernel
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale)
