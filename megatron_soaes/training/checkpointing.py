"""Training checkpoints with megatron-core dist_checkpointing: atomic, keep-last-K, reshardable.

Layout: ``<dir>/iter_0000100/`` (a torch_dist checkpoint + soaes_model.json) and ``<dir>/latest``.
A save goes to ``iter_XXXXXXX.tmp`` and is renamed only after every rank finished writing, so a
run killed mid-save leaves either the old checkpoint set or the new one, never a half-written
directory that looks complete. Loading picks the newest complete directory.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

_ITER = re.compile(r"^iter_(\d{7})$")


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def complete_checkpoints(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and _ITER.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def fault_point(name: str, iteration: int) -> None:
    """Fault injection for the kill tests: SOAES_FAULT=<name>:<iteration> SIGKILLs this process there."""
    spec = os.environ.get("SOAES_FAULT", "")
    if spec == f"{name}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


def save(directory: str | Path, iteration: int, model, optimizer, scheduler, common: dict, model_cfg, keep_last: int) -> Path:
    """Collective: every rank calls it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_soaes.checkpoint.meta import write_meta

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    directory = Path(directory)
    final = directory / f"iter_{iteration:07d}"
    tmp = directory / f"iter_{iteration:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    fault_point("save_start", iteration)
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "rng": ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0),
        "scheduler": scheduler.state_dict(),
        "common": common,
    }
    dist_checkpointing.save(state, str(tmp))
    fault_point("before_rename", iteration)
    torch.distributed.barrier()
    if rank == 0:
        write_meta(tmp, model_cfg, iteration=iteration, world_size=world)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (directory / "latest.tmp").write_text(final.name)
        os.replace(directory / "latest.tmp", directory / "latest")
        for old in complete_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def load(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and (at the same world size) RNG; returns `common`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_soaes.checkpoint.meta import read_meta

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    same_world = read_meta(path).get("world_size") == world
    model_sd = model.sharded_state_dict()
    # scheduler and common are non-sharded: dist_checkpointing.load returns them from common.pt.
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    if same_world:
        state["rng"] = ShardedObject("rng_state", None, (world,), (rank,), replica_id=0)
    loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict(loaded["model"], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        set_rng_state(loaded["rng"])
    return loaded["common"]
