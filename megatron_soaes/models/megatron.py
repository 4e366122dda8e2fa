"""Qwen2 / Qwen2.5 on megatron-core's GPTModel: the layer spec (Transformer Engine or megatron's
local layers), the TransformerConfig, and `build_model` for this rank's pipeline stage. GQA, bias
on QKV only, RMSNorm, SwiGLU, RoPE and tied/untied embeddings are all megatron-core features;
nothing here re-implements a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_soaes.models.config import ModelConfigError, Qwen2Config
from megatron_soaes.utils.dtypes import DTYPES


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(job) -> bool:
    """Whether `job` runs Transformer Engine layers (train.transformer_impl, fp8);
    a clear error when it asks for TE without it."""
    from megatron_soaes.config import ConfigError

    t = job.train
    have = have_transformer_engine()
    if t.transformer_impl == "transformer_engine" and not have:
        raise ConfigError("train.transformer_impl: transformer_engine is not installed (pip install '.[gpu]' on a "
                          "CUDA machine)")
    if t.fp8 and (t.transformer_impl == "local" or not have):
        raise ConfigError("train.fp8: FP8 needs Transformer Engine layers (pip install '.[gpu]' on a CUDA machine; "
                          "transformer_impl must not be 'local')")
    return have if t.transformer_impl == "auto" else t.transformer_impl == "transformer_engine"


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's norm (torch's RMSNorm, as megatron's WrappedTorchNorm builds it) that also runs
    with sequence parallelism, which WrappedTorchNorm refuses: its weight is marked `sequence_parallel`,
    so megatron's grad finalisation sums the per-rank sequence-shard gradients over the TP group (what
    TE's norms do). Same parameter names, so checkpoints do not change."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ModelConfigError("megatron_soaes RMSNorm: normalization must be RMSNorm without zero-centred gamma")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


ATTENTION_CHOICES = ("auto", "sdpa", "megatron_local", "transformer_engine")


def select_attention(job, use_te: bool) -> str:
    """The core attention `job` runs (train.attention): TE's with TE layers, else SDPA (auto), or
    megatron's unfused local one; a clear error for a combination that cannot run."""
    from megatron_soaes.config import ConfigError

    want = job.train.attention
    if want == "transformer_engine" and not use_te:
        raise ConfigError("train.attention: transformer_engine needs Transformer Engine layers (installed, and "
                          "train.transformer_impl auto or transformer_engine)")
    if want in ("sdpa", "megatron_local") and use_te:
        raise ConfigError(f"train.attention: {want} runs in megatron's local layers; set train.transformer_impl: local "
                          "(Transformer Engine layers bring their own attention)")
    chosen = "transformer_engine" if use_te else ("sdpa" if want == "auto" else want)
    if job.parallel.context_parallel > 1 and chosen == "megatron_local":
        raise ConfigError("parallel.context_parallel > 1: megatron's unfused local attention cannot split a sequence; "
                          "use train.attention sdpa (or auto), or Transformer Engine layers")
    return chosen


def layer_spec(use_te: bool | None = None, attention: str = "auto", qk_norm: bool = False, num_experts: int | None = None):
    """TE fused layer spec when Transformer Engine is importable, megatron's local spec otherwise; in
    the local spec the core attention is SDPA (`models.attention`) unless attention="megatron_local".
    With `num_experts`, the MLP is megatron-core's MoE layer (router, token dispatcher, experts: one
    linear pair per expert in the local spec; TE's grouped GEMM where TE is)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        if not have_transformer_engine():
            raise RuntimeError("use_te=True but transformer_engine is not installed (pip install '.[gpu]')")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(num_experts), qk_layernorm=qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                    normalization="RMSNorm", qk_layernorm=qk_norm)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    if qk_norm:  # per-head q/k RMSNorm (Qwen3)
        attn = spec.submodules.self_attention.submodules
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    if attention in ("auto", "sdpa"):
        from megatron_soaes.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "megatron_local":
        raise ModelConfigError(f"attention must be one of {ATTENTION_CHOICES} for local layers, got {attention!r}")
    return spec


FUSION_FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion",
                "cross_entropy_fusion_impl", "masked_softmax_fusion", "gradient_accumulation_fusion",
                "apply_rope_fusion")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fusions(use_te: bool, cuda: bool | None = None) -> dict:
    """megatron-core's fusion switches for this device. On CUDA, bias-SwiGLU and bias-dropout-add
    (megatron's `jit_fuser`, i.e. torch.compile) and the vocab-parallel cross-entropy fusion (native,
    or TE's kernel where megatron found one) need neither TE nor apex: on. Gradient-accumulation fusion
    needs apex's `fused_weight_gradient_mlp_cuda` (megatron's own output layer asks for it even with TE
    layers) and RoPE fusion TE's kernels: on only when those are there. The masked-softmax fusion is
    apex's and only serves megatron's unfused attention: off. On CPU: all off (the torch paths)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te_ce = False
    if use_te:
        from megatron.core.models.common.language_module import language_module

        te_ce = getattr(language_module, "te_parallel_cross_entropy", None) is not None
    return dict(bias_activation_fusion=cuda, bias_dropout_fusion=cuda, cross_entropy_loss_fusion=cuda,
                cross_entropy_fusion_impl="te" if te_ce else "native", masked_softmax_fusion=False,
                gradient_accumulation_fusion=cuda and _importable("fused_weight_gradient_mlp_cuda"),
                apply_rope_fusion=cuda and use_te)


