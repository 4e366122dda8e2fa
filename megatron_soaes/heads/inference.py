"""Draft heads at decoding time: the inference engine's KV cache, RoPE and tree masks (a head is a
`Qwen2ForInference` of one layer), with the head's own layer, and logits over the draft vocabulary scattered
into the target's (every other token -inf: never drafted, still verifiable). EAGLE-3's layer attends over
[norm(embedding), norm(hidden)] with the residual on the hidden state; MTP's (megatron-core's
multi-token-prediction layer) projects [norm(embedding), norm(hidden)] to one hidden state and runs an
ordinary decoder layer and a final norm on it.

The hidden state fed with each token is the caller's (`speculative.decode.HeadDrafter`): the fused
target features for tokens the target has verified, the head's own output at the parent node for
drafted ones. The embedding table is the target's (a head has none of its own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_soaes.heads.config import HeadConfig
from megatron_soaes.heads.vocab import ids_from_d2t
from megatron_soaes.inference.model import Linear, Qwen2ForInference, _rms_norm, _rotate_half
from megatron_soaes.inference.tp import TensorParallel


class Eagle3ForInference(Qwen2ForInference):
    def __init__(self, hcfg: HeadConfig, weights: dict, embed: torch.Tensor, dtype=torch.float32, device="cpu",
                 packed: bool = True):
        """`weights`: the EAGLE-3 state dict (`heads.layout`); `embed`: the target's token embeddings."""
        cfg = hcfg.layer_config()
        self.hcfg, self.cfg, self.dtype, self.device = hcfg, cfg, dtype, torch.device(device)
        self.tp = TensorParallel()
        self.static_shapes, self.cuda_graphs, self._cache_pool = False, False, {}
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.feature_layers = ()

        def w(name):
            return weights[name].to(device=self.device, dtype=dtype)

        self.embed = embed.to(device=self.device, dtype=dtype)
        a, m = self._load(w, packed)
        self.qkv = Linear(torch.cat([w(a + f"{x}_proj.weight") for x in "qkv"]), pack=packed)
        self.o = Linear(w(a + "o_proj.weight"), pack=packed)
        self.gate_up = Linear(torch.cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")]), pack=packed)
        self.down = Linear(w(m + "down_proj.weight"), pack=packed)
        self.lm_head = Linear(w("lm_head.weight"), pack=packed)
        self.draft_ids = ids_from_d2t(weights["d2t"]).to(self.device)
        self.inv_freq = cfg.rope_inv_freq(self.device).double()
        self._rope = torch.empty(0, 2, cfg.head_dim, dtype=dtype, device=self.device)
        self.hidden_in: torch.Tensor | None = None  # [B, n, d]: set before each forward
        self.hidden_out: torch.Tensor | None = None  # [B, n, d]: the pre-norm outputs of the last forward

    def _load(self, w, packed: bool) -> tuple[str, str]:
        """This kind's own weights; returns the prefixes of its layer's attention and MLP weights."""
        self.fc = Linear(w("fc.weight"), pack=packed)
        self.embed_norm, self.hidden_norm = w("midlayer.input_layernorm.weight"), w("midlayer.hidden_norm.weight")
        self.post_norm, self.norm = w("midlayer.post_attention_layernorm.weight"), w("norm.weight")
        return "midlayer.self_attn.", "midlayer.mlp."

    @property
    def vocab_size(self) -> int:
        return self.hcfg.target_config.vocab_size

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.to(self.dtype))

    def _normed_pair(self, tokens, hidden) -> torch.Tensor:
        """[norm(embedding), norm(hidden)]: what both kinds read (EAGLE-3's attention, MTP's eh_proj)."""
        eps = self.cfg.rms_norm_eps
        return torch.cat([_rms_norm(F.embedding(tokens, self.embed), self.embed_norm, eps),
                          _rms_norm(hidden, self.hidden_norm, eps)], -1)

    def _inputs(self, tokens, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """(the attention's input, the residual stream) of the layer."""
        return self._normed_pair(tokens, hidden), hidden

    def _outputs(self, h) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hidden state the next drafting step is fed, the output layer's input)."""
        return h, _rms_norm(h, self.norm, self.cfg.rms_norm_eps)

    def _weights(self):
        return iter(())

    def _forward(self, tokens, positions, k_cache, v_cache, lengths, end: int, block_mask, write_offset: int):
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        B, n = tokens.shape
        W = write_offset + n
        hidden, self.hidden_in = self.hidden_in, None
        if hidden is None or hidden.shape[:2] != (B, n):
            raise RuntimeError("Eagle3ForInference: set hidden_in [B, n, d] for the tokens before each forward")
        mask = self._attention_mask(lengths, block_mask, n, W, end)
        slots = lengths[:, None] + write_offset + torch.arange(n, device=self.device)
        cs = self._rope_table(int(positions.max()) + 1)[positions]
        cos, sin = cs[:, None, :, 0], cs[:, None, :, 1]
        H, Hkv, d = self.heads, self.kv_heads, cfg.head_dim
        x, hidden = self._inputs(tokens, hidden)
        qkv = self.qkv(x).view(B, n, H + 2 * Hkv, d).transpose(1, 2)
        qk = qkv[:, :H + Hkv]
        qk = qk * cos + _rotate_half(qk) * sin
        idx = slots[:, None, :, None].expand(B, Hkv, n, d)
        k_cache[0].scatter_(2, idx, qk[:, H:])
        v_cache[0].scatter_(2, idx, qkv[:, H + Hkv:])
        att = F.scaled_dot_product_attention(qk[:, :H], k_cache[0][:, :, :end], v_cache[0][:, :, :end],
                                             attn_mask=mask, enable_gqa=H != Hkv)
        h = hidden + self.o(att.transpose(1, 2).reshape(B, n, H * d))
        gate, up = self.gate_up(_rms_norm(h, self.post_norm, eps)).chunk(2, dim=-1)
        h = h + self.down(F.silu(gate) * up)
        self.hidden_out, out = self._outputs(h)
        small = self.lm_head(out).float()
        logits = small.new_full((B, n, self.vocab_size), float("-inf"))
        logits[..., self.draft_ids] = small
        return logits


class MTPForInference(Eagle3ForInference):
    """megatron-core's MTP layer (`heads.megatron.MTPHead`): hidden_in is the target's final normed hidden
    state (or the layer's own normed output, deeper in a draft), hidden_out the layer's normed output."""

    def _load(self, w, packed: bool) -> tuple[str, str]:
        self.eh_proj = Linear(w("eh_proj.weight"), pack=packed)
        self.embed_norm, self.hidden_norm = w("enorm.weight"), w("hnorm.weight")
        self.in_norm, self.post_norm = w("layer.input_layernorm.weight"), w("layer.post_attention_layernorm.weight")
        self.norm = w("norm.weight")
        return "layer.self_attn.", "layer.mlp."

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.dtype)

    def _inputs(self, tokens, hidden):
        z = self.eh_proj(self._normed_pair(tokens, hidden))
        return _rms_norm(z, self.in_norm, self.cfg.rms_norm_eps), z

    def _outputs(self, h):
        out = _rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        return out, out


