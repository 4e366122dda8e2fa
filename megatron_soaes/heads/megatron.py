"""Draft heads on megatron-core. EAGLE-3's: one `TransformerLayer` of the local spec (SDPA core attention,
tensor-parallel QKV / output projection and MLP) whose attention reads [norm(embedding), norm(hidden)]
(2 x hidden wide) while its residual stream carries the hidden state, as vLLM's `LlamaForCausalLMEagle3`
computes it; a replicated `fc` fusing the target's three feature layers; a final norm. MTP: megatron-core's
own `MultiTokenPredictionLayer` on the target's final hidden state. Both end in a column-parallel output
layer over the draft vocabulary (logits stay vocab-sharded, like a GPTModel's)."""

from __future__ import annotations

import torch

from megatron_soaes.heads.config import HeadConfig


class Eagle3Input(torch.nn.Module):
    """Stands in for the layer's input norm: the attention input is [norm(embedding), norm(hidden)], the
    residual stays the hidden state. The embedding of the step's tokens is set just before the layer runs."""

    def __init__(self, config, hidden_size: int, eps: float):
        from megatron_soaes.models.megatron import RMSNorm

        super().__init__()
        self.embed_norm = RMSNorm(config, hidden_size, eps)
        self.hidden_norm = RMSNorm(config, hidden_size, eps)
        self.embedding: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        emb, self.embedding = self.embedding, None  # used once: a stale embedding is an error, not a silent reuse
        if emb is None:
            raise RuntimeError("Eagle3Input: the step's token embedding was not set")
        return torch.cat([self.embed_norm(emb), self.hidden_norm(hidden)], -1)


def _module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class _Head(_module_base()):
    """What both head kinds share: the output layer over the draft vocabulary (column-parallel), RoPE, the
    draft ids, and a sharded state of their own names."""

    def __init__(self, hcfg: HeadConfig, tcfg):
        from megatron.core import parallel_state
        from megatron.core.enums import ModelType
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.tensor_parallel import ColumnParallelLinear

        super().__init__(config=tcfg)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask a model
        self.hcfg, lc = hcfg, hcfg.layer_config()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if hcfg.draft_vocab_size % tp:
            raise ValueError(f"draft vocabulary {hcfg.draft_vocab_size} is not divisible by tensor_parallel {tp}")
        self.output_layer = ColumnParallelLinear(lc.hidden_size, hcfg.draft_vocab_size, config=tcfg,
                                                 init_method=tcfg.init_method, bias=False, gather_output=False,
                                                 skip_bias_add=False)
        self.rotary = RotaryEmbedding(kv_channels=lc.head_dim, rotary_percent=1.0, rotary_base=int(lc.rope_theta),
                                      use_cpu_initialization=tcfg.use_cpu_initialization)
        if lc.rope_scaling:
            self.rotary.inv_freq = lc.rope_inv_freq(self.rotary.inv_freq.device)
        # target id of each draft id (increasing); the buffer travels in the checkpoint
        self.register_buffer("draft_ids", torch.arange(hcfg.draft_vocab_size), persistent=True)

    def _one_dtype(self):
        for p in self.parameters():  # the local spec's torch norms start in fp32: one dtype for the optimizer
            if p.dtype != self.config.params_dtype:
                p.data = p.data.to(self.config.params_dtype)

    def set_input_tensor(self, tensor) -> None:
        """megatron's schedules call this for pipeline stages; the head is never split (PP 1)."""

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        return self.rotary(int(positions.max()) + 1)[positions]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron's per-module sharded state; the plain torch pieces (fc, the norms, draft_ids) replicated
        over TP and DP with the groups named (megatron's default would give every TP rank replica 0)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default

        tp, dp = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)
        metadata = {**(metadata or {}), "dp_cp_group": dp}
        sd = {}
        for name, module in self.named_children():
            if name != "rotary":  # no state (its frequencies come from the config)
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp))
        sd.update(make_sharded_tensors_for_checkpoint({"draft_ids": self.draft_ids}, prefix, {}, sharded_offsets,
                                                      tp_group=tp, dp_cp_group=dp))
        return sd


