"""Atomic writes: a reader sees the old file or the whole new one, never half of it; and removals that
never leave half a directory where a resume could pick it up."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary sibling, then rename over `path` (creating parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def remove_atomically(path: str | Path) -> bool:
    """Rename `path` to a hidden sibling (one atomic step: it is gone from where runs look), then delete
    it. True when there was something to remove."""
    path = Path(path)
    if not path.exists():
        return False
    aside = path.with_name(f".{path.name}.removed-{time.time_ns()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # removed meanwhile by another process
        return False
    shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
    return True
