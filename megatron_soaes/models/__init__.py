"""Model family: Qwen2/Qwen2.5 on megatron-core GPTModel."""

from megatron_soaes.models.qwen2 import (
    PRESETS,
    ModelConfigError,
    Qwen2Config,
    build_model,
    layer_spec,
    preset,
    transformer_config,
)

__all__ = ["PRESETS", "ModelConfigError", "Qwen2Config", "build_model", "layer_spec", "preset", "transformer_config"]
