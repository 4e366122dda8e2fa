"""Qwen2 / Qwen3 for inference: plain PyTorch with a per-sequence KV cache and tree attention.

Same `Qwen2Config` and the same checkpoints as the megatron model (HF directories or our torch_dist
checkpoints, mapped by `checkpoint.qwen2_hf`), so there is one architecture description; this file
only adds what decoding needs: a static KV cache with per-sequence lengths, forwards over a block of
new tokens with an arbitrary visibility mask inside the block (token trees), and compaction of the
cache to the accepted path.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_soaes.checkpoint import qwen2_hf
from megatron_soaes.inference.tp import TensorParallel
from megatron_soaes.models.config import Qwen2Config


class KVCache:
    """K/V for every layer, [L, B, Hkv, S, D]; slots [0, lengths[b]) are committed tokens."""

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype, device, kv_heads: int | None = None,
                 buffers: tuple | None = None):
        """buffers: (k, v, lengths) of an earlier cache of this shape to reuse (slots past `lengths` are
        never read, so only the lengths are reset)."""
        if buffers is not None:
            self.k, self.v, self.lengths = buffers
            self.lengths.zero_()
        else:
            shape = (cfg.num_layers, batch, kv_heads or cfg.num_key_value_heads, max_len, cfg.head_dim)
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
    if x.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _packed_linear_works() -> bool:
    try:
        w, x = torch.randn(8, 4), torch.randn(1, 3, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return torch.allclose(y, F.linear(x, w), atol=1e-5)
    except Exception:
        return False


class Linear:
    """y = x W^T + b. On CPU in fp32 the weight is pre-packed once for oneDNN: decoding calls the same
    small-batch GEMMs thousands of times, and re-packing per call (what `F.linear` does) costs 2-4x at
    4-16 rows, which is exactly the size of a verification block. Dense `F.linear` everywhere else."""

    _packed_ok: bool | None = None
    MIN_PACKED = 1 << 18  # smaller weights are faster through F.linear (the oneDNN call costs ~30 us more)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.weight, self.bias = weight, bias
        self.packed = None
        if pack and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= self.MIN_PACKED:
            if Linear._packed_ok is None:
                Linear._packed_ok = _packed_linear_works()
            if Linear._packed_ok:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Qwen2ForInference:
    GRAPH_MAX_BLOCK = 128  # forwards of at most this many block slots are captured (draft steps, trees)
    CACHE_STEP = 256  # static-shape caches are sized in these steps

    def __init__(self, cfg: Qwen2Config, weights, dtype=torch.float32, device="cpu", packed: bool = True,
                 tp: TensorParallel | None = None, static_shapes: bool = False, cuda_graphs: bool = False):
        """`weights`: HF-named tensors (a dict, or a lazy mapping that reads each on access: only this
        rank's slices are kept, so no rank holds the whole model at TP > 1).

        static_shapes: every forward attends over the whole cache under a mask and reads RoPE from a
        table sized at cache creation -- no host sync, one shape per (batch, block) -- which is what
        CUDA graphs need. cuda_graphs: capture each such forward once (torch.compile, mode
        "reduce-overhead") and replay it: a draft step or a tree verification becomes one launch."""
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.tp = tp = tp or TensorParallel()
        tp.check(cfg)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
        if cuda_graphs and tp.size > 1:
            raise ValueError("cuda_graphs with tensor parallelism is not supported yet (run TP eagerly)")
        if cuda_graphs and cfg.is_moe:
            raise ValueError("cuda_graphs with an MoE model is not supported yet (its expert batches are sized on the host)")
        self.static_shapes, self.cuda_graphs = static_shapes or cuda_graphs, cuda_graphs
        # layers whose inputs a forward keeps in `features` (what a draft head reads; index num_layers: the last
        # layer's output after the final norm), and a reduced output vocabulary (`restrict_vocab`)
        self.feature_layers, self.features, self.draft_ids = (), None, None
        self._step, self._cache_pool = self._forward, {}
        self.heads, self.kv_heads = cfg.num_attention_heads // tp.size, cfg.num_key_value_heads // tp.size

        def w(name, shard=None):  # read one tensor, keep this rank's part, cast and place it
            t = weights[name]
            return (shard(t) if shard else t).to(device=self.device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")  # replicated
        self.norm = w("model.norm.weight")
        head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.vocab_rows = head.shape[0]  # logits gathered from the vocab-split head are trimmed to this
        self.lm_head = Linear(tp.vocab_rows(head).to(device=self.device, dtype=dtype), pack=packed)
        self.layers = []
        sparse = cfg.moe_layers()
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv = [w(a + f"{x}_proj.weight", tp.rows) for x in "qkv"]
            bias = torch.cat([w(a + f"{x}_proj.bias", tp.rows) for x in "qkv"]) if cfg.attention_bias else None
            layer = dict(
                ln1=w(p + "input_layernorm.weight"), ln2=w(p + "post_attention_layernorm.weight"),
                q_norm=w(a + "q_norm.weight") if cfg.qk_norm else None,  # per head, replicated (Qwen3)
                k_norm=w(a + "k_norm.weight") if cfg.qk_norm else None,
                qkv=Linear(torch.cat(qkv), bias, packed),
                o=Linear(w(a + "o_proj.weight", tp.cols), pack=packed))
            if sparse[i]:  # router replicated; each expert's intermediate units split over TP ranks like the dense MLP's
                m = p + "mlp."
                names = weights.names if isinstance(weights, LazyWeights) else weights  # (no read to test a name)
                fc1, fc2 = qwen2_hf.hf_experts(cfg, weights.__getitem__, i, m + "experts.gate_up_proj" in names)
                gate_up = torch.stack([fc1.get(e) for e in range(fc1.n)])
                down = torch.stack([fc2.get(e) for e in range(fc2.n)])
                half = gate_up.shape[1] // 2
                layer.update(router=w(m + "gate.weight"), experts_down=tp.cols(down).contiguous().to(device=self.device, dtype=dtype),
                             experts_gate_up=torch.cat([tp.rows(gate_up[:, :half].transpose(0, 1)),
                                                        tp.rows(gate_up[:, half:].transpose(0, 1))]).transpose(0, 1)
                             .contiguous().to(device=self.device, dtype=dtype))
            else:
                layer.update(
                    gate_up=Linear(torch.cat([w(p + "mlp.gate_proj.weight", tp.rows), w(p + "mlp.up_proj.weight", tp.rows)]),
                                   pack=packed),
                    down=Linear(w(p + "mlp.down_proj.weight", tp.cols), pack=packed))
            self.layers.append(layer)
        d = cfg.head_dim
        self.inv_freq = cfg.rope_inv_freq(self.device).double()  # RoPE, Llama 3 scaling included
        self._rope = torch.empty(0, 2, d, dtype=dtype, device=self.device)  # [pos, cos/sin, d], grown on demand
        if cuda_graphs:  # one graph per (batch, block, cache size): allow the handful a decoder uses
            from torch import _dynamo

            name = "recompile_limit" if hasattr(_dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
            self._step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)
            for t in self._weights():  # fixed addresses: not copied into the graphs' inputs on every replay
                _dynamo.mark_static_address(t)

    def _weights(self):
        yield from (self.embed, self.norm, self.lm_head.weight)
        for layer in self.layers:
            for v in layer.values():
                if isinstance(v, Linear):
                    yield from (t for t in (v.weight, v.bias, v.packed) if t is not None)
                elif v is not None:
                    yield v

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if not self.static_shapes:
            return KVCache(self.cfg, batch, max_len, self.dtype, self.device, kv_heads=self.kv_heads)
        max_len = -(-max_len // self.CACHE_STEP) * self.CACHE_STEP  # sizes in steps: graphs are reused
        self._rope_table(max_len)  # every position a forward can write (slots < max_len), built once
        # captured graphs read the cache at fixed addresses: reuse the buffers of a cache of this shape
        # once its previous owner is gone (a live one, e.g. the same model as target and draft, gets new ones)
        owner, buffers = self._cache_pool.get((batch, max_len), (None, None))
        reuse = buffers is not None and owner() is None
        cache = KVCache(self.cfg, batch, max_len, self.dtype, self.device, kv_heads=self.kv_heads,
                        buffers=buffers if reuse else None)
        if self.cuda_graphs and not reuse:
            for t in (cache.k, cache.v, cache.lengths):
                torch._dynamo.mark_static_address(t)  # imported in __init__ (cuda_graphs)
        self._cache_pool[(batch, max_len)] = (weakref.ref(cache), (cache.k, cache.v, cache.lengths))
        return cache

    def _rope_table(self, n: int) -> torch.Tensor:
        if self._rope.shape[0] < n:
            n = max(n, 2 * self._rope.shape[0], 256)
            ang = torch.arange(n, dtype=torch.float64, device=self.device)[:, None] * self.inv_freq
            ang = torch.cat([ang, ang], -1)
            scale = self.cfg.rope_attention_factor()  # YaRN's attention factor, on cos and sin as transformers does
            self._rope = torch.stack([ang.cos() * scale, ang.sin() * scale], 1).to(self.dtype)
        return self._rope

    def _attention_mask(self, lengths: torch.Tensor, block_mask, n: int, W: int, end: int):
        """[B, 1, n, end] bool, or None when every key is visible (one new token, no ragged batch)."""
        B = lengths.shape[0]
        static = self.static_shapes
        # one new token under a causal block sees every key written so far: no mask (SDPA's fast path),
        # unless rows of a ragged batch end at different slots
        if not static and block_mask is None and n == 1 and (B == 1 or bool((lengths == lengths[0]).all())):
            return None
        if block_mask is None:
            block_mask = torch.arange(W, device=self.device)[None, :] <= (W - n + torch.arange(n, device=self.device))[:, None]
            block_mask = block_mask.expand(B, n, W)
        if B == 1 and not static:  # committed keys, then the block
            L = int(lengths[0])
            return torch.cat([torch.ones(1, n, L, dtype=torch.bool, device=self.device), block_mask], -1)[:, None]
        s = torch.arange(end, device=self.device)
        rel = s[None, :] - lengths[:, None]  # [B, end] block offset of each key slot
        in_block = (rel >= 0) & (rel < W)
        visible = torch.gather(block_mask, 2, rel.clamp(0, W - 1)[:, None, :].expand(B, n, end)) & in_block[:, None, :]
        return (visible | (rel < 0)[:, None, :])[:, None]

    @torch.no_grad()
    def forward(self, tokens, positions, cache: KVCache, block_mask=None, write_offset: int = 0, capture: bool = True):
        """Logits [B, n, V] for `tokens` [B, n] at `positions`, writing their K/V at block slots
        ``cache.lengths + write_offset + j`` (lengths are not advanced: see `KVCache.commit`).

        Keys visible to new token j of sequence b: every committed slot, plus block slots
        (offset < write_offset + n) where ``block_mask[b, j, offset]``; causal inside the block if None.
        capture: with cuda_graphs, replay a captured graph (decode steps, trees); prompts pass False.
        """
        W = write_offset + tokens.shape[1]
        if self.static_shapes:  # sizing is the caller's (speculative decoding's is provable): no host sync
            step = self._step if capture and W <= self.GRAPH_MAX_BLOCK else self._forward
            return step(tokens, positions, cache.k, cache.v, cache.lengths, cache.max_len, block_mask, write_offset)
        end = int(cache.lengths.max()) + W
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} tokens is too small (needs {end})")
        return self._forward(tokens, positions, cache.k, cache.v, cache.lengths, end, block_mask, write_offset)

    def _forward(self, tokens, positions, k_cache, v_cache, lengths, end: int, block_mask, write_offset: int):
        """The forward proper over keys [0, end): the cache as tensors, so it can be captured."""
        cfg = self.cfg
        B, n = tokens.shape
        W = write_offset + n
        mask = self._attention_mask(lengths, block_mask, n, W, end)
        slots = lengths[:, None] + write_offset + torch.arange(n, device=self.device)
        rope = self._rope if self.static_shapes else self._rope_table(int(positions.max()) + 1)
        cs = rope[positions]  # [B, n, 2, d]
        cos, sin = cs[:, None, :, 0], cs[:, None, :, 1]
        H, Hkv, d = self.heads, self.kv_heads, cfg.head_dim  # this rank's heads
        x = F.embedding(tokens, self.embed)
        idx = slots[:, None, :, None].expand(B, Hkv, n, d)
        feats = []
        for li, L in enumerate(self.layers):
            if li in self.feature_layers:
                feats.append(x)
            qkv = L["qkv"](_rms_norm(x, L["ln1"], cfg.rms_norm_eps)).view(B, n, H + 2 * Hkv, d).transpose(1, 2)
            qk = qkv[:, :H + Hkv]
            if L["q_norm"] is not None:  # Qwen3: RMSNorm over each q and k head before RoPE
                qk = torch.cat([_rms_norm(qk[:, :H], L["q_norm"], cfg.rms_norm_eps),
                                _rms_norm(qk[:, H:], L["k_norm"], cfg.rms_norm_eps)], 1)
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k at once
            k_cache[li].scatter_(2, idx, qk[:, H:])
            v_cache[li].scatter_(2, idx, qkv[:, H + Hkv:])
            att = F.scaled_dot_product_attention(qk[:, :H], k_cache[li][:, :, :end], v_cache[li][:, :, :end],
                                                 attn_mask=mask, enable_gqa=H != Hkv)
            x = x + self.tp.all_reduce(L["o"](att.transpose(1, 2).reshape(B, n, H * d)))
            h = _rms_norm(x, L["ln2"], cfg.rms_norm_eps)
            if "router" in L:
                x = x + self.tp.all_reduce(self._experts(L, h))
            else:
                gate, up = L["gate_up"](h).chunk(2, dim=-1)
                x = x + self.tp.all_reduce(L["down"](F.silu(gate) * up))
        final = _rms_norm(x, self.norm, cfg.rms_norm_eps)
        if len(self.layers) in self.feature_layers:  # past the last layer: its output after the final norm (MTP's)
            feats.append(final)
        if feats:
            self.features = torch.cat(feats, -1)
        logits = self.tp.gather_vocab(self.lm_head(final).float(), self.vocab_rows)
        if self.draft_ids is not None:  # a reduced vocabulary: every other token is never drafted
            full = logits.new_full((B, n, cfg.vocab_size), float("-inf"))
            full[..., self.draft_ids] = logits
            return full
        return logits

    def restrict_vocab(self, ids: torch.Tensor) -> None:
        """Score only the target ids `ids` (a draft vocabulary, `heads.vocab`): the output layer keeps their
        rows, so its cost falls with K / V; logits of every other token are -inf."""
        if self.tp.size > 1 or self.cuda_graphs:
            raise ValueError("a reduced draft vocabulary runs eagerly at tensor_parallel 1")
        ids = ids.to(self.device).long()
        weight = self.lm_head.weight[:self.vocab_rows][ids]
        self.lm_head = Linear(weight.contiguous())
        self.draft_ids, self.vocab_rows = ids, len(ids)


    def _experts(self, L, h: torch.Tensor) -> torch.Tensor:
        """A mixture-of-experts MLP (HF Qwen3-MoE's routing: softmax over all experts in fp32, top-k, the k
        weights renormalised with norm_topk_prob), run only for the chosen experts, each on all the tokens
        routed to it at once (a prefill or a verification block is one batch per expert)."""
        cfg = self.cfg
        x = h.reshape(-1, h.shape[-1])
        probs = F.softmax(F.linear(x, L["router"]).float(), dim=-1)
        weight, chosen = probs.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weight = weight / weight.sum(-1, keepdim=True)
        weight = weight.to(x.dtype).reshape(-1)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // cfg.num_experts_per_tok
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(torch.bincount(flat, minlength=cfg.num_experts).tolist()):
            if count:
                rows = token[start:start + count]
                gate, up = F.linear(x[rows], L["experts_gate_up"][e]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, L["experts_down"][e]) * weight[order[start:start + count], None]
                out.index_add_(0, rows, y)
                start += count
        return out.view_as(h)


class LazyWeights(Mapping):
    """HF-named tensors read on access (a torch_dist layer is converted once, when first touched), so a
    tensor-parallel rank keeps only its slices and holds one full tensor at a time."""

    def __init__(self, names, read_global, read_layer):
        self.names, self.read_global, self.read_layer = list(names), read_global, read_layer
        self._global, self._layer = None, (None, {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if self._layer[0] != i:
                self._layer = (i, self.read_layer(i))
            return self._layer[1][name]
        if self._global is None:
            self._global = self.read_global()
        return self._global[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_weights(path: str | Path) -> tuple[Qwen2Config, Mapping[str, torch.Tensor]]:
    """HF-named tensors (read lazily) from an HF safetensors directory or a megatron-soaes torch_dist checkpoint."""
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.meta import META_FILE, model_config_of

    path = resolve_checkpoint(path)  # a run directory, checkpoints/ or its latest too
    cfg = model_config_of(path)
    if (path / META_FILE).exists():
        from megatron_soaes.checkpoint.dcp_io import DcpReader
        from megatron_soaes.checkpoint.manifest import verify

        verify(path)
        reader = DcpReader(path)
        return cfg, LazyWeights(qwen2_hf.hf_tensor_shapes(cfg), lambda: qwen2_hf.megatron_to_hf_global(cfg, reader.read),
                                lambda i: qwen2_hf.megatron_to_hf_layer(cfg, reader.read, i))
    from megatron_soaes.checkpoint.convert import HFCheckpoint

    ckpt = HFCheckpoint(path)
    ckpt.validate(cfg)
    names = list(qwen2_hf.hf_tensor_shapes(cfg, ckpt.fused_layers(cfg)))
    return cfg, LazyWeights(names, lambda: {n: ckpt.get(n) for n in names if not n.startswith("model.layers.")},
                            lambda i: {n: ckpt.get(n) for n in names if n.startswith(f"model.layers.{i}.")})


def load_inference_model(path, dtype=torch.float32, device="cpu", packed: bool = True,
                         tp: TensorParallel | None = None, static_shapes: bool = False,
                         cuda_graphs: bool = False) -> Qwen2ForInference:
    """At TP > 1 (under torchrun), each rank keeps its shard: `tp=TensorParallel.from_env()`."""
    cfg, weights = load_weights(path)
    return Qwen2ForInference(cfg, weights, dtype, device, packed, tp, static_shapes, cuda_graphs)