def transformer_config(cfg: Qwen2Config, dtype: str = "fp32", use_te: bool = False, **overrides):
    """megatron-core TransformerConfig for this model at the current parallel layout."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    if dtype not in DTYPES:
        raise ModelConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.check_parallel(tp, pp, parallel_state.get_expert_model_parallel_world_size(),
                       parallel_state.get_expert_tensor_parallel_world_size())
    torch_dtype = DTYPES[dtype]
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=cfg.attention_bias,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        **fusions(use_te),
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )
    if cfg.is_moe:
        kwargs.update(moe_kwargs(cfg, use_te))
    yarn = cfg.rope_attention_factor() != 1.0
    if yarn:  # megatron's fused RoPE kernels drop YaRN's cos/sin scale: the unfused path applies it
        kwargs["apply_rope_fusion"] = False
    kwargs.update(overrides)
    tcfg = TransformerConfig(**kwargs)
    if yarn:  # megatron's attention scales cos/sin by 0.1 ln(factor) + 1 when this attribute is set
        tcfg.yarn_rotary_scaling_factor = cfg.rope_scaling["factor"]
    return tcfg


def moe_kwargs(cfg: Qwen2Config, use_te: bool) -> dict:
    """megatron-core's MoE settings that compute HF Qwen3-MoE: softmax router over all experts, top-k;
    norm_topk_prob renormalises the top-k weights, which is megatron's softmax over the k chosen logits
    (pre_softmax False); without it the weights are the full softmax's (pre_softmax True). No shared
    expert, no token dropping. The load-balancing loss is megatron's per layer and micro-batch, E * sum_i
    f_i P_i with f_i the share of the k * T routed slots: HF's formula is k times that per layer, so the
    coefficient is router_aux_loss_coef * k, spread over the MoE layers (HF averages its loss over them); the
    optional router z-loss likewise."""
    from megatron.core import parallel_state

    sparse = cfg.moe_layers()
    return dict(
        num_moe_experts=cfg.num_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_score_function="softmax", moe_layer_freq=[int(s) for s in sparse],
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.router_aux_loss_coef * cfg.num_experts_per_tok / sum(sparse),
        moe_z_loss_coeff=cfg.router_z_loss_coef / sum(sparse) if cfg.router_z_loss_coef else None,
        # gloo and CPU: the all-gather dispatcher (megatron's all-to-all one keeps CUDA streams)
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_grouped_gemm=use_te, moe_permute_fusion=False, moe_router_fusion=False,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def _block_spec(cfg: Qwen2Config, tcfg, use_te: bool, attention: str, vp_stage):
    """This stage's layer specs (dense or MoE per layer, by the global layer index) and the final norm."""
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules, get_num_layers_to_build,
                                                             get_transformer_layer_offset)

    dense = layer_spec(use_te, attention, qk_norm=cfg.qk_norm)
    moe = layer_spec(use_te, attention, qk_norm=cfg.qk_norm, num_experts=cfg.num_experts) if cfg.is_moe else None
    sparse = cfg.moe_layers()
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage)
    specs = [moe if sparse[offset + i] else dense for i in range(get_num_layers_to_build(tcfg, vp_stage=vp_stage))]
    if use_te and not cfg.is_moe:
        return dense
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)
    # the block's final norm too (megatron would build WrappedTorchNorm, which refuses sequence parallelism)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def build_model(cfg: Qwen2Config, dtype: str = "fp32", use_te: bool | None = None, vp_stage=None,
                attention: str = "auto", **overrides):
    """GPTModel for this rank's pipeline stage. Call after `runtime.initialize`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = have_transformer_engine()
    tcfg = transformer_config(cfg, dtype, use_te, **overrides)
    spec = _block_spec(cfg, tcfg, use_te, attention, vp_stage)
    if cfg.is_moe:  # megatron-core 0.16 names TE's GEMM in its router even without TE: absent means torch.mm
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )
    if cfg.rope_scaling:  # Llama 3 / YaRN frequencies with the checkpoint's own factors (as transformers computes them)
        rope = model.rotary_pos_emb
        rope.inv_freq = cfg.rope_inv_freq(rope.inv_freq.device)
    # Without TE/apex, megatron's local spec falls back to torch.nn norms created in fp32. A bf16/fp16
    # model must hold every parameter in that dtype: megatron's mixed-precision optimizer maps its
    # state to the model by assuming so (a mixed model saves optimizer state under the wrong names).
    half = tcfg.params_dtype
    if half != torch.float32:
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.data = p.data.to(half)
    if cfg.is_moe:
        # expert weights are reduced over the expert-data-parallel group (DDP) and get an optimizer of their own
        # at every EP size -- megatron-core does so only at EP > 1 -- so the optimizer state a checkpoint holds
        # has one structure, and a run saved at EP=2 resumes at EP=1 and back
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                p.allreduce = False
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
