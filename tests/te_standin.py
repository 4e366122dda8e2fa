"""megatron-core's own Transformer Engine layer spec, built where TE does not import.

`gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec` is called as it is, with its `TESpecProvider`
swapped for a backend whose modules have TE's parameter names and state (from TE 2.x's source: LayerNormLinear
keeps its norm as `layer_norm_weight`; every TE module, norms included, saves an `_extra_state`, an empty uint8
tensor without FP8; TE's attention saves nothing) and megatron's local arithmetic. What megatron-core's
`dist_checkpointing.save` writes for this model is what a TE run writes: which modules exist, what each is
called (the MoE layer's separate `pre_mlp_layernorm`), and the extra-state objects."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules, get_num_layers_to_build,
                                                         get_transformer_layer_offset)

from megatron_soaes.models.attention import SDPAttention
from megatron_soaes.models.megatron import RMSNorm


class _TEState:
    """TE's extra state without FP8: an empty byte tensor saved, None or empty accepted."""

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise RuntimeError(f"unexpected TE extra state {state!r}")


class TEColumnParallelLinear(_TEState, ColumnParallelLinear):
    pass


class TERowParallelLinear(_TEState, RowParallelLinear):
    pass


class TENorm(_TEState, RMSNorm):
    pass


class TELayerNormColumnParallelLinear(_TEState, ColumnParallelLinear):
    """A column-parallel linear with its input RMSNorm fused in, the norm's weight named as TE names it."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel
        self.eps = config.layernorm_epsilon

    def forward(self, x, *args, **kwargs):
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(x, *args, **kwargs)


class StandInTEProvider:
    """The backend megatron's TE spec asks for, answered with the classes above."""

    def column_parallel_linear(self):
        return TEColumnParallelLinear

    def row_parallel_linear(self):
        return TERowParallelLinear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return TELayerNormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return TENorm

    def core_attention(self):
        return SDPAttention

    def activation_func(self):
        return None

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        # one linear pair per expert: megatron saves TE's grouped experts under these same keys
        return SequentialMLP, MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)


def block_spec(cfg, tcfg, use_te, attention, vp_stage):
    """A drop-in for `models.megatron._block_spec`: this stage's layers from megatron's TE spec, TE's final norm."""
    gpt_layer_specs.TESpecProvider = StandInTEProvider
    try:
        dense = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_norm)
        moe = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=False, qk_layernorm=cfg.qk_norm) if cfg.is_moe else None)
    finally:
        del gpt_layer_specs.TESpecProvider
    sparse = cfg.moe_layers()
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage)
    specs = [moe if sparse[offset + i] else dense for i in range(get_num_layers_to_build(tcfg, vp_stage=vp_stage))]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)


def build_te_model(cfg, **overrides):
    """`models.build_model` with megatron's TE layer spec (stand-in modules) instead of the local one."""
    import pytest

    from megatron_soaes.models import build_model
    from megatron_soaes.models import megatron as mm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "_block_spec", block_spec)
        return build_model(cfg, use_te=False, **overrides)
