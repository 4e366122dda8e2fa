"""The small JSON sidecar every megatron-soaes checkpoint carries: model config + layout it was written for."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from megatron_soaes.models.config import Qwen2Config

META_FILE = "soaes_model.json"


def write_meta(directory: Path, cfg: Qwen2Config, **extra) -> None:
    data = {"format": "megatron-soaes", "architecture": cfg.architecture, "model": cfg.to_dict(), **extra}
    (Path(directory) / META_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False))


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.exists():
        from megatron_soaes.checkpoint.bridge import is_bridge_checkpoint

        if is_bridge_checkpoint(directory):
            raise FileNotFoundError(f"{directory}: a Megatron-Bridge checkpoint; convert it first: soaes convert "
                                    f"bridge-to-megatron {directory} OUT")
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a megatron-soaes checkpoint")
    return json.loads(path.read_text())


def read_model_config(directory: str | Path) -> Qwen2Config:
    return Qwen2Config(**read_meta(directory)["model"])


def model_config_of(path: str | Path) -> Qwen2Config:
    """The model config of a megatron-soaes checkpoint or of an HF directory / config.json."""
    return read_model_config(path) if (Path(path) / META_FILE).exists() else Qwen2Config.from_hf(path)


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `target` in one rename."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass --force / overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
