"""The CPU compatibility layer: each CUDA assumption of megatron-core it handles."""

import importlib

import pytest
import torch

from megatron_soaes.runtime import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


@pytest.fixture(autouse=True)
def installed():
    assert cpu_compat.install() is True
    assert cpu_compat.install() is True  # idempotent
    assert cpu_compat.is_active()


def test_current_device_and_synchronize_are_cpu_safe():
    x = torch.empty(3, device=torch.cuda.current_device())
    assert x.device.type == "cpu"
    torch.cuda.synchronize()
    assert torch.ones(2).cuda().device.type == "cpu"


def test_default_causal_mask_is_allocated_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

    m = get_default_causal_mask(5)
    assert m.device.type == "cpu" and m.dtype == torch.bool
    assert torch.equal(m, torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1))
    assert get_sliding_window_causal_mask(4, 4, (2, 0)).device.type == "cpu"


def test_literal_cuda_allocations_in_schedules_go_to_cpu():
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    # The proxy is the torch API otherwise.
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.float32 is torch.float32


def test_rng_tracker_forks_cpu_state_like_cuda_tracker():
    from megatron.core import tensor_parallel

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("model-parallel-rng", 123)

    torch.manual_seed(0)
    plain = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        forked_a = torch.rand(4)
    after = torch.rand(4)
    with tracker.fork():
        forked_b = torch.rand(4)
    # Outside draws continue the default stream as if the fork never happened ...
    assert torch.equal(after, plain)
    # ... inside draws come from the tracked stream, which advances across forks.
    assert torch.equal(forked_a, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(forked_a, forked_b)
    with pytest.raises(RuntimeError, match="not added"):
        with tracker.fork("nope"):
            pass


def test_rng_tracker_state_roundtrip():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("a", 7)
    saved = tracker.get_states()
    with tracker.fork("a"):
        x = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        y = torch.rand(3)
    assert torch.equal(x, y)
