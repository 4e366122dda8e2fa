"""megatron-soaes: domain LLMs on megatron-core -- CPT, progressive SFT, distillation, speculative decoding."""

import warnings

__version__ = "0.1.0"

# Messages megatron-core and torch print on every import or checkpoint load that say nothing to our
# users: whether Transformer Engine runs is decided and reported by the job config
# (train.transformer_impl, resolved_config.json); ShardedTensor is megatron's own checkpoint format.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
