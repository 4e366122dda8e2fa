"""Let megatron-core 0.16 run on CPU (gloo) when CUDA is absent.

megatron-core assumes a GPU in a handful of places. Each is handled here, and only
here, so that the rest of the code base uses megatron-core unmodified:

1. ``torch.cuda.current_device()`` is used as an allocation device  -> returns ``cpu``.
2. ``torch.cuda.synchronize()`` in the p2p pipeline code             -> no-op.
3. ``Tensor.cuda()`` (tied-embedding sync across pipeline stages)   -> stays on CPU.
4. literal ``device="cuda"`` allocations in the pipeline schedules, the default causal
   mask, the DDP buffer, the optimizer (loss scale, grad-norm), and pinned host tensors (the rotary
   positions of a context-parallel rank)                            -> the ``torch`` name inside those
   modules is swapped for a proxy that maps CUDA devices to CPU and drops ``pin_memory``.
5. grad clipping asserts CUDA grads                                -> a CPU clip (same math).
6. the CUDA RNG tracker (``fork()`` of the model-parallel RNG state) -> a tracker that
   keeps torch's CPU generator states instead, so TP dropout stays reproducible.
7. the distributed optimizer sorts parameters by ``Tensor.type()`` names (``torch.cuda.FloatTensor``)
   -> while it is built, a CPU tensor's type name is its CUDA twin's.

`install()` is idempotent and does nothing when CUDA is available. It also keeps freed memory in the
process (`keep_freed_memory`): a CPU step's large activations are otherwise handed back to the kernel
and page-faulted in again at every step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_INSTALLED = False

# Modules whose literal ``device="cuda"`` allocations need redirecting.
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad-norm without apex)
    "megatron.core.models.common.embeddings.rope_utils",  # get_pos_emb_on_this_cp_rank (pin_memory=True)
)


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to CPU; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorchProxy(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: same API, CUDA devices -> CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        """Resolved once per name, then cached as an attribute (these modules are on hot paths)."""
        fn = getattr(torch, name)
        value = fn
        if callable(fn) and not isinstance(fn, type) and not isinstance(fn, types.ModuleType):

            @functools.wraps(fn)
            def value(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)  # pinned memory needs an accelerator
                return fn(*args, **kwargs)

        setattr(self, name, value)
        return value


class CpuRNGStatesTracker:
    """Named RNG states on the CPU generator; the interface of megatron's CudaRNGStatesTracker."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = kwargs.get("is_inference_rng_tracker", False)
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()
        self._current = None

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer_name, outer_state = self._current, torch.get_rng_state()
        if outer_name is not None:
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            self._current = outer_name
            torch.set_rng_state(self.states_[outer_name] if outer_name is not None else outer_state)


def _patch_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    random._CUDA_RNG_STATE_TRACKER = None
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # model_parallel_cuda_manual_seed seeds the "current CUDA device"; on CPU that is torch's generator.
    torch.cuda.manual_seed = torch.manual_seed


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 asserts grads are ``torch.cuda.FloatTensor``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_optimizer():
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


@contextlib.contextmanager
def _cuda_type_names():
    """``Tensor.type()`` of a CPU tensor named as its CUDA twin's, for code that dispatches on that name."""
    plain = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return plain(self).replace("torch.", "torch.cuda.", 1)
        return plain(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = plain


def _patch_distributed_optimizer():
    cls = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _cuda_type_names():
            init(self, *args, **kwargs)

    cls.__init__ = __init__


def keep_freed_memory() -> bool:
    """glibc serves every block over 32 MB with mmap and returns freed heap memory over its trim threshold
    to the kernel, so each training step's activations, logits and gradients are zero-filled and faulted
    in anew (a hand probe of a distillation run on 2 cores: about half its kernel time). Keep it in the heap
    instead (mallopt, for this
    process; glibc only, a no-op elsewhere). Returns whether it took effect."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("SOAES_KEEP_FREED_MEMORY", "1") == "0":  # opt out (e.g. to compare)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 62))
    except (OSError, AttributeError):
        return False


def install() -> bool:
    """Install the CPU compatibility layer. Returns True if it is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    keep_freed_memory()
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    proxy = _CpuTorchProxy()
    for name in _CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = proxy
    _patch_rng()
    _patch_optimizer()
    _patch_distributed_optimizer()
    _INSTALLED = True
    return True


def is_active() -> bool:
    return _INSTALLED
