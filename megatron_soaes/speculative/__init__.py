"""Draft-and-verify decoding with token trees and a native lossless verify op."""

from megatron_soaes.speculative.decode import (GenerationResult, SpecConfig, generate, probs_from_logits,
                                               speculative_generate)
from megatron_soaes.speculative.model import KVCache, Qwen2ForInference, load_inference_model
from megatron_soaes.speculative.verify import native_available, tree_verify, tree_verify_reference

__all__ = ["GenerationResult", "KVCache", "Qwen2ForInference", "SpecConfig", "generate", "load_inference_model",
           "native_available", "probs_from_logits", "speculative_generate", "tree_verify", "tree_verify_reference"]
