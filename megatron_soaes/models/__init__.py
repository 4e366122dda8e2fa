"""The model: its description (`config`: Qwen2Config, presets, vocabulary padding) and its
megatron-core build (`megatron`: layer spec, TransformerConfig, GPTModel)."""

from megatron_soaes.models.config import (PRESETS, ModelConfigError, Qwen2Config, pad_vocab, preset,
                                          resolve_model_config)
from megatron_soaes.models.megatron import build_model, have_transformer_engine, layer_spec, transformer_config

__all__ = ["PRESETS", "ModelConfigError", "Qwen2Config", "build_model", "have_transformer_engine", "layer_spec",
           "pad_vocab", "preset", "resolve_model_config", "transformer_config"]
