"""Preemption: SIGTERM (what SLURM sends before a job's time limit with ``--signal``, and what a
scheduler sends before it kills) makes the trainer finish its step, save and exit with `EXIT_PREEMPTED`,
which the sbatch scripts turn into a requeue; the requeued job resumes from that checkpoint."""

from __future__ import annotations

import signal
import threading

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- examples/slurm/common.sh requeues on it


class Preempted(Exception):
    """Raised by the trainer after the checkpoint at `step` is published."""

    def __init__(self, step: int, path):
        super().__init__(f"preempted (SIGTERM): saved {path} at step {step}; rerun to resume")
        self.step, self.path = step, path


class SigtermWatch:
    """While active, SIGTERM only sets a flag; `requested()` (collective) says whether any rank got one,
    so every rank saves at the same step. Outside the main thread there is no handler and no flag."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self) -> "SigtermWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, device: torch.device) -> bool:
        t = torch.tensor([float(self.flag)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
