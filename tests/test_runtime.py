import pytest
import torch

from megatron_soaes.runtime import ParallelConfig, ParallelConfigError, initialize


@pytest.mark.parametrize("cfg,world,msg", [
    (ParallelConfig(tensor_parallel=2), 3, "world size 3 is not divisible by TP\\*PP\\*CP = 2\\*1\\*1 = 2"),
    (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, "not divisible"),
    (ParallelConfig(tensor_parallel=0), 1, "tensor_parallel must be a positive integer"),
    (ParallelConfig(sequence_parallel=True), 1, "sequence_parallel needs tensor_parallel > 1"),
    (ParallelConfig(virtual_pipeline=2), 1, "virtual_pipeline needs pipeline_parallel > 1"),
    (ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), 2, "the interleaved schedule is not built"),
])
def test_parallel_config_errors(cfg, world, msg):
    with pytest.raises(ParallelConfigError, match=msg):
        cfg.validate(world)


def test_data_parallel_size():
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel_size(16) == 4


def test_initialize_single_process():
    from megatron.core import parallel_state

    dp = initialize(ParallelConfig(), seed=3)
    assert dp == 1
    assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    # re-initialising (as consecutive jobs in one process do) is allowed, and does not pile up groups: each
    # one torch keeps holds gloo threads that poll
    groups, threads = _groups_and_gloo_threads()
    for _ in range(3):
        assert initialize(ParallelConfig(), seed=3) == 1
    assert _groups_and_gloo_threads() == (groups, threads)


def _groups_and_gloo_threads() -> tuple[int, int]:
    import os

    from torch.distributed import distributed_c10d

    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return len(distributed_c10d._world.pg_map), sum(n.startswith(("gloo", "pt_gloo")) for n in names)


def test_initialize_rejects_layout_larger_than_world():
    with pytest.raises(ParallelConfigError, match="world size 1"):
        initialize(ParallelConfig(tensor_parallel=2))


def test_backend_choice(monkeypatch):
    """gloo may be asked for with CUDA (ranks sharing one GPU: the GPU check's CP part); nccl needs CUDA."""
    from megatron_soaes.runtime.distributed import backend_name

    monkeypatch.delenv("SOAES_DIST_BACKEND", raising=False)
    assert (backend_name(True), backend_name(False)) == ("nccl", "gloo")
    monkeypatch.setenv("SOAES_DIST_BACKEND", "gloo")
    assert backend_name(True) == "gloo"
    for bad, cuda in (("nccl", False), ("mpi", True)):
        monkeypatch.setenv("SOAES_DIST_BACKEND", bad)
        with pytest.raises(RuntimeError, match=f"SOAES_DIST_BACKEND='{bad}'"):
            backend_name(cuda)
