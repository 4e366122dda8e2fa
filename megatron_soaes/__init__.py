"""megatron-soaes: domain LLMs on megatron-core -- CPT, progressive SFT, distillation, speculative decoding."""

__version__ = "0.1.0"