class Eagle3Head(_Head):
    def __init__(self, hcfg: HeadConfig, tcfg):
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer.spec_utils import build_module

        from megatron_soaes.models.megatron import RMSNorm, layer_spec

        super().__init__(hcfg, tcfg)
        lc = hcfg.layer_config()
        d, eps = lc.hidden_size, lc.rms_norm_eps
        self.fc = torch.nn.Linear(3 * hcfg.target_config.hidden_size, d, bias=False, dtype=tcfg.params_dtype)
        spec = layer_spec(use_te=False, attention="sdpa")
        spec.submodules.sharded_state_dict_keys_map = {}  # our own names (no TE fused-norm aliases)
        self.layer = build_module(spec, config=tcfg, layer_number=1)
        self.layer.input_layernorm = Eagle3Input(tcfg, d, eps)
        qkv = self.layer.self_attention.linear_qkv
        self.layer.self_attention.linear_qkv = ColumnParallelLinear(
            2 * d, qkv.output_size, config=tcfg, init_method=tcfg.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv")
        self.final_layernorm = RMSNorm(tcfg, d, eps)
        self._one_dtype()

    @property
    def projection(self):
        """The linear that reads the target's hidden state (its last input columns)."""
        return self.fc

    @property
    def final_norm(self):
        return self.final_layernorm

    @property
    def transformer_layer(self):
        return self.layer

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """[..., 3 x target hidden] (the feature layers' inputs, concatenated) -> [..., hidden]."""
        return self.fc(features)

    def step(self, embedding: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One layer pass over [s, b, d] inputs at `positions` [s] (shared by the batch); `attention_mask`
        [b, 1, s, s] bool, True where attention is not allowed (None: causal). Returns the pre-norm
        output [s, b, d]: the hidden state the next drafting step is fed."""
        self.layer.input_layernorm.embedding = embedding
        out, _ = self.layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=self._rope(positions))
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-sharded draft logits [s, b, K / tp]."""
        return self.output_layer(self.final_layernorm(hidden))[0]


class MTPHead(_Head):
    """megatron-core's multi-token-prediction layer (DeepSeek-V3's MTP module: `enorm`, `hnorm`, `eh_proj`
    fusing [norm(embedding of token t + 1), norm(hidden state at t)], one transformer layer, `final_layernorm`)
    used as a draft: fed the target's final hidden state, then (deeper drafts) its own output, as megatron
    chains its MTP depths. Its output layer scores the draft vocabulary (megatron's shares the target's)."""

    def __init__(self, hcfg: HeadConfig, tcfg):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer.multi_token_prediction import (MultiTokenPredictionLayer,
                                                                      MultiTokenPredictionLayerSubmodules)

        from megatron_soaes.models.megatron import RMSNorm, layer_spec

        super().__init__(hcfg, tcfg)
        spec = layer_spec(use_te=False, attention="sdpa")
        spec.submodules.sharded_state_dict_keys_map = {}  # our own names (no TE fused-norm aliases)
        sub = MultiTokenPredictionLayerSubmodules(enorm=RMSNorm, hnorm=RMSNorm, eh_proj=ColumnParallelLinear,
                                                  transformer_layer=spec, layer_norm=RMSNorm)
        self.mtp = MultiTokenPredictionLayer(tcfg, sub, layer_number=1,
                                             pg_collection=ProcessGroupCollection.use_mpu_process_groups(["cp"]))
        self._one_dtype()

    @property
    def projection(self):
        """`eh_proj` over [embedding, hidden] (column-parallel)."""
        return self.mtp.eh_proj

    @property
    def final_norm(self):
        return self.mtp.final_layernorm

    @property
    def transformer_layer(self):
        return self.mtp.transformer_layer

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's final normed hidden state is the layer's input as it is."""
        return features

    def step(self, embedding: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        """As `Eagle3Head.step`; returns the layer's output after its final norm (what megatron's next MTP depth
        and the output layer read)."""
        return self.mtp._proj_and_transformer_layer(hidden_states=hidden, decoder_input=embedding,
                                                    attention_mask=attention_mask,
                                                    rotary_pos_emb=self._rope(positions))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layer(hidden)[0]


@torch.no_grad()
def init_from_target(head: _Head, checkpoint) -> None:
    """Start the head in the target's hidden space: its output layer = the target's output rows of the draft
    vocabulary (this rank's share), its final norm = the target's, and its projection (EAGLE-3's fc, MTP's
    eh_proj) = pass the hidden state in its last input columns through (this rank's rows of it)."""
    from megatron.core import parallel_state as ps

    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.load import resolve_checkpoint

    reader = DcpReader(resolve_checkpoint(checkpoint))
    tied = head.hcfg.target_config.tie_word_embeddings
    out = reader.read("embedding.word_embeddings.weight" if tied else "output_layer.weight")[head.draft_ids.cpu()]
    k = out.shape[0] // ps.get_tensor_model_parallel_world_size()
    r = ps.get_tensor_model_parallel_rank()
    head.output_layer.weight.copy_(out[r * k:(r + 1) * k])
    head.final_norm.weight.copy_(reader.read("decoder.final_layernorm.weight"))
    w = head.projection.weight  # [d, 3d] replicated (fc) or [d / tp, 2d] this rank's rows (eh_proj); hidden last
    d, rows = head.hcfg.layer_config().hidden_size, torch.arange(w.shape[0])
    first = r * w.shape[0] if w.shape[0] != d else 0  # the global row of this rank's first
    eye = torch.zeros_like(w)
    eye[rows, w.shape[1] - d + first + rows] = 1
    w.copy_(eye)


def build_head(hcfg: HeadConfig, dtype: str = "fp32") -> _Head:
    """The head for this rank (tensor-parallel shards). Call after `runtime.initialize`."""
    from megatron_soaes.models.megatron import transformer_config

    if hcfg.kind == "mtp":
        head = MTPHead(hcfg, transformer_config(hcfg.layer_config(), dtype, use_te=False, mtp_num_layers=1))
    else:
        head = Eagle3Head(hcfg, transformer_config(hcfg.layer_config(), dtype, use_te=False))
    if torch.cuda.is_available():
        head.cuda(torch.cuda.current_device())
    return head
