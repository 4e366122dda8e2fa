"""Plain inference: the Qwen2 inference model with a KV cache and tree attention (`model`), and
target-only generation (`generate`). Speculative decoding, evaluation and export build on it."""

from megatron_soaes.inference.generate import GenerationResult, generate, probs_from_logits
from megatron_soaes.inference.model import KVCache, Qwen2ForInference, load_inference_model, load_weights

__all__ = ["GenerationResult", "KVCache", "Qwen2ForInference", "generate", "load_inference_model", "load_weights",
           "probs_from_logits"]
