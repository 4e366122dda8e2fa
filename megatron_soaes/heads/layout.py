"""One mapping between a head's megatron names and the layout the inference engine reads, both directions.
For EAGLE-3 that is the layout vLLM and SGLang load (`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`, `t2d`), so a
checkpoint and an export go through the same code; an MTP head's is `enorm`, `hnorm`, `eh_proj`, `layer.*`,
`norm`, `lm_head`, `d2t`, `t2d`."""

from __future__ import annotations

import torch

from megatron_soaes.checkpoint.qwen2_hf import _group_qkv, _ungroup_qkv
from megatron_soaes.heads.config import HeadConfig
from megatron_soaes.heads.vocab import d2t_t2d, ids_from_d2t

# megatron name -> EAGLE-3 name, for the tensors that map one to one
RENAMES = {
    "fc.weight": "fc.weight",
    "layer.input_layernorm.embed_norm.weight": "midlayer.input_layernorm.weight",
    "layer.input_layernorm.hidden_norm.weight": "midlayer.hidden_norm.weight",
    "layer.self_attention.linear_proj.weight": "midlayer.self_attn.o_proj.weight",
    "layer.pre_mlp_layernorm.weight": "midlayer.post_attention_layernorm.weight",
    "layer.mlp.linear_fc2.weight": "midlayer.mlp.down_proj.weight",
    "final_layernorm.weight": "norm.weight",
    "output_layer.weight": "lm_head.weight",
}
QKV, FC1, IDS = "layer.self_attention.linear_qkv.weight", "layer.mlp.linear_fc1.weight", "draft_ids"
MEGATRON_NAMES = (*RENAMES, QKV, FC1, IDS)
_T = "mtp.transformer_layer."
MTP_RENAMES = {
    "mtp.enorm.weight": "enorm.weight",
    "mtp.hnorm.weight": "hnorm.weight",
    "mtp.eh_proj.weight": "eh_proj.weight",
    _T + "input_layernorm.weight": "layer.input_layernorm.weight",
    _T + "self_attention.linear_proj.weight": "layer.self_attn.o_proj.weight",
    _T + "pre_mlp_layernorm.weight": "layer.post_attention_layernorm.weight",
    _T + "mlp.linear_fc2.weight": "layer.mlp.down_proj.weight",
    "mtp.final_layernorm.weight": "norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _names(hcfg: HeadConfig) -> tuple[dict, str, str, str]:
    """(one-to-one renames, megatron QKV, megatron fc1, the inference layer's prefix) of this head kind."""
    if hcfg.kind == "mtp":
        return MTP_RENAMES, _T + "self_attention.linear_qkv.weight", _T + "mlp.linear_fc1.weight", "layer."
    return RENAMES, QKV, FC1, "midlayer."


def megatron_names(hcfg: HeadConfig) -> tuple[str, ...]:
    renames, qkv, fc1, _ = _names(hcfg)
    return (*renames, qkv, fc1, IDS)


def megatron_to_eagle(hcfg: HeadConfig, get) -> dict[str, torch.Tensor]:
    """`get(megatron name)` -> full tensor; returns the head's inference state dict (EAGLE-3's layout for an
    eagle3 head)."""
    renames, qkv, fc1, p = _names(hcfg)
    out = {e: get(m) for m, e in renames.items()}
    q, k, v = _ungroup_qkv(hcfg.layer_config(), get(qkv))
    out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v})
    gate, up = get(fc1).chunk(2, dim=0)
    out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
    out["d2t"], out["t2d"] = d2t_t2d(get(IDS).long(), hcfg.target_config.vocab_size)
    return out


def eagle_to_megatron(hcfg: HeadConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames, qkv, fc1, p = _names(hcfg)
    out = {m: sd[e] for m, e in renames.items()}
    out[qkv] = _group_qkv(hcfg.layer_config(), sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"],
                          sd[p + "self_attn.v_proj.weight"])
    out[fc1] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
    out[IDS] = ids_from_d2t(sd["d2t"])
    return out


def eagle3_shapes(hcfg: HeadConfig) -> dict[str, tuple]:
    """Every tensor of the head's inference layout (but d2t / t2d) and its shape."""
    lc, t = hcfg.layer_config(), hcfg.target_config
    d, f, hd = lc.hidden_size, lc.intermediate_size, lc.head_dim
    q, kv = lc.num_attention_heads * hd, lc.num_key_value_heads * hd
    wide = 1 if hcfg.kind == "mtp" else 2  # EAGLE-3's attention reads [embedding, hidden]; MTP's the projection
    m = "layer." if hcfg.kind == "mtp" else "midlayer."
    out = {m + "self_attn.q_proj.weight": (q, wide * d), m + "self_attn.k_proj.weight": (kv, wide * d),
           m + "self_attn.v_proj.weight": (kv, wide * d), m + "self_attn.o_proj.weight": (d, q),
           m + "mlp.gate_proj.weight": (f, d), m + "mlp.up_proj.weight": (f, d), m + "mlp.down_proj.weight": (d, f),
           "lm_head.weight": (hcfg.draft_vocab_size, d), m + "input_layernorm.weight": (d,),
           m + "post_attention_layernorm.weight": (d,), "norm.weight": (d,)}
    if hcfg.kind == "mtp":
        return {**out, "enorm.weight": (d,), "hnorm.weight": (d,), "eh_proj.weight": (d, 2 * t.hidden_size)}
    return {**out, "fc.weight": (d, 3 * t.hidden_size), m + "hidden_norm.weight": (d,)}


def random_eagle3(hcfg: HeadConfig, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A random head in the EAGLE-3 layout (norms at 1, a random draft vocabulary): lossless decoding and
    export checks need no trained one."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * std for k, s in eagle3_shapes(hcfg).items()}
    V = hcfg.target_config.vocab_size
    ids = torch.randperm(V, generator=g)[:hcfg.draft_vocab_size].sort().values
    sd["d2t"], sd["t2d"] = d2t_t2d(ids, V)
    return sd
