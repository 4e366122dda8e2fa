"""Tensor-name and layout mapping between HF ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` and
megatron-core GPTModel (Qwen3: no q/k/v bias, ``q_norm``/``k_norm`` = megatron's ``q_layernorm``/``k_layernorm``).

Megatron keys are the *sharded* (checkpoint) keys: per-layer tensors are stacked on a leading
layer axis, input norms live under ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``,
QKV rows are grouped per query group ``[q_g0 | k_g0 | v_g0 | q_g1 | ...]`` and ``linear_fc1`` is
``[gate ; up]``. Each entry also says how megatron splits the tensor across TP ranks so the writer
can emit exactly the chunks a TP run would save.

MoE models (Qwen3-MoE) mix dense and sparse layers, so megatron keys every layer's tensors by its index
(``decoder.layers.{i}.``, no layer axis); a sparse layer has ``mlp.router.weight`` [E, H] and the experts
as ``mlp.experts.experts.linear_fc1.weight`` [E, 2I, H] / ``linear_fc2.weight`` [E, H, I] with a leading
global-expert axis (what an expert-parallel run saves: any EP size reads it back). On the HF side the hub's
per-expert tensors (``mlp.experts.{e}.gate_proj.weight`` ...) and transformers 5's fused ones
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) are both read; the hub's are
written (what transformers, vLLM and SGLang load).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    experts: int = 0  # a leading global-expert axis of this size (`shape` is one expert's)

    def global_shape(self, num_layers: int) -> tuple:
        return ((num_layers,) if self.stacked else ()) + ((self.experts,) if self.experts else ()) + tuple(self.shape)


class PerExpert:
    """One expert tensor of a layer, produced expert by expert (a 235B layer's experts are ~5 GB)."""

    def __init__(self, n: int, get):
        self.n, self.get = n, get


def _layer_tensors(cfg: Qwen2Config, sparse: bool) -> list[MTensor]:
    """One layer's tensors, named relative to the layer."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = (nh + 2 * ng) * d
    out = [
        MTensor("self_attention.linear_qkv.layer_norm_weight", (h,), True, None),
        MTensor("self_attention.linear_qkv.weight", (qkv, h), True, 0),
        *([MTensor("self_attention.linear_qkv.bias", (qkv,), True, 0)] if cfg.attention_bias else []),
        *([MTensor("self_attention.q_layernorm.weight", (d,), True, None),
           MTensor("self_attention.k_layernorm.weight", (d,), True, None)] if cfg.qk_norm else []),
        MTensor("self_attention.linear_proj.weight", (h, nh * d), True, 1),
        MTensor("mlp.linear_fc1.layer_norm_weight", (h,), True, None),
    ]
    if sparse:
        e, fe = cfg.num_experts, cfg.moe_intermediate_size
        return out + [MTensor("mlp.router.weight", (e, h), True, None),
                      MTensor("mlp.experts.experts.linear_fc1.weight", (2 * fe, h), True, 0, glu=True, experts=e),
                      MTensor("mlp.experts.experts.linear_fc2.weight", (h, fe), True, 1, experts=e)]
    return out + [MTensor("mlp.linear_fc1.weight", (2 * f, h), True, 0, glu=True),
                  MTensor("mlp.linear_fc2.weight", (h, f), True, 1)]


def layer_key(cfg: Qwen2Config, name: str, i: int) -> str:
    """The checkpoint key of layer i's tensor `name`: stacked (dense) or the layer's own (MoE)."""
    return f"{L}{i}.{name}" if cfg.is_moe else L + name


def megatron_tensors(cfg: Qwen2Config) -> list[MTensor]:
    h, vp = cfg.hidden_size, cfg.padded_vocab_size
    out = [MTensor("embedding.word_embeddings.weight", (vp, h), False, 0)]
    if cfg.is_moe:  # non-homogeneous layers: each keyed by its index, no layer axis
        out += [replace(t, key=layer_key(cfg, t.key, i), stacked=False)
                for i, sparse in enumerate(cfg.moe_layers()) for t in _layer_tensors(cfg, sparse)]
    else:
        out += [replace(t, key=L + t.key) for t in _layer_tensors(cfg, False)]
    out.append(MTensor("decoder.final_layernorm.weight", (h,), False, None))
    if not cfg.tie_word_embeddings:
        out.append(MTensor("output_layer.weight", (vp, h), False, 0))
    return out


def hf_expert_names(cfg: Qwen2Config, i: int, fused: bool = False) -> dict[str, tuple]:
    """Layer i's HF expert tensors and shapes: the hub's per-expert layout, or transformers 5's fused one."""
    p, h, fe, e = f"model.layers.{i}.mlp.", cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    if fused:
        return {p + "experts.gate_up_proj": (e, 2 * fe, h), p + "experts.down_proj": (e, h, fe)}
    out = {}
    for x in range(e):
        out.update({p + f"experts.{x}.gate_proj.weight": (fe, h), p + f"experts.{x}.up_proj.weight": (fe, h),
                    p + f"experts.{x}.down_proj.weight": (h, fe)})
    return out


def hf_tensor_shapes(cfg: Qwen2Config, fused_layers: set[int] = frozenset()) -> dict[str, tuple]:
    """HF tensor names and shapes; the MoE layers in `fused_layers` in transformers 5's fused layout."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    sparse = cfg.moe_layers()
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
        })
        if sparse[i]:
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            shapes.update(hf_expert_names(cfg, i, i in fused_layers))
        else:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
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


def hf_experts(cfg: Qwen2Config, get, i: int, fused: bool) -> tuple[PerExpert, PerExpert]:
    """Layer i's experts from HF tensors as ([gate; up] [2I, H], down [H, I]) per expert: from transformers 5's
    fused tensors (each read once) or the hub's per-expert ones."""
    m, n = f"model.layers.{i}.mlp.experts.", cfg.num_experts
    if fused:
        gate_up, down = get(m + "gate_up_proj"), get(m + "down_proj")
        return PerExpert(n, gate_up.__getitem__), PerExpert(n, down.__getitem__)
    return (PerExpert(n, lambda e: torch.cat([get(f"{m}{e}.gate_proj.weight"), get(f"{m}{e}.up_proj.weight")])),
            PerExpert(n, lambda e: get(f"{m}{e}.down_proj.weight")))


def hf_to_megatron_layer(cfg: Qwen2Config, get, i: int, fused: bool = False) -> dict:
    """Layer i's megatron tensors (keys as `megatron_tensors` names them); expert tensors as `PerExpert`.
    `fused`: this layer's HF experts are in transformers 5's fused layout."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out = {
        "self_attention.linear_qkv.layer_norm_weight": get(p + "input_layernorm.weight"),
        "self_attention.linear_qkv.weight": _group_qkv(
            cfg, get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")),
        "self_attention.linear_proj.weight": get(a + "o_proj.weight"),
        "mlp.linear_fc1.layer_norm_weight": get(p + "post_attention_layernorm.weight"),
    }
    m = p + "mlp."
    if cfg.moe_layers()[i]:
        out["mlp.router.weight"] = get(m + "gate.weight")
        out["mlp.experts.experts.linear_fc1.weight"], out["mlp.experts.experts.linear_fc2.weight"] = \
            hf_experts(cfg, get, i, fused)
    else:
        out["mlp.linear_fc1.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")])
        out["mlp.linear_fc2.weight"] = get(m + "down_proj.weight")
    if cfg.attention_bias:
        out["self_attention.linear_qkv.bias"] = _group_qkv(
            cfg, get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias"))
    if cfg.qk_norm:
        out["self_attention.q_layernorm.weight"] = get(a + "q_norm.weight")
        out["self_attention.k_layernorm.weight"] = get(a + "k_norm.weight")
    return {layer_key(cfg, k, i): v for k, v in out.items()}


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


def megatron_to_hf_layer(cfg: Qwen2Config, read, i: int) -> dict[str, torch.Tensor]:
    """`read(megatron_key, index)` returns entry `index` of a tensor's leading axis (None: the whole tensor)."""
    def get(name, expert=None):
        if cfg.is_moe:  # the layer's own keys; experts by their leading axis
            return read(layer_key(cfg, name, i), expert)
        return read(L + name, i)

    p = f"model.layers.{i}."
    a = p + "self_attn."
    q, k, v = _ungroup_qkv(cfg, get("self_attention.linear_qkv.weight"))
    out = {}
    if cfg.attention_bias:
        qb, kb, vb = _ungroup_qkv(cfg, get("self_attention.linear_qkv.bias"))
        out.update({a + "q_proj.bias": qb.clone(), a + "k_proj.bias": kb.clone(), a + "v_proj.bias": vb.clone()})
    if cfg.qk_norm:
        out.update({a + "q_norm.weight": get("self_attention.q_layernorm.weight"),
                    a + "k_norm.weight": get("self_attention.k_layernorm.weight")})
    out |= {
        p + "input_layernorm.weight": get("self_attention.linear_qkv.layer_norm_weight"),
        a + "q_proj.weight": q.clone(), a + "k_proj.weight": k.clone(), a + "v_proj.weight": v.clone(),
        a + "o_proj.weight": get("self_attention.linear_proj.weight"),
        p + "post_attention_layernorm.weight": get("mlp.linear_fc1.layer_norm_weight"),
    }
    m = p + "mlp."
    if cfg.moe_layers()[i]:
        out[m + "gate.weight"] = get("mlp.router.weight")
        for e in range(cfg.num_experts):  # expert by expert: the hub's layout
            gate, up = torch.chunk(get("mlp.experts.experts.linear_fc1.weight", e), 2, dim=0)
            out |= {m + f"experts.{e}.gate_proj.weight": gate.clone(), m + f"experts.{e}.up_proj.weight": up.clone(),
                    m + f"experts.{e}.down_proj.weight": get("mlp.experts.experts.linear_fc2.weight", e)}
    else:
        gate, up = torch.chunk(get("mlp.linear_fc1.weight"), 2, dim=0)
        out |= {m + "gate_proj.weight": gate.clone(), m + "up_proj.weight": up.clone(),
                m + "down_proj.weight": get("mlp.linear_fc2.weight")}
    return out


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