HEAD_CLASSES = {"eagle3": Eagle3ForInference, "mtp": MTPForInference}


def load_head_weights(path) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, EAGLE-3 state dict) from a head's torch_dist checkpoint (a run directory, `checkpoints/` or one
    checkpoint) or from an exported EAGLE-3 directory (`heads.export`)."""
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.meta import META_FILE, read_meta

    path = resolve_checkpoint(path)
    if (path / META_FILE).exists():
        from megatron_soaes.checkpoint.dcp_io import DcpReader
        from megatron_soaes.checkpoint.manifest import verify
        from megatron_soaes.heads.layout import megatron_to_eagle

        meta = read_meta(path)
        if "draft_head" not in meta:
            raise ValueError(f"{path}: not a draft-head checkpoint (its meta has no draft_head record)")
        verify(path)
        hcfg, reader = HeadConfig.from_dict(meta["draft_head"]), DcpReader(path)
        return hcfg, megatron_to_eagle(hcfg, reader.read)
    from megatron_soaes.heads.export import read_eagle3

    return read_eagle3(path)


def load_head(path, target: Qwen2ForInference, dtype=None, device=None) -> Eagle3ForInference:
    """The head at `path` for `target` (whose embeddings it shares), checked against it."""
    hcfg, weights = load_head_weights(path)
    check_head(hcfg, target.cfg, path)
    return HEAD_CLASSES[hcfg.kind](hcfg, weights, target.embed, dtype or target.dtype, device or target.device)


def check_head(hcfg: HeadConfig, target_cfg, where) -> None:
    t = hcfg.target_config
    for field in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads"):
        if getattr(t, field) != getattr(target_cfg, field):
            raise ValueError(f"{where}: the head was trained for a target with {field} {getattr(t, field)}, "
                             f"this target has {getattr(target_cfg, field)}")


def is_head(path) -> bool:
    """Whether `path` holds a draft head (checkpoint or EAGLE-3 export) rather than a draft model."""
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.meta import META_FILE, read_meta

    from megatron_soaes.heads.export import is_eagle3_dir

    p = resolve_checkpoint(path)
    if (p / META_FILE).exists():
        return "draft_head" in read_meta(p)
    return is_eagle3_dir(p)
