"""Measuring a benchmark's subprocess: its peak resident memory (the process and its children)."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def _poll(proc: subprocess.Popen, out: list) -> None:
    """out[0]: the tree's peak RSS; out[1]: the largest single process's (a rank of a torchrun job)."""
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            each = [p.memory_info().rss] + [c.memory_info().rss for c in p.children(recursive=True)]
            out[0], out[1] = max(out[0], sum(each)), max(out[1], max(each))
        except psutil.Error:
            pass
        time.sleep(0.2)


def run_measured(cmd: list, per_process: bool = False, **popen) -> tuple[int, float, int]:
    """Run `cmd` to completion: (return code, wall seconds, peak RSS bytes of its process tree -- or, with
    `per_process`, of its largest single process)."""
    peak, t0 = [0, 0], time.time()
    proc = subprocess.Popen(cmd, **popen)
    t = threading.Thread(target=_poll, args=(proc, peak))
    t.start()
    proc.wait()
    t.join()
    return proc.returncode, time.time() - t0, peak[1] if per_process else peak[0]
