"""Where a benchmark result came from: every results file records the commit, date, machine and the
exact command that produced it (`write_results`), so a figure quoted in the README can be traced and
re-run. `read_rows` reads a results file written this way."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    m = {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
         "python": platform.python_version()}
    try:
        import torch

        m["torch"] = torch.__version__
        if torch.cuda.is_available():
            m["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return m


def provenance(command: str | None = None) -> dict:
    """commit (with `dirty` when the tree has uncommitted changes), UTC date, machine, command line."""
    return {"commit": _git("rev-parse", "--short", "HEAD") or None,
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "command": command if command is not None else " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def write_results(path, rows, command: str | None = None, **extra) -> Path:
    """{"provenance": ..., **extra, "rows": rows} written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"provenance": provenance(command), **extra, "rows": rows}, indent=2, ensure_ascii=False))
    tmp.replace(path)
    return path


def read_rows(path) -> list | None:
    """The rows of a results file (None when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data
