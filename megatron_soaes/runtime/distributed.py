"""One entry point for process-group setup: torch.distributed + megatron-core parallel_state.

Works under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK), under SLURM ``srun`` (SLURM_PROCID/...)
and as a plain single process. NCCL with CUDA, gloo without (then the CPU layer is installed).
`SOAES_DIST_BACKEND=gloo` keeps gloo with CUDA: ranks may then share one GPU (NCCL refuses two ranks on one
device), which is how `make gpu-check` runs a two-rank layout on a single lent GPU.
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch

from megatron_soaes.config.job import ParallelConfig
from megatron_soaes.runtime import cpu_compat


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM env, else a single process."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; then megatron's model-parallel RNG tracker if it is set up."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def backend_name(use_cuda: bool) -> str:
    """nccl with CUDA, gloo without; SOAES_DIST_BACKEND (gloo or nccl) chooses, where CUDA allows it."""
    name = os.environ.get("SOAES_DIST_BACKEND", "nccl" if use_cuda else "gloo")
    if name not in ("gloo", "nccl") or (name == "nccl" and not use_cuda):
        raise RuntimeError(f"SOAES_DIST_BACKEND={name!r}: gloo, or nccl with CUDA")
    return name


def initialize(parallel: ParallelConfig | None = None, seed: int = 1234, timeout_minutes: int = 30) -> int:
    """Initialise torch.distributed and megatron-core parallel state. Returns the data-parallel size."""
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    rank, world, local_rank = world_info()
    parallel.validate(world)
    use_cuda = torch.cuda.is_available()
    backend = backend_name(use_cuda)
    if not use_cuda:
        cpu_compat.install()
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if "MASTER_ADDR" not in os.environ:
            if world > 1:
                raise RuntimeError("MASTER_ADDR/MASTER_PORT must be set for a multi-process run")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        torch.distributed.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Megatron-LM's rule: each pipeline stage draws from seed + 100 x its rank, so identically shaped stages
    # do not start from the same weights (and dropout differs per stage); megatron's tracker adds the TP rank
    set_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    return parallel.data_parallel_size(world)


def _destroy_model_parallel() -> None:
    """megatron-core's destroy_model_parallel only forgets its groups; torch keeps them, each with gloo
    threads that poll (three per group). A process that sets up its layout again (the SFT curriculum's
    stages, the pipeline's in-process phases, a test session) destroys them too, or it piles up groups
    whose threads took two thirds of a core by the middle of a test run. (shutdown() needs none of
    this: destroying the default group destroys them all.)"""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d as c10d

    parallel_state.destroy_model_parallel()
    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            torch.distributed.destroy_process_group(group)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
