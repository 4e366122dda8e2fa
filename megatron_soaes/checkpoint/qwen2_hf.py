"""Tensor-name and layout mapping between HF ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` and
megatron-core GPTModel (Qwen3: no q/k/v bias, ``q_norm``/``k_norm`` = megatron's ``q_layernorm``/``k_layernorm``).

Megatron keys are the *sharded* (checkpoint) keys: per-layer tensors are stacked on a leading
layer axis, input norms live under ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``,
QKV rows are grouped per query group ``[q_g0 | k_g0 | v_g0 | q_g1 | ...]`` and ``linear_fc1`` is
``[gate ; up]``. Each entry also says how megatron splits the tensor across TP ranks so the writer
can emit exactly the chunks a TP run would save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_soaes.models.config import Qwen2Config

L = "decoder.layers."


@dataclass(frozen=True)
class MTensor:
    key: str
    shape: tuple  # per layer for stacked tensors
    stacked: bool
    tp_dim: int | None  # dim split across TP ranks (None: replicated)
    glu: bool = False  # [gate; up]: each half split separately


def megatron_tensors(cfg: Qwen2Config) -> list[MTensor]:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, ng, vp = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.padded_vocab_size
    qkv = (nh + 2 * ng) * d
    out = [
        MTensor("embedding.word_embeddings.weight", (vp, h), False, 0),
        MTensor(L + "self_attention.linear_qkv.layer_norm_weight", (h,), True, None),
        MTensor(L + "self_attention.linear_qkv.weight", (qkv, h), True, 0),
        *([MTensor(L + "self_attention.linear_qkv.bias", (qkv,), True, 0)] if cfg.attention_bias else []),
        *([MTensor(L + "self_attention.q_layernorm.weight", (d,), True, None),
           MTensor(L + "self_attention.k_layernorm.weight", (d,), True, None)] if cfg.qk_norm else []),
        MTensor(L + "self_attention.linear_proj.weight", (h, nh * d), True, 1),
        MTensor(L + "mlp.linear_fc1.layer_norm_weight", (h,), True, None),
        MTensor(L + "mlp.linear_fc1.weight", (2 * f, h), True, 0, glu=True),
        MTensor(L + "mlp.linear_fc2.weight", (h, f), True, 1),
        MTensor("decoder.final_layernorm.weight", (h,), False, None),
    ]
    if not cfg.tie_word_embeddings:
        out.append(MTensor("output_layer.weight", (vp, h), False, 0))
    return out


def hf_tensor_shapes(cfg: Qwen2Config) -> dict[str, tuple]:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, ng, v = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * d, h),
            p + "self_attn.k_proj.weight": (ng * d, h),
            p + "self_attn.v_proj.weight": (ng * d, h),
            p + "self_attn.o_proj.weight": (h, nh * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (ng * d,),
                           p + "self_attn.v_proj.bias": (ng * d,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _pad_vocab(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _group_qkv(cfg, q, k, v):
    ng, d = cfg.num_key_value_heads, cfg.head_dim
    rest = q.shape[1:]
    q = q.reshape(ng, -1, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _ungroup_qkv(cfg, qkv):
    ng, d = cfg.num_key_value_heads, cfg.head_dim
    hpg = cfg.num_attention_heads // ng
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (hpg + 2) * d, *rest)
    q, k, v = torch.split(g, [hpg * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron_global(cfg: Qwen2Config, get) -> dict[str, torch.Tensor]:
    """Non-layer tensors. `get(hf_name)` returns an HF tensor."""
    out = {
        "embedding.word_embeddings.weight": _pad_vocab(get("model.embed_tokens.weight"), cfg.padded_vocab_size),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _pad_vocab(get("lm_head.weight"), cfg.padded_vocab_size)
    return out


def hf_to_megatron_layer(cfg: Qwen2Config, get, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out = {
        L + "self_attention.linear_qkv.layer_norm_weight": get(p + "input_layernorm.weight"),
        L + "self_attention.linear_qkv.weight": _group_qkv(
            cfg, get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")),
        L + "self_attention.linear_proj.weight": get(a + "o_proj.weight"),
        L + "mlp.linear_fc1.layer_norm_weight": get(p + "post_attention_layernorm.weight"),
        L + "mlp.linear_fc1.weight": torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        L + "mlp.linear_fc2.weight": get(p + "mlp.down_proj.weight"),
    }
    if cfg.attention_bias:
        out[L + "self_attention.linear_qkv.bias"] = _group_qkv(
            cfg, get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias"))
    if cfg.qk_norm:
        out[L + "self_attention.q_layernorm.weight"] = get(a + "q_norm.weight")
        out[L + "self_attention.k_layernorm.weight"] = get(a + "k_norm.weight")
    return out


def megatron_to_hf_global(cfg: Qwen2Config, get) -> dict[str, torch.Tensor]:
    """Non-layer tensors. `get(megatron_key)` returns the global tensor."""
    v = cfg.vocab_size
    out = {
        "model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:v].clone(),
        "model.norm.weight": get("decoder.final_layernorm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = get("output_layer.weight")[:v].clone()
    return out


def megatron_to_hf_layer(cfg: Qwen2Config, get, i: int) -> dict[str, torch.Tensor]:
    """`get(megatron_key, i)` returns layer i of a stacked tensor."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    q, k, v = _ungroup_qkv(cfg, get(L + "self_attention.linear_qkv.weight", i))
    gate, up = torch.chunk(get(L + "mlp.linear_fc1.weight", i), 2, dim=0)
    out = {}
    if cfg.attention_bias:
        qb, kb, vb = _ungroup_qkv(cfg, get(L + "self_attention.linear_qkv.bias", i))
        out.update({a + "q_proj.bias": qb.clone(), a + "k_proj.bias": kb.clone(), a + "v_proj.bias": vb.clone()})
    if cfg.qk_norm:
        out.update({a + "q_norm.weight": get(L + "self_attention.q_layernorm.weight", i),
                    a + "k_norm.weight": get(L + "self_attention.k_layernorm.weight", i)})
    return out | {
        p + "input_layernorm.weight": get(L + "self_attention.linear_qkv.layer_norm_weight", i),
        a + "q_proj.weight": q.clone(), a + "k_proj.weight": k.clone(), a + "v_proj.weight": v.clone(),
        a + "o_proj.weight": get(L + "self_attention.linear_proj.weight", i),
        p + "post_attention_layernorm.weight": get(L + "mlp.linear_fc1.layer_norm_weight", i),
        p + "mlp.gate_proj.weight": gate.clone(),
        p + "mlp.up_proj.weight": up.clone(),
        p + "mlp.down_proj.weight": get(L + "mlp.linear_fc2.weight", i),
    }


def tp_chunks(t: MTensor, tensor: torch.Tensor, tp: int):
    """Yield (offsets, chunk) as TP rank r would save it (offsets within this tensor, no layer axis)."""
    if t.tp_dim is None or tp == 1:
        yield (0,) * tensor.dim(), tensor
        return
    if t.glu:
        half = tensor.shape[0] // 2
        for part in range(2):
            for r, c in enumerate(torch.chunk(tensor[part * half:(part + 1) * half], tp, dim=0)):
                yield (part * half + r * c.shape[0],) + (0,) * (tensor.dim() - 1), c
        return
    size = tensor.shape[t.tp_dim] // tp
    for r, c in enumerate(torch.chunk(tensor, tp, dim=t.tp_dim)):
        offsets = [0] * tensor.dim()
        offsets[t.tp_dim] = r * size
        yield tuple(offsets), c
