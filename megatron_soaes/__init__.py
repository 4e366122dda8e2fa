"""megatron-soaes: domain LLMs on megatron-core -- CPT, progressive SFT, distillation, speculative decoding."""

import os
import warnings

__version__ = "0.1.0"

# megatron-core's import decorates its fused kernels with torch.compile, which imports TorchDynamo and
# Inductor: about 2 s of CPU in every process start (each rank of each job), for kernels that never run
# without a GPU (the fusions are off there). On a machine with no GPU driver, skip that
# (TORCHDYNAMO_DISABLE=0 in the environment keeps it); nothing of ours compiles there.
if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# Messages megatron-core and torch print on every import or checkpoint load that say nothing to our
# users: whether Transformer Engine runs is decided and reported by the job config
# (train.transformer_impl, resolved_config.json); ShardedTensor is megatron's own checkpoint format.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
