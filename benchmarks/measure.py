"""Measuring a benchmark's subprocess: its peak resident memory (the process and its children)."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def _poll(proc: subprocess.Popen, out: list) -> None:
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            out[0] = max(out[0], rss)
        except psutil.Error:
            pass
        time.sleep(0.2)


def run_measured(cmd: list, **popen) -> tuple[int, float, int]:
    """Run `cmd` to completion: (return code, wall seconds, peak RSS bytes of its process tree)."""
    peak, t0 = [0], time.time()
    proc = subprocess.Popen(cmd, **popen)
    t = threading.Thread(target=_poll, args=(proc, peak))
    t.start()
    proc.wait()
    t.join()
    return proc.returncode, time.time() - t0, peak[0]
