"""Qwen2 for inference: plain PyTorch with a per-sequence KV cache and tree attention.

Same `Qwen2Config` and the same checkpoints as the megatron model (HF directories or our torch_dist
checkpoints, mapped by `checkpoint.qwen2_hf`), so there is one architecture description; this file
only adds what decoding needs: a static KV cache with per-sequence lengths, forwards over a block of
new tokens with an arbitrary visibility mask inside the block (token trees), and compaction of the
cache to the accepted path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_soaes.models.qwen2 import Qwen2Config


class KVCache:
    """K/V for every layer, [L, B, Hkv, S, D]; slots [0, lengths[b]) are committed tokens."""

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    def commit(self, keep: torch.Tensor, count: torch.Tensor) -> None:
        """Move block slots ``lengths + keep[b, i]`` (i < count[b]) to ``lengths + i`` and advance.

        keep must be increasing per row (an accepted root-to-node path), so keep[i] >= i and
        gathering before scattering never reads an overwritten slot.
        """
        B, K = keep.shape
        i = torch.arange(K, device=keep.device).expand(B, K)
        valid = i < count[:, None]
        dst = self.lengths[:, None] + i
        src = torch.where(valid, self.lengths[:, None] + keep.clamp(min=0), dst)
        L, _, H, _, D = self.k.shape
        idx = src[None, :, None, :, None].expand(L, B, H, K, D)
        didx = dst[None, :, None, :, None].expand(L, B, H, K, D)
        for t in (self.k, self.v):
            t.scatter_(3, didx, t.gather(3, idx))
        self.lengths += count


def _rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Qwen2ForInference:
    def __init__(self, cfg: Qwen2Config, weights: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else w["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(dict(
                ln1=w[p + "input_layernorm.weight"], ln2=w[p + "post_attention_layernorm.weight"],
                qkv=torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]),
                qkv_b=torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]]),
                o=w[a + "o_proj.weight"],
                gate_up=torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                down=w[p + "mlp.down_proj.weight"]))
        d = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=self.device) / d))

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, tokens, positions, cache: KVCache, block_mask=None, write_offset: int = 0):
        """Logits [B, n, V] for `tokens` [B, n] at `positions`, writing their K/V at block slots
        ``cache.lengths + write_offset + j`` (lengths are not advanced: see `KVCache.commit`).

        Keys visible to new token j of sequence b: every committed slot, plus block slots
        (offset < write_offset + n) where ``block_mask[b, j, offset]``; causal inside the block if None.
        """
        cfg = self.cfg
        B, n = tokens.shape
        W = write_offset + n
        end = int(cache.lengths.max()) + W
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} tokens is too small (needs {end})")
        if block_mask is None:
            block_mask = torch.arange(W, device=self.device)[None, :] <= (write_offset + torch.arange(n, device=self.device))[:, None]
            block_mask = block_mask.expand(B, n, W)
        s = torch.arange(end, device=self.device)
        rel = s[None, :] - cache.lengths[:, None]  # [B, end] block offset of each key slot
        in_block = (rel >= 0) & (rel < W)
        visible = torch.gather(block_mask, 2, rel.clamp(0, W - 1)[:, None, :].expand(B, n, end)) & in_block[:, None, :]
        mask = (visible | (rel < 0)[:, None, :])[:, None]  # [B, 1, n, end]
        slots = cache.lengths[:, None] + write_offset + torch.arange(n, device=self.device)

        ang = positions.to(torch.float64)[..., None] * self.inv_freq  # [B, n, d/2]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(self.dtype)[:, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(self.dtype)[:, None]
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = F.embedding(tokens, self.embed)
        for li, L in enumerate(self.layers):
            h = _rms_norm(x, L["ln1"], cfg.rms_norm_eps)
            qkv = F.linear(h, L["qkv"], L["qkv_b"])
            q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
            q = q.view(B, n, H, d).transpose(1, 2)
            k = k.view(B, n, Hkv, d).transpose(1, 2)
            v = v.view(B, n, Hkv, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            idx = slots[:, None, :, None].expand(B, Hkv, n, d)
            cache.k[li].scatter_(2, idx, k)
            cache.v[li].scatter_(2, idx, v)
            att = F.scaled_dot_product_attention(q, cache.k[li][:, :, :end], cache.v[li][:, :, :end], attn_mask=mask,
                                                 enable_gqa=H != Hkv)
            x = x + F.linear(att.transpose(1, 2).reshape(B, n, H * d), L["o"])
            h = _rms_norm(x, L["ln2"], cfg.rms_norm_eps)
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        x = _rms_norm(x, self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()


def load_weights(path: str | Path) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """HF-named tensors from an HF safetensors directory or a megatron-soaes torch_dist checkpoint."""
    from megatron_soaes.checkpoint import qwen2_hf
    from megatron_soaes.checkpoint.meta import META_FILE, read_model_config

    path = Path(path)
    if (path / META_FILE).exists():
        from megatron_soaes.checkpoint.dcp_io import DcpReader

        cfg = read_model_config(path)
        reader = DcpReader(path)
        weights = qwen2_hf.megatron_to_hf_global(cfg, reader.read)
        for i in range(cfg.num_layers):
            weights.update(qwen2_hf.megatron_to_hf_layer(cfg, reader.read, i))
        return cfg, weights
    from megatron_soaes.checkpoint.convert import HFCheckpoint

    cfg = Qwen2Config.from_hf(path)
    ckpt = HFCheckpoint(path)
    ckpt.validate(cfg)
    return cfg, {name: ckpt.get(name) for name in qwen2_hf.hf_tensor_shapes(cfg)}


def load_inference_model(path, dtype=torch.float32, device="cpu") -> Qwen2ForInference:
    cfg, weights = load_weights(path)
    return Qwen2ForInference(cfg, weights, dtype, device)
