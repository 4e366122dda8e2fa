"""Process groups, seeds and the CPU compatibility layer for megatron-core."""

from megatron_soaes.config.job import ParallelConfig, ParallelConfigError
from megatron_soaes.runtime.distributed import (
    initialize,
    set_seed,
    shutdown,
    world_info,
)

__all__ = ["ParallelConfig", "ParallelConfigError", "initialize", "set_seed", "shutdown", "world_info"]
