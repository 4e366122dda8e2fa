"""Stream tensors into and out of megatron-core's ``torch_dist`` checkpoint format, chunk by chunk.

A ``torch_dist`` checkpoint is a torch.distributed.checkpoint (DCP) directory plus
``metadata.json`` and ``common.pt``. megatron-core writes it collectively from a live model;
converting a 72B HF checkpoint that way needs the whole model in memory. `DcpWriter` instead
appends one chunk at a time (each chunk is exactly what one TP rank / layer would own) and writes
the DCP metadata at the end; `DcpReader` reads any rectangular slice back from whatever chunks
overlap it. The result is loaded by the unmodified `megatron.core.dist_checkpointing.load`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_soaes.checkpoint import te_layout

try:  # private in torch, stable since 2.2
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint.storage import _StorageInfo  # type: ignore

MCORE_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


class DcpWriter:
    """Append tensor chunks to data files; `close()` writes the DCP and megatron metadata. `write` may be
    called from several threads: each thread appends to files of its own."""

    def __init__(self, directory: str | Path, max_file_bytes: int = 2 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.objects: list[str] = []
        self.storage: dict[MetadataIndex, _StorageInfo] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._files: list = []
        self._file_idx = -1

    def _stream(self):
        st = getattr(self._local, "stream", None)
        if st is None or st[1].tell() > self.max_file_bytes:
            with self._lock:
                self._file_idx += 1
                name = f"__0_{self._file_idx}.distcp"
                st = (name, open(self.dir / name, "wb"))
                self._files.append(st[1])
            self._local.stream = st
        return st

    def declare(self, key: str, global_shape, dtype: torch.dtype) -> None:
        if key in self.tensors:
            raise ValueError(f"tensor {key} declared twice")
        self.tensors[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(global_shape), chunks=[]
        )

    def write(self, key: str, offsets, chunk: torch.Tensor) -> None:
        md = self.tensors[key]
        if chunk.dtype != md.properties.dtype or chunk.dim() != len(md.size):
            raise ValueError(f"{key}: chunk {tuple(chunk.shape)} {chunk.dtype} does not fit {tuple(md.size)}")
        for o, s, g in zip(offsets, chunk.shape, md.size):
            if o < 0 or o + s > g:
                raise ValueError(f"{key}: chunk at {tuple(offsets)} of {tuple(chunk.shape)} exceeds {tuple(md.size)}")
        chunk = chunk.detach().cpu().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes a view's whole storage
        name, stream = self._stream()
        start = stream.tell()
        torch.save(chunk, stream)
        info = _StorageInfo(relative_path=name, offset=start, length=stream.tell() - start)
        offsets = torch.Size(offsets)
        with self._lock:
            md.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape))
            self.storage[MetadataIndex(key, offsets)] = info

    def write_object(self, unique_key: str, obj) -> None:
        """A megatron ShardedObject (e.g. a TE module's extra state) under its unique key, stored as
        megatron-core's torch_dist strategy stores one: ``torch.save([obj])``."""
        buf = io.BytesIO()
        torch.save([obj], buf)
        name, stream = self._stream()
        start = stream.tell()
        stream.write(buf.getbuffer())
        with self._lock:
            self.objects.append(unique_key)
            self.storage[MetadataIndex(unique_key)] = _StorageInfo(relative_path=name, offset=start,
                                                                   length=stream.tell() - start)

    def close(self, common: dict | None = None) -> None:
        for key, md in self.tensors.items():
            covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
            if covered != md.size.numel():
                raise ValueError(f"{key}: chunks cover {covered} of {md.size.numel()} elements")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for key, md in self.tensors.items():  # chunk order as a serial writer would list them
            md.chunks.sort(key=lambda c: tuple(c.offsets))
        entries = {**self.tensors, **{k: BytesStorageMetadata() for k in self.objects}}
        metadata = Metadata(state_dict_metadata=entries, planner_data=None, storage_data=self.storage)
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        torch.save(common or {}, self.dir / "common.pt")
        (self.dir / "metadata.json").write_text(json.dumps(MCORE_METADATA))


class DcpReader:
    """Read slices of tensors from a DCP directory without loading whole tensors."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / ".metadata"
        if not path.exists():
            raise FileNotFoundError(f"{self.dir}: not a torch_dist checkpoint (no .metadata)")
        with open(path, "rb") as f:
            self.metadata: Metadata = pickle.load(f)
        # per tensor: (chunk offsets, chunk sizes, storage info); an MoE layer's experts are hundreds of chunks,
        # read expert by expert, so the chunk sizes are looked up here once, not per read
        sizes = {(k, tuple(c.offsets)): tuple(c.sizes) for k, md in self.metadata.state_dict_metadata.items()
                 if isinstance(md, TensorStorageMetadata) for c in md.chunks}
        self._by_key: dict[str, list] = {}
        for index, info in self.metadata.storage_data.items():
            if index.offset is None:  # a byte object (RNG state, common values), not a tensor chunk
                continue
            offset = tuple(index.offset)
            self._by_key.setdefault(index.fqn, []).append((offset, sizes[index.fqn, offset], info))

    def keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) in self.metadata.state_dict_metadata

    def resolve(self, key: str) -> str:
        """`key`, or its name in the other layer spec where the checkpoint has that instead (te_layout)."""
        if key not in self.metadata.state_dict_metadata:
            other = te_layout.alias(key)
            if other in self.metadata.state_dict_metadata:
                return other
        return key

    def shape(self, key: str) -> torch.Size:
        return self.metadata.state_dict_metadata[self.resolve(key)].size

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[self.resolve(key)].properties.dtype

    def chunks(self, key: str):
        """Yield (offsets, chunk) of tensor `key` as it was saved, one stored chunk at a time."""
        for offset, _, info in sorted(self._by_key.get(self.resolve(key), []), key=lambda c: c[0]):
            yield offset, self._load_chunk(info)

    def _load_chunk(self, info) -> torch.Tensor:
        if getattr(info, "transform_descriptors", None):
            raise NotImplementedError(f"{self.dir}: compressed/transformed DCP chunks are not supported")
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        return torch.load(io.BytesIO(data), weights_only=True)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or with `index` the slice ``tensor[index]`` of a layer-stacked tensor."""
        key = self.resolve(key)
        if key not in self.metadata.state_dict_metadata:
            raise KeyError(f"{self.dir}: checkpoint has no tensor {key!r}")
        md = self.metadata.state_dict_metadata[key]
        lo = [0] * len(md.size)
        hi = list(md.size)
        if index is not None:
            lo[0], hi[0] = index, index + 1
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=md.properties.dtype)
        filled = 0
        for offset, size, info in self._by_key.get(key, []):
            c_lo, c_hi = list(offset), [o + s for o, s in zip(offset, size)]
            ov_lo = [max(a, b) for a, b in zip(lo, c_lo)]
            ov_hi = [min(a, b) for a, b in zip(hi, c_hi)]
            if any(a >= b for a, b in zip(ov_lo, ov_hi)):
                continue
            chunk = self._load_chunk(info)
            if ov_lo == c_lo == lo and ov_hi == c_hi == hi:  # one chunk is exactly the slice: no copy
                return chunk[0] if index is not None else chunk
            src = chunk[tuple(slice(a - c, b - c) for a, b, c in zip(ov_lo, ov_hi, c_lo))]
            out[tuple(slice(a - l, b - l) for a, b, l in zip(ov_lo, ov_hi, lo))] = src
            filled += src.numel()
        if filled != out.numel():
            raise ValueError(f"{self.dir}: tensor {key!r} is incomplete ({filled} of {out.numel()} elements)")
        return out[0] if index is not None else out
