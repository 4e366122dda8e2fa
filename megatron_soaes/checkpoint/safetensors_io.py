"""Minimal safetensors reader/writer that never maps or holds a whole file.

`safe_open` memory-maps each shard, so reading every tensor of a 140 GB checkpoint leaves 140 GB of
file pages counted against the process; `save_file` needs a whole shard in memory. Here a tensor
is read with one positioned read straight into its own storage, and a shard is written from a plan
(names, shapes, dtypes known up front, so every tensor's offset is too) with each tensor written at its
offset as it is produced -- in any order, from any thread, with no copy on the way (`os.pread`/`os.pwrite`
release the GIL). Same file format, so `safetensors` and `transformers` read the output.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    pass


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise SafetensorsFormatError(f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsFormatError(f"bad header entry for {name}") from None
            if end - b != tensor_nbytes(shape, dtype) or b < 0:
                raise SafetensorsFormatError(f"tensor {name}: data size does not match its shape")
            if self.data_start + end > size:
                raise SafetensorsFormatError(f"tensor {name} runs past the end of the file (truncated?)")
            self.entries[name] = (dtype, shape, b, end)

    def keys(self):
        return list(self.entries)

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def dtype(self, name) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name) -> torch.Tensor:
        dtype, shape, b, end = self.entries[name]
        out = torch.empty(end - b, dtype=torch.uint8)
        if end > b:
            with open(self.path, "rb", buffering=0) as f:
                got = _pread_into(f.fileno(), memoryview(out.numpy()), self.data_start + b)
            if got != end - b:
                raise SafetensorsFormatError(f"tensor {name}: short read (truncated file?)")
        return out.view(dtype).reshape(shape)


_IO_MAX = 1 << 30  # bytes per pread/pwrite call (Linux moves at most ~2 GiB per call)


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _IO_MAX]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:done + _IO_MAX], offset + done)


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors (names, shapes, dtypes, order) are planned up front; `add`
    may be called in any order and from several threads."""

    def __init__(self, path: str | Path, plan: list[tuple[str, tuple, torch.dtype]], metadata: dict | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        for name, shape, dtype in plan:
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        self.expected = {n: (tuple(s), d, start + header[n]["data_offsets"][0]) for n, s, d in plan}
        self.written: set[str] = set()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        os.ftruncate(self.fd, start + offset)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"{self.path}: {name} is not planned for this file")
        shape, dtype, at = self.expected[name]
        if (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
            raise ValueError(f"{self.path}: expected {name} {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        if name in self.written:
            raise ValueError(f"{self.path}: {name} written twice")
        self.written.add(name)
        if tensor.numel():
            _pwrite_all(self.fd, memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()), at)

    def close(self) -> None:
        missing = len(self.expected) - len(self.written)
        try:
            if missing:
                raise ValueError(f"{self.path}: {missing} planned tensors never written")
            os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        """Release the file after a failure (the caller discards the directory)."""
        os.close(self.fd)
