"""Training checkpoints with megatron-core dist_checkpointing: atomic, keep-last-K, reshardable.

Layout: ``<dir>/iter_0000100/`` (a torch_dist checkpoint + soaes_model.json + manifest.json) and
``<dir>/latest``. A save goes to ``iter_XXXXXXX.tmp`` and is renamed only after every rank finished
writing and the manifest (every file's size and checksum, written last) is in place, so a run killed
mid-save leaves either the old checkpoint set or the new one, never a half-written directory that looks
complete. Resuming takes the newest checkpoint that matches its manifest and falls back past any that do
not (a truncated or corrupted file), saying so.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

_ITER = re.compile(r"^iter_(\d{7})$")
# the distributed optimizer's state saved in model space, each tensor whole per TP/EP shard: a checkpoint
# resumes at another DP size and with or without the distributed optimizer (its default layout,
# flattened ranges, is one megatron-core 0.16's checkpointing no longer writes)
OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def fault_point(name: str, iteration: int) -> None:
    """Fault injection for the kill tests: SOAES_FAULT=<name>:<iteration> SIGKILLs this process there,
    <name>:<iteration>:TERM sends it SIGTERM instead (a scheduler's preemption)."""
    spec = os.environ.get("SOAES_FAULT", "")
    if spec == f"{name}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec == f"{name}:{iteration}:TERM":
        os.kill(os.getpid(), signal.SIGTERM)


def save(directory: str | Path, iteration: int, model, optimizer, scheduler, common: dict, model_cfg, keep_last: int,
         async_queue=None, adapter: dict | None = None, extra: dict | None = None) -> Path:
    """Collective: every rank calls it. With `async_queue` (megatron-core's `AsyncCallsQueue`) the state is
    staged and written by a background process while training goes on; the checkpoint is published
    (manifest, rename, ``latest``, keep-last-K) by the queue's finalization once every rank is done.
    With `adapter` ({adapter, base} for the meta) only the LoRA adapters and their optimizer state are
    saved: the frozen base is the checkpoint the meta names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    directory = Path(directory)
    final = directory / f"iter_{iteration:07d}"
    tmp = directory / f"iter_{iteration:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    fault_point("save_start", iteration)
    model_sd = _model_state(model, adapter is not None)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_LAYOUT),
        "rng": ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0),
        "scheduler": scheduler.state_dict(),
        "common": common,
    }
    meta = {**(adapter or {}), **(extra or {}), "optimizer": optimizer_kind(optimizer), "layout": layout()}
    publish = lambda: _publish(tmp, final, iteration, model_cfg, keep_last, meta)  # noqa: E731
    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        publish()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


def layout() -> dict:
    """This process group's parallel layout: RNG states belong to a rank of one layout (`load`)."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "vp": ps.get_virtual_pipeline_model_parallel_world_size()}


def _model_state(model, adapters_only: bool) -> dict:
    from megatron_soaes.checkpoint.load import adapter_entries

    sd = model.sharded_state_dict()
    return adapter_entries(sd) if adapters_only else sd


def _publish(tmp: Path, final: Path, iteration: int, model_cfg, keep_last: int, meta: dict | None = None) -> None:
    """Collective, after every rank finished writing `tmp`: sidecar, manifest (last), then one rename."""
    from megatron_soaes.checkpoint.meta import write_meta

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    directory = final.parent
    torch.distributed.barrier()
    if rank == 0:
        write_meta(tmp, model_cfg, iteration=iteration, world_size=world, **(meta or {}))
    torch.distributed.barrier()
    _write_manifest(tmp)
    fault_point("before_rename", iteration)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (directory / "latest.tmp").write_text(final.name)
        os.replace(directory / "latest.tmp", directory / "latest")
        for old in complete_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def _write_manifest(tmp: Path) -> None:
    """Collective: each rank hashes every world-th file, rank 0 writes the manifest."""
    from megatron_soaes.checkpoint.manifest import checkpoint_files, hash_files, write_manifest

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = hash_files(tmp, checkpoint_files(tmp)[rank::world])
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    if rank == 0:
        write_manifest(tmp, {k: v for part in parts for k, v in part.items()})
    torch.distributed.barrier()


def latest_verified(directory: str | Path, checksums: bool = True, log=print) -> Path | None:
    """Collective: the newest complete checkpoint that matches its manifest. A corrupt one is skipped with
    a log line naming the file, and -- once a good one is found -- moved aside (``iter_X.corrupt-<time>``)
    with ``latest`` pointed at the good one. If every checkpoint is corrupt this raises and moves nothing,
    rather than let a rerun start over."""
    from megatron_soaes.checkpoint.manifest import CheckpointCorrupt, read_manifest, unverified, verify_distributed

    found = complete_checkpoints(directory)
    refused: list[tuple[Path, str]] = []
    for path in reversed(found):
        if read_manifest(path) is None:  # not corrupt, unverifiable: refused in one line (or allowed) as it is
            unverified(path, log if torch.distributed.get_rank() == 0 else (lambda m: None))
            return path
        error = verify_distributed(path, checksums)
        if error is not None:
            refused.append((path, error))
            log(f"WARNING: refusing checkpoint {path.name}: {error}; falling back to the previous one")
            continue
        if refused:
            log(f"resuming from {path.name}, the newest checkpoint that matches its manifest")
            _set_aside(refused, path, log)
        return path
    if refused:
        raise CheckpointCorrupt(f"{directory}: no checkpoint matches its manifest: " + "; ".join(e for _, e in refused))
    return None


def _set_aside(refused: list, good: Path, log) -> None:
    """Collective: rank 0 renames the refused checkpoints and repoints ``latest``; a failure is logged,
    never left to hang the other ranks."""
    import time

    if torch.distributed.get_rank() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            for path, _ in refused:
                os.replace(path, path.with_name(f"{path.name}.corrupt-{stamp}"))
                log(f"kept {path.name} aside as {path.name}.corrupt-{stamp}")
            (good.parent / "latest.tmp").write_text(good.name)
            os.replace(good.parent / "latest.tmp", good.parent / "latest")
        except OSError as e:
            log(f"WARNING: could not set the refused checkpoints aside ({e}); they stay and are refused again")
    torch.distributed.barrier()


def optimizer_kind(optimizer) -> str:
    """"distributed" when megatron-core's distributed optimizer holds any of the state, else "plain"."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in chain) else "plain"


@contextlib.contextmanager
def _distributed_optimizer_load(optimizer):
    """Three gaps of megatron-core 0.16's distributed optimizer over a torch Adam (no TE/apex: CPU, or a GPU
    image without them), mended around a load:
    - it reads the inner optimizer's `step` when it builds the state to load into, and a torch Adam has one
      only after its first step: give it megatron's zero-gradient dummy step (the load replaces its values);
    - its model-space loader copies every inner state entry from the checkpoint, where `step` is none (its
      load_state_dict restores it from the common state): keep that one;
    - that restored `step` is one tensor shared by every parameter's state, which torch Adam increments in
      place once per parameter (wrong bias correction from the first step after a resume): one each."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]
    for opt in opts:
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        set_states = type(opt)._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, opt=opt, set_states=set_states):
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            set_states(opt, model_param, tensors)

        opt._set_main_param_and_optimizer_states = keep_step
    try:
        yield
    finally:
        for opt in opts:
            del opt._set_main_param_and_optimizer_states
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def load(path: str | Path, model, optimizer, scheduler, log=print) -> dict:
    """Restore model, optimizer, scheduler and -- onto the layout that saved it -- RNG; returns `common`. A rank of
    another layout (or of a checkpoint that does not record its layout) keeps the fresh RNG its seed gave it:
    another layout's rank k holds a state drawn for another part of the model."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_soaes.checkpoint.load import load_complete
    from megatron_soaes.checkpoint.meta import read_meta

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    meta = read_meta(path)
    same_layout = meta.get("world_size") == world and meta.get("layout") == layout()
    if not same_layout and rank == 0:
        saved_at = meta.get("layout") or "an unrecorded layout"
        log(f"{path}: saved at world size {meta.get('world_size')}, {saved_at}; resumed at world size {world}, "
            f"{layout()}: RNG state not restored, every rank keeps the fresh state of its seed")
    model_sd = _model_state(model, "adapter" in meta)
    saved, now = meta.get("optimizer", "plain"), optimizer_kind(optimizer)
    if saved != now:  # megatron-core's two optimizers keep their state in different structures
        from megatron_soaes.config import ConfigError

        raise ConfigError(
            f"{path}: saved {'with' if saved == 'distributed' else 'without'} the distributed optimizer; resume "
            f"with parallel.use_distributed_optimizer={str(saved == 'distributed').lower()}, or start a new run "
            "from its weights (model.init_checkpoint)")
    with _distributed_optimizer_load(optimizer):
        # scheduler and common are non-sharded: dist_checkpointing.load returns them from common.pt.
        state = {"model": model_sd,
                 "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_LAYOUT)}
        if same_layout:
            state["rng"] = ShardedObject("rng_state", None, (world,), (rank,), replica_id=0)
        loaded = dist_checkpointing.load(state, str(path))
        load_complete(model, loaded["model"], path, adapters="adapter" in meta)
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng"])
    return loaded["common"]
