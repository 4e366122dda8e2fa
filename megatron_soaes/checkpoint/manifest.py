"""A checkpoint's manifest: what a complete checkpoint holds, written last, checked before it is trusted.

``manifest.json`` lists every file of the checkpoint directory with its size and XXH3-128 checksum (a
non-cryptographic hash at ~10 GB/s per core: it guards against truncation and bit rot, not tampering,
and costs a 1 TB checkpoint seconds per rank where SHA-256 would cost minutes), and every
tensor of its ``torch_dist`` metadata with shape and dtype. A directory is renamed into place only after
its manifest is written, so a published checkpoint without one predates manifests; one whose files
differ from it (truncated, a flipped byte, a missing shard) is refused with the file named, and resume
falls back to the previous checkpoint. Hashing runs in threads (xxhash releases the GIL on large
buffers) and, in a distributed save, each rank hashes its share of the files.
"""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class CheckpointCorrupt(RuntimeError):
    """A checkpoint whose files do not match its manifest (or that has none where one is required)."""


class CheckpointUnverified(CheckpointCorrupt):
    """A checkpoint without a manifest, refused because nothing says its files are whole."""


ALLOW_UNVERIFIED = "SOAES_ALLOW_UNVERIFIED"  # set by every command's --allow-unverified (and seen by its workers)


def unverified(directory: str | Path, log=None) -> None:
    """A checkpoint without a manifest -- one megatron-core or Megatron-Bridge wrote, which carry none -- is
    refused, unless the user allowed unverified reads (`--allow-unverified`): then it is read with a warning."""
    d = Path(directory)
    if not (d / ".metadata").exists():
        raise CheckpointCorrupt(f"{d}: not a megatron checkpoint (no {MANIFEST} and no .metadata)")
    if os.environ.get(ALLOW_UNVERIFIED) != "1":
        raise CheckpointUnverified(f"{d}: no {MANIFEST}, so nothing says its files are whole (checkpoints written "
                                   "by megatron-core or Megatron-Bridge carry none); rerun with --allow-unverified "
                                   "to read it unchecked")
    import sys

    (log or (lambda m: print(m, file=sys.stderr)))(f"WARNING: {d}: no {MANIFEST}; read unchecked (--allow-unverified)")


def _checksum(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _threads() -> int:
    return min(16, os.cpu_count() or 1)


def checkpoint_files(directory: str | Path) -> list[str]:
    """The files a manifest covers: every regular file below `directory` except the manifest itself."""
    d = Path(directory)
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(directory: str | Path, names: list[str]) -> dict[str, dict]:
    """{name: {bytes, xxh3_128}} for `names` under `directory`, hashed in parallel threads."""
    d = Path(directory)
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(lambda n: _checksum(d / n), names))
    return {n: {"bytes": (d / n).stat().st_size, "xxh3_128": h} for n, h in zip(names, digests)}


def tensor_entries(directory: str | Path) -> dict[str, dict]:
    """Every tensor of a torch_dist checkpoint's DCP metadata: {name: {shape, dtype}}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(directory) / ".metadata"
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        md = pickle.load(f)
    return {k: {"shape": list(v.size), "dtype": str(v.properties.dtype).removeprefix("torch.")}
            for k, v in sorted(md.state_dict_metadata.items()) if isinstance(v, TensorStorageMetadata)}


def write_manifest(directory: str | Path, files: dict[str, dict] | None = None) -> dict:
    """Write ``manifest.json`` (through a temporary name); `files` when the hashes were computed elsewhere
    (by the ranks that wrote them), else every file is hashed here."""
    d = Path(directory)
    files = files if files is not None else hash_files(d, checkpoint_files(d))
    data = {"format": "megatron-soaes-manifest", "version": 1, "files": dict(sorted(files.items())),
            "total_bytes": sum(f["bytes"] for f in files.values()), "tensors": tensor_entries(d)}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, d / MANIFEST)
    return data


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"{path}: unreadable manifest ({e})") from None


def verify(directory: str | Path, checksums: bool = True, names: list[str] | None = None) -> dict | None:
    """Check `directory` against its manifest (`names`: only those files); raises `CheckpointCorrupt`
    naming the first bad file. Sizes always, checksums with `checksums`. Returns the manifest; a checkpoint without one is
    refused (`unverified`), or with --allow-unverified read unchecked (None)."""
    d = Path(directory)
    manifest = read_manifest(d)
    if manifest is None:
        unverified(d)
        return None
    files = manifest["files"]
    names = sorted(files) if names is None else names
    for n in names:
        p = d / n
        if not p.is_file():
            raise CheckpointCorrupt(f"{p}: missing (listed in {d / MANIFEST})")
        size = p.stat().st_size
        if size != files[n]["bytes"]:
            raise CheckpointCorrupt(f"{p}: {size} bytes, the manifest says {files[n]['bytes']} (truncated or overwritten)")
    if checksums:
        got = hash_files(d, names)
        for n in names:
            if got[n]["xxh3_128"] != files[n]["xxh3_128"]:
                raise CheckpointCorrupt(f"{d / n}: checksum differs from {d / MANIFEST} (corrupt)")
    return manifest


def verify_distributed(directory: str | Path, checksums: bool = True) -> str | None:
    """Collective `verify`: each rank checks every world-th file; returns the first error (same on every
    rank) or None."""
    import torch

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    error = None
    try:
        manifest = read_manifest(directory)
        if manifest is not None:
            verify(directory, checksums, sorted(manifest["files"])[rank::world])
        else:
            unverified(directory, log=(lambda m: None) if rank else None)  # refused on every rank alike
    except Exception as e:  # noqa: BLE001  every rank must reach the gather: an I/O error is a refusal too
        error = str(e) if isinstance(e, CheckpointCorrupt) else f"{directory}: unreadable ({type(e).__name__}: {e})"
    errors = [None] * world
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e), None)
