"""Activation memory per GPU from the model's shapes: what sequence length and context parallelism cost.

Korthikanti et al. (2022)'s per-layer count, for this project's layers -- pre-norm, GQA attention through
a fused kernel (no [s, s] scores kept), SwiGLU MLP, no dropout, sequence parallelism with TP -- in bf16
(2 bytes), without activation recomputation. Per layer and per local token (s = S / CP):

  norms' inputs 2h, QKV and MLP inputs 2h (the SP shards; the gathered copies are redone in backward),
  Q, K, V 2(a + 2g)d, attention output 2ad, MLP up and gate 4f, SwiGLU output 2f   -- all / TP

plus, under context parallelism, the all-gathered K and V of the whole sequence, 4gd / TP per token of S
(the price of all-gather CP: it grows with S, not S / CP). The last stage adds fp32 logits, 4V / TP per
local token. With 1F1B the first pipeline stage holds PP micro-batches of L / PP layers: L layers' worth.
An estimate for choosing layouts; allocator slack and framework buffers come on top."""

from __future__ import annotations

BYTES = 2  # bf16 activations


def activation_bytes(cfg, seq_length: int, cp: int = 1, tp: int = 1, micro_batch: int = 1) -> float:
    """Peak activation bytes on one GPU (first pipeline stage, 1F1B) for `cfg` (a Qwen2Config)."""
    h, a, g = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d, f, n_layers = cfg.head_dim, cfg.intermediate_size, cfg.num_layers
    s = seq_length / cp
    local = s * BYTES * (4 * h + (a + 2 * g) * d + a * d + 3 * f) / tp
    gathered = seq_length * BYTES * 2 * g * d / tp if cp > 1 else 0.0
    logits = s * 4 * cfg.vocab_size / tp
    return micro_batch * (n_layers * (local + gathered) + logits)
